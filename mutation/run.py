"""``make mutate``: mutation testing of the code that verifies and decides, with cosmic-ray.

Each area is a source file (or the named functions of one) and the tests that guard it. For
every area a fresh copy of the checked-in tree is mutated, one mutant at a time, and the
area's tests run against it: a mutant they fail on is *killed*. The score is killed /
(killed + survived); mutants that break the import or time out count as killed (the tests
noticed), as cosmic-ray counts them.

Survivors are printed with their place and their change. A survivor kept on purpose (an
equivalent mutant, a change no user could notice) is listed in ``mutation/kept.txt`` with the
reason; the run fails when the score of the mutants not kept is under ``--goal`` percent.

Not part of ``make test``: each mutant costs a test run (seconds), and an area has hundreds.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = "python -m pytest -x -q -p no:randomly -p no:cacheprovider -p no:logging"

#: area -> (module, tests). Integration tests run real sockets in one process (a few seconds).
AREAS = {
    "paths": ("sdbackup/paths.py", "tests/unit/test_paths.py tests/unit/test_restore.py"),
    "placement": ("sdbackup/placement.py", "tests/unit/test_placement.py"),
    "objects": ("sdbackup/objects.py", "tests/unit/test_objects.py"),
    "chunkstore": ("sdbackup/services/chunkstore.py", "tests/unit/test_chunkstore.py"),
    "tickets": ("sdbackup/tickets.py", "tests/unit/test_tickets.py"),
    "messages": ("sdbackup/protocols/messages.py", "tests/unit/test_messages.py tests/unit/test_fuzz.py"),
    "repository": ("sdbackup/client/repository.py",
                   "tests/integration/test_lying_peers.py tests/integration/test_restore.py "
                   "tests/integration/test_repository.py"),
    "parenttrees": ("sdbackup/client/parenttrees.py", "tests/unit/test_archiver.py"),
    # The tree builder: unchanged-file reuse (``unchanged``, ``same_metadata``, ``_reuse``).
    "archiver": ("sdbackup/client/archiver.py", "tests/unit/test_archiver.py tests/unit/test_backup.py"),
    "repair": ("sdbackup/services/repair.py", "tests/integration/test_repair.py"),
    # The replication chain: a store verified, written, forwarded under its ticket, and
    # acknowledged only with every copy confirmed (the rest of server.py is left out).
    "chain": ("sdbackup/services/server.py",
              "tests/integration/test_chain.py tests/integration/test_guarantees.py "
              "tests/integration/test_tickets.py "
              "tests/integration/test_lying_peers.py tests/integration/test_disk_full.py",
              ["StorageServer.handle_StoreChunk", "StorageServer.handle_StoreChunks",
               "StorageServer._check_ticket", "StorageServer._write", "StorageServer._forward",
               "StorageServer._ask_next", "StorageServer._write_and_forward",
               "StorageServer.handle_ReplicateChunk"]),
}

#: Operators left out: the arithmetic-to-every-other-operator family multiplies the mutants
#: tenfold and mostly yields type errors; comparisons, booleans, constants, loops, break and
#: continue, and exception handlers are kept.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_.*_(Pow|RShift|LShift|BitOr|BitAnd|BitXor|Mod|FloorDiv)",
    r"core/ReplaceBinaryOperator_(Pow|RShift|LShift|BitOr|BitAnd|BitXor|Mod|FloorDiv)_.*",
]


def function_lines(module: Path, names: list[str]) -> list[str]:
    """``first-last`` line ranges of the named functions (``Class.method``), decorators included."""
    found = {}

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found[name] = f"{first}-{child.end_lineno}"
                visit(child, name + ".")

    visit(ast.parse(module.read_text()))
    missing = [name for name in names if name not in found]
    if missing:
        raise SystemExit(f"{module}: no function {', '.join(missing)}")
    return [found[name] for name in names]


def config(module: str, tests: str, timeout: float, lines: list[str] | None = None) -> str:
    excluded = ", ".join(json.dumps(p) for p in EXCLUDED_OPERATORS)
    only = "" if lines is None else f"""
[cosmic-ray.filters.line-filter]
lines = {{ {json.dumps(module)} = {json.dumps(lines)} }}
"""
    return f"""[cosmic-ray]
module-path = "{module}"
timeout = {timeout}
excluded-modules = []
test-command = "{PYTEST} {tests}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = [{excluded}]
{only}"""


def kept_mutants() -> set[str]:
    """``module:line operator occurrence`` keys listed in kept.txt (after the reason's #)."""
    kept = set()
    path = ROOT / "mutation" / "kept.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            key = line.split("#", 1)[0].strip()
            if key:
                kept.add(key)
    return kept


def run_area(name: str, module: str, tests: str, timeout: float, work: Path,
             uncommitted: bool = False, functions: list[str] | None = None) -> dict:
    copy = work / name
    if uncommitted:  # the working tree as it is (while writing the tests that kill mutants)
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "bench_work", "__pycache__", "*.sqlite", "data_*", "manager_data"))
    else:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(copy)], check=True)
    # The copy's code, not the installed one; and PATH made absolute, since the tools run in
    # the copy (PATH=.venv/bin would find no cosmic-ray, nor the venv's python, there).
    path = os.pathsep.join(os.path.abspath(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p)
    env = {**os.environ, "PYTHONPATH": str(copy), "PATH": path}
    cfg = copy / "mutate.toml"
    lines = function_lines(copy / module, functions) if functions else None
    cfg.write_text(config(module, tests, timeout, lines))
    session = copy / "session.sqlite"

    def cr(*args):
        return subprocess.run(args, cwd=copy, env=env, check=True, capture_output=True, text=True)

    cr("cosmic-ray", "init", str(cfg), str(session))
    cr("cr-filter-operators", str(session), str(cfg))
    if lines is not None:  # only the area's functions of a larger module
        cr("cr-filter-lines", str(session), "--config", str(cfg))
    baseline = subprocess.run(f"{PYTEST} {tests}", shell=True, cwd=copy, env=env,
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the tests fail without any mutant:\n{baseline.stdout[-3000:]}")
    cr("cosmic-ray", "exec", str(cfg), str(session))
    dump = cr("cosmic-ray", "dump", str(session)).stdout
    outcome = {"killed": 0, "survived": [], "skipped": 0}
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("worker_outcome") == "skipped":
            outcome["skipped"] += 1
            continue
        if result.get("test_outcome") == "survived":
            mutation = item["mutations"][0]
            where = f"{mutation['module_path']}:{mutation['start_pos'][0]}"
            changed = [line[1:].strip() for line in (result.get("diff") or "").splitlines()
                       if line.startswith("+") and not line.startswith("+++")]
            outcome["survived"].append(f"{where} {mutation['operator_name']} "
                                       f"{mutation['occurrence']}  # {' / '.join(changed)}")
        else:
            outcome["killed"] += 1
    return outcome


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(AREAS), help="areas to run (default: all)")
    parser.add_argument("--goal", type=float, default=90.0, help="percent of mutants to kill")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's tests")
    parser.add_argument("--uncommitted", action="store_true",
                        help="mutate a copy of the working tree, not of the last commit")
    args = parser.parse_args(argv)
    if shutil.which("cosmic-ray") is None:
        raise SystemExit("cosmic-ray is not installed: make mutate installs it")
    kept = kept_mutants()
    failed = False
    with tempfile.TemporaryDirectory(prefix="sdbackup-mutate-") as work:
        for name in args.only or sorted(AREAS):
            module, tests, *functions = AREAS[name]
            outcome = run_area(name, module, tests, args.timeout, Path(work), args.uncommitted,
                               functions[0] if functions else None)
            survived = [s for s in outcome["survived"] if s.split("  #")[0] not in kept]
            counted = outcome["killed"] + len(survived)
            score = 100.0 * outcome["killed"] / counted if counted else 100.0
            print(f"{name:12} {module:36} killed {outcome['killed']:4}  survived {len(survived):4}"
                  f"  kept {len(outcome['survived']) - len(survived):3}  score {score:5.1f} %", flush=True)
            for line in survived:
                print(f"    survived: {line}", flush=True)
            failed |= score < args.goal
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
