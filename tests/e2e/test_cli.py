"""The ``sdbackup`` command against a manager and three storage servers, all real processes.

Every test backs up its own files (fresh random bytes, so nothing is deduplicated
away from an earlier test) and restores into new folders; the cluster is shared by
the module. The manager restart comes last: it is the one test that disturbs the
cluster, and it waits for every server to register again before it ends.
"""

import errno
import filecmp
import hashlib
import os
import re
import select
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from sdbackup import hashing
from sdbackup.sealing import OVERHEAD

MiB = 1024 * 1024
#: What ``sdbackup backup`` is given in most tests: a file and a folder tree.
NAMES = ["teste.txt", "tree"]
#: A fixed, odd mtime (nanoseconds matter) and a step between entries.
MTIME_BASE = 1_600_000_000_123_456_789
MTIME_STEP = 86_400_000_000_007
STATUS_ROW = re.compile(r"^(?P<address>\S+)\s+(?P<state>alive|dead)\s+[\d.]+ \S+\s+(?P<chunks>\d+)\s")
PROMPT = b"File names to back up:"


# --- source trees and how to compare them ------------------------------------------------


def write(path: Path, data: bytes, mode: int = 0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def make_tree(src: Path) -> list[str]:
    """``teste.txt`` and ``tree/``: nested folders, an empty file and folder, spaces,
    non-ASCII names, a few MiB of random bytes, links, odd modes and mtimes."""
    write(src / "teste.txt", b"hello, sdbackup\n")
    tree = src / "tree"
    write(tree / "empty.txt", b"")
    (tree / "empty folder").mkdir(parents=True)
    write(tree / "random.bin", os.urandom(3 * MiB + 512 * 1024 + 123), mode=0o600)
    write(tree / "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    write(tree / "nested/deeper/deepest/leaf.txt", b"leaf\n" * 1000)
    write(tree / "with space/file name.txt", b"spaces in names\n")
    write(tree / "café/naïve résumé.txt", "non-ASCII contents: 日本語\n".encode())
    write(tree / "日本語.txt", os.urandom(70_000))
    (tree / "nested/deeper").chmod(0o750)
    (tree / "link to leaf").symlink_to("nested/deeper/deepest/leaf.txt")
    (tree / "dangling").symlink_to("no such file")
    set_mtimes(src, NAMES)
    return list(NAMES)


def walk(root: Path, names: list[str]):
    """Snapshot-style paths of every entry under ``root/name``, folders before contents."""
    for name in names:
        yield name
        path = root / name
        if path.is_dir() and not path.is_symlink():
            yield from walk(root, [f"{name}/{child}" for child in sorted(os.listdir(path))])


def set_mtimes(root: Path, names: list[str]):
    """Distinct nanosecond mtimes; deepest first, since writing in a folder changes its mtime."""
    paths = sorted(walk(root, names), key=lambda p: p.count("/"), reverse=True)
    for index, path in enumerate(paths):
        mtime = MTIME_BASE + index * MTIME_STEP
        os.utime(root / path, ns=(mtime, mtime), follow_symlinks=False)


def describe(path: Path) -> tuple:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", os.readlink(path), st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ("file", oct(stat.S_IMODE(st.st_mode)), st.st_size, st.st_mtime_ns, digest)


def manifest(root: Path, names: list[str]) -> dict[str, tuple]:
    """Kind, mode, size, mtime (ns) and content hash or link target of every entry."""
    return {path: describe(root / path) for path in walk(root, names) if os.path.lexists(root / path)}


def assert_restored(expected: dict[str, tuple], restored: Path, names: list[str],
                    source: Path | None = None):
    actual = manifest(restored, names)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    different = {p: (expected[p], actual[p]) for p in expected if expected[p] != actual[p]}
    assert not different, "restored entries differ (expected, restored):\n" + "\n".join(
        f"  {p}: {e} != {a}" for p, (e, a) in different.items())
    if source is not None:  # and every byte, not only the hashes
        for path, entry in expected.items():
            if entry[0] == "file":
                assert filecmp.cmp(source / path, restored / path, shallow=False), path


def listing(entries: dict[str, tuple]) -> list[str]:
    """What ``sdbackup ls`` should print for these entries, in path order."""
    lines = []
    for path in sorted(entries):
        entry = entries[path]
        suffix = "/" if entry[0] == "dir" else f" -> {entry[1]}" if entry[0] == "symlink" else ""
        lines.append(path + suffix)
    return lines


# --- reading the command's output ---------------------------------------------------------


def status_rows(cluster, stdout: str) -> dict[str, tuple[str, int]]:
    """``{server name: (state, chunks)}`` from ``sdbackup status``; one row per server."""
    rows = {}
    for line in stdout.splitlines():
        match = STATUS_ROW.match(line)
        if match is None:
            continue
        owners = [s for s in cluster.servers if match["address"].endswith(f":{s.port}")]
        assert len(owners) == 1, f"status row for no server of the cluster: {line!r}"
        assert owners[0].name not in rows, f"two status rows for {owners[0].name}:\n{stdout}"
        rows[owners[0].name] = (match["state"], int(match["chunks"]))
    return rows


def wait_for_status(cluster, tmp_path: Path, wanted, timeout: float = 20.0) -> dict:
    """Run ``sdbackup status`` until ``wanted(rows)`` holds (heartbeats bring counts)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.sdbackup("status", cwd=tmp_path)
        rows = status_rows(cluster, result.stdout)
        if wanted(rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"status never showed what was expected within {timeout} s; "
                        f"last rows {rows}:\n{result.describe()}")
        time.sleep(0.25)


def holder_ports(ls_line: str) -> set[int]:
    """Ports of the servers ``ls -l`` shows in brackets at the end of a line."""
    match = re.search(r"\[([^\]]*)\]\s*$", ls_line)
    assert match is not None, f"no servers shown in {ls_line!r}"
    return {int(port) for port in re.findall(r":(\d+)\b", match.group(1))}


@pytest.fixture
def src(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


# --- the tests ----------------------------------------------------------------------------


def test_backup_and_restore_keep_bytes_modes_and_mtimes(cluster, src, tmp_path):
    names = make_tree(src)
    expected = manifest(src, names)
    sid = cluster.backup(*names, cwd=src)

    result = cluster.sdbackup("restore", "latest", "--target", tmp_path / "out", cwd=tmp_path)

    assert sid in result.stdout
    assert result.stderr.strip() == ""
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
    assert_restored(expected, tmp_path / "out", names, source=src)


def test_snapshots_lists_id_host_and_paths(cluster, src, tmp_path):
    names = make_tree(src)
    sid = cluster.backup(*names, cwd=src)

    result = cluster.sdbackup("snapshots", cwd=tmp_path)

    rows = [line for line in result.stdout.splitlines() if line.split()[:1] == [sid]]
    assert len(rows) == 1, result.stdout
    assert socket.gethostname()[:16] in rows[0].split()
    assert rows[0].split()[-len(names):] == names


def test_second_backup_is_a_new_snapshot_and_the_first_stays_restorable(cluster, src, tmp_path):
    names = make_tree(src)
    first_state = manifest(src, names)
    first = cluster.backup(*names, cwd=src)
    # Change the source: new bytes and mtime, a file removed, a file added.
    write(src / "teste.txt", b"changed after the first backup\n")
    os.utime(src / "teste.txt", ns=(MTIME_BASE - 1, MTIME_BASE - 1))
    (src / "tree/with space/file name.txt").unlink()
    write(src / "tree/nested/added.bin", os.urandom(200_000))
    second_state = manifest(src, names)

    second = cluster.backup(*names, cwd=src)

    assert second != first
    listed = [line.split()[0] for line in cluster.sdbackup("snapshots", cwd=tmp_path).stdout.splitlines()[1:]]
    assert first in listed and second in listed
    assert listed.index(first) < listed.index(second)
    restored = cluster.sdbackup("restore", first, "--target", tmp_path / "first", cwd=tmp_path)
    assert first in restored.stdout
    assert_restored(first_state, tmp_path / "first", names)
    restored = cluster.sdbackup("restore", "latest", "--target", tmp_path / "second", cwd=tmp_path)
    assert second in restored.stdout
    assert_restored(second_state, tmp_path / "second", names)


def test_ls_lists_every_file_of_the_snapshot(cluster, src, tmp_path):
    names = make_tree(src)
    sid = cluster.backup(*names, cwd=src)
    expected = listing(manifest(src, names))

    latest = cluster.sdbackup("ls", "latest", cwd=tmp_path)
    by_id = cluster.sdbackup("ls", sid, cwd=tmp_path)
    default = cluster.sdbackup("ls", cwd=tmp_path)

    assert latest.stdout.splitlines() == expected
    assert by_id.stdout == latest.stdout
    assert default.stdout == latest.stdout


def test_restore_include_restores_only_those_paths(cluster, src, tmp_path):
    names = make_tree(src)
    everything = manifest(src, names)
    cluster.backup(*names, cwd=src)

    cluster.sdbackup("restore", "latest", "--target", tmp_path / "part",
                     "--include", "tree/nested", "--include", "teste.txt", cwd=tmp_path)

    wanted = {p: e for p, e in everything.items()
              if p in ("teste.txt", "tree") or p.startswith("tree/nested/") or p == "tree/nested"}
    assert_restored(wanted, tmp_path / "part", names, source=src)


def test_status_shows_each_server_alive_with_its_chunk_count(cluster, src, tmp_path):
    write(src / "teste.txt", os.urandom(2 * MiB + 5))
    cluster.backup("teste.txt", cwd=src)
    on_disk = {s.name: len(s.chunk_files()) for s in cluster.servers}
    assert sum(n > 0 for n in on_disk.values()) >= 2, on_disk

    rows = wait_for_status(cluster, tmp_path, lambda rows: rows == {
        name: ("alive", count) for name, count in on_disk.items()})

    assert len(rows) == len(cluster.servers)
    assert sum(chunks > 0 for _, chunks in rows.values()) >= 2


def chunk_size(server, chunk_id: str) -> int:
    path = server.chunk_dir / chunk_id[:2] / chunk_id
    return path.stat().st_size if path.exists() else 0


def test_every_chunk_is_on_exactly_two_of_the_three_servers(cluster, src, tmp_path):
    small = os.urandom(100_000)  # one chunk
    write(src / "small.bin", small)
    before = {s.name: s.chunk_files() for s in cluster.servers}
    cluster.backup("small.bin", cwd=src)
    after = {s.name: s.chunk_files() for s in cluster.servers}
    new = set().union(*after.values()) - set().union(*before.values())
    # The data chunk, the root tree (which holds small.bin) and the snapshot object.
    assert len(new) == 3, new
    for name in new:
        assert sum(name in after[s.name] for s in cluster.servers) == 2, name
    chunk, = (c for c in new if any((s.chunk_dir / c[:2] / c).exists() for s in cluster.servers)
              and max(chunk_size(s, c) for s in cluster.servers) > len(small))
    holders = [s for s in cluster.servers if chunk in after[s.name]]
    for server in holders:  # sealed (the repository is encrypted), and stored under its hash
        stored = (server.chunk_dir / chunk[:2] / chunk).read_bytes()
        assert small not in stored and hashing.chunk_id(stored[-(len(small) + OVERHEAD):]) == chunk
    line = cluster.sdbackup("ls", "--chunks", "latest", "small.bin", cwd=tmp_path).stdout.strip()
    assert line.endswith("]") and "small.bin" in line, line
    assert holder_ports(line) == {s.port for s in holders}

    write(src / "big.bin", os.urandom(4 * MiB + 77))
    before = after
    cluster.backup("big.bin", cwd=src)
    after = {s.name: s.chunk_files() for s in cluster.servers}
    new = set().union(*after.values()) - set().union(*before.values())
    assert len(new) >= 2, new
    copies = {c: sorted(s.name for s in cluster.servers if c in after[s.name]) for c in new}
    assert all(len(names) == 2 for names in copies.values()), copies
    for server in cluster.servers:
        assert os.listdir(server.data / "incoming") == [], f"{server.name} left files in incoming/"


def test_manager_option_overrides_the_environment(cluster, src, tmp_path):
    write(src / "teste.txt", b"via --manager\n")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        dead = f"tcp:127.0.0.1:{closed.getsockname()[1]}"
        result = cluster.sdbackup("backup", "--manager", cluster.manager_endpoint, "teste.txt",
                                  cwd=src, manager=dead)
        sid = cluster.snapshot_id(result.stdout)
        listed = cluster.sdbackup("--manager", cluster.manager_endpoint, "ls", sid, cwd=src, manager=dead)
    assert listed.stdout.splitlines() == ["teste.txt"]


@pytest.mark.parametrize("how", ["environment", "option"])
@pytest.mark.parametrize("command", [["snapshots"], ["status"], ["backup", "teste.txt"]])
def test_unreachable_manager_is_one_clear_error(run_sdbackup, tmp_path, command, how):
    write(tmp_path / "teste.txt", b"nobody will store this\n")
    env = {k: v for k, v in os.environ.items() if k != "SDBACKUP_MANAGER"}
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        endpoint = f"tcp:127.0.0.1:{port}"
        if how == "environment":
            env["SDBACKUP_MANAGER"] = endpoint
            args = command
        else:
            args = [command[0], "--manager", endpoint, *command[1:]]
        started = time.monotonic()
        result = run_sdbackup(*args, cwd=tmp_path, env=env, check=False, timeout=30)

    assert result.returncode == 1, result.describe()
    assert result.stdout == "", result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert "manager" in lines[0] and str(port) in lines[0], result.describe()
    assert time.monotonic() - started < 15


def run_in_terminal(argv: list, cwd: Path, env: dict, answer: bytes, timeout: float = 60.0):
    """Run ``argv`` on a pseudo-terminal, type ``answer`` at the prompt.

    Returns ``(exit status, everything the terminal showed)``.
    """
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    shown, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{argv} on a terminal did not finish in {timeout} s:\n{shown!r}")
            ready, _, _ = select.select([master], [], [], min(remaining, 0.5))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            shown += data
            if not answered and PROMPT in shown:
                os.write(master, answer + b"\n")
                answered = True
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), shown.decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_backup_without_a_path_asks_for_one_on_a_terminal(cluster, src, tmp_path):
    write(src / "teste.txt", b"typed at the prompt\n")

    status, shown = run_in_terminal(cluster.command("backup"), src, cluster.client_env(), b"teste.txt")

    assert PROMPT.decode() in shown
    assert status == 0, shown
    sid = cluster.snapshot_id(shown.replace("\r", ""))
    assert cluster.sdbackup("ls", sid, cwd=tmp_path).stdout.splitlines() == ["teste.txt"]
    cluster.sdbackup("restore", sid, "--target", tmp_path / "out", cwd=tmp_path)
    assert (tmp_path / "out/teste.txt").read_bytes() == b"typed at the prompt\n"


def test_backup_without_a_path_or_a_terminal_fails_clearly(cluster, src):
    result = cluster.sdbackup("backup", cwd=src, check=False)

    assert result.returncode == 1, result.describe()
    assert "snapshot" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()


def test_catalog_survives_a_manager_restart(cluster, src, tmp_path):
    names = make_tree(src)
    expected = manifest(src, names)
    sid = cluster.backup(*names, cwd=src)

    marks = cluster.restart_manager()

    listed = cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    assert sid in [line.split()[0] for line in listed.splitlines()[1:]], listed
    restored = cluster.sdbackup("restore", sid, "--target", tmp_path / "out", cwd=tmp_path)
    assert sid in restored.stdout
    assert_restored(expected, tmp_path / "out", names, source=src)
    # The servers reconnect by themselves; then the cluster takes backups again.
    cluster.wait_registered_since(marks)
    wait_for_status(cluster, tmp_path, lambda rows: len(rows) == len(cluster.servers) and all(
        state == "alive" for state, _ in rows.values()))
    write(src / "after restart.txt", os.urandom(300_000))
    after = cluster.backup("after restart.txt", cwd=src)
    cluster.sdbackup("restore", after, "--target", tmp_path / "after", cwd=tmp_path)
    assert filecmp.cmp(src / "after restart.txt", tmp_path / "after/after restart.txt", shallow=False)
