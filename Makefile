# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

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
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python demo/demo.py

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

test: $(VENV)/.test-installed lint
	$(BIN)/python -m pytest

# Not part of `make test`: several minutes, a real cluster, restic and borg (apt-get installs
# them when missing). Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--size-mib 256".
bench: $(VENV)/.test-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
