# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean packages mutate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The demo uses a regular install (redone every time, so it runs the code as it
# is now); the tests use an editable one: both ways of installing the twistd
# plugins are exercised.
$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/python
	$(BIN)/pip install --quiet .
	rm -f $(VENV)/.test-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python demo/demo.py $(DEMO_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

test: $(VENV)/.test-installed lint packages
	$(BIN)/python -m pytest

# Debian packages some tests run, installed with apt-get when missing (as root, or through
# sudo): chromium (the dashboard's browser test) and strace (tests/e2e/test_durability.py
# watches the daemons' system calls). Without them those tests fail; they never skip.
TEST_PACKAGES := chromium strace
packages:
	@missing=$$(for p in $(TEST_PACKAGES); do command -v $$p >/dev/null || echo $$p; done); \
	[ -z "$$missing" ] || { \
	  echo "installing" $$missing "from Debian's packages (apt-get)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

# Not part of `make test`: several minutes, a real cluster, restic and borg (apt-get installs
# them when missing). Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--size-mib 256";
# then what TLS and encryption cost (SECURITY_BENCH_ARGS, e.g. "--size-mib 256 --repeat 1").
bench: $(VENV)/.test-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/bench.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/encryption.py $(SECURITY_BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache

# Not part of `make test`: mutation testing of the code that verifies and decides (an hour or
# more; one area with MUTATE_ARGS="--only placement"). Survivors kept on purpose are listed,
# with the reason, in mutation/kept.txt.
$(VENV)/.mutate-installed: $(VENV)/.test-installed
	$(BIN)/pip install --quiet -e '.[test,mutate]'
	touch $@

mutate: $(VENV)/.mutate-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python mutation/run.py $(MUTATE_ARGS)
