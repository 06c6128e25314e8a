"""``snapshots`` filters, ``tag``, ``diff``, ``find`` and ``dump`` against a real cluster, as a
user (or a script, with ``--json``) runs them."""

import io
import json
import os
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from sdbackup.names import unescape

#: A name that is not UTF-8: dump's tar and find's JSON must keep its exact bytes.
ODD = b"caf\xe9.txt"
MiB = 1024 * 1024
REBUILD_TIMEOUT = 30.0


def make_tree(root: Path):
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "keep.txt").write_bytes(b"kept\n")
    (src / "change.txt").write_bytes(b"before\n")
    (src / "gone.txt").write_bytes(b"going\n")
    (src / "sub" / "big.bin").write_bytes(os.urandom(3 * MiB + 5))
    with open(os.path.join(os.fsencode(src), ODD), "wb") as f:
        f.write(b"odd\n")
    os.symlink("keep.txt", src / "link")
    os.chmod(src / "keep.txt", 0o640)
    return src


def json_lines(result) -> list:
    assert result.stderr == "", result.describe()
    return [json.loads(line) for line in result.stdout.splitlines()]


def listing(cluster, cwd, *args) -> list[dict]:
    result = cluster.sdbackup("snapshots", "--json", *args, cwd=cwd)
    assert result.stderr == "", result.describe()
    return json.loads(result.stdout)


def dump(cluster, cwd, *args) -> subprocess.CompletedProcess:
    """``sdbackup dump ARGS``, its stdout as bytes."""
    return subprocess.run(cluster.command("dump", *args), cwd=cwd, env=cluster.client_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def two_backups(cluster, tmp_path_factory):
    """Two snapshots of one folder: between them a file added, one removed, one changed."""
    root = tmp_path_factory.mktemp("commands")
    src = make_tree(root)
    first = cluster.sdbackup("backup", "src", "--tag", "daily", "--host", "alpha", cwd=root)
    (src / "new.txt").write_bytes(b"new file\n")
    (src / "gone.txt").unlink()
    (src / "change.txt").write_bytes(b"after, and longer\n")
    second = cluster.sdbackup("backup", "src", "--tag", "weekly", "--host", "beta", cwd=root)
    return root, cluster.snapshot_id(first.stdout), cluster.snapshot_id(second.stdout)


def test_snapshots_filters_select_by_host_path_tag_and_latest(cluster, two_backups):
    root, first, second = two_backups
    ours = {first, second}

    def ids(*args):
        return [s["id"][:8] for s in listing(cluster, root, *args) if s["id"][:8] in ours]

    assert ids() == [first, second]
    assert ids("--host", "alpha") == [first]
    assert ids("--host", "alpha", "--host", "beta") == [first, second]
    assert ids("--tag", "weekly") == [second]
    assert ids("--tag", "daily,weekly") == []
    assert ids("--tag", "daily", "--tag", "weekly") == [first, second]
    assert ids("--path", "src", "--host", "beta") == [second]
    assert ids("--path", "elsewhere") == []
    assert ids("--latest", "1", "--host", "alpha") == [first]
    text = cluster.sdbackup("snapshots", "--tag", "weekly", cwd=root).stdout
    assert second in text and first not in text


def test_diff_shows_added_removed_and_changed_paths_with_the_size_change(cluster, two_backups):
    root, first, second = two_backups
    result = cluster.sdbackup("diff", first, second, cwd=root)
    assert result.stderr == "", result.describe()
    lines = result.stdout.splitlines()
    assert lines[0] == f"comparing snapshot {first} to {second}:"
    changes = sorted(line for line in lines if line[:1] in "+-MTU" and line[1:5] == "    ")
    assert changes == ["+    /src/new.txt", "-    /src/gone.txt", "M    /src/change.txt"], result.stdout
    assert any(line.startswith("Files:") and "1 new" in line and "1 removed" in line
               and "1 changed" in line for line in lines), result.stdout
    assert any("Size:" in line for line in lines), result.stdout

    # --metadata adds the folder whose mtime changed; --json is restic's lines.
    with_metadata = cluster.sdbackup("diff", "--metadata", first, second, cwd=root).stdout
    assert "U    /src/" in with_metadata.splitlines()
    *changes, stats = json_lines(cluster.sdbackup("diff", first, second, "--json", cwd=root))
    assert sorted((c["modifier"], c["path"]) for c in changes) == [
        ("+", "/src/new.txt"), ("-", "/src/gone.txt"), ("M", "/src/change.txt")]
    assert all(c["message_type"] == "change" for c in changes)
    assert stats["message_type"] == "statistics" and stats["changed_files"] == 1
    assert stats["source_snapshot"].startswith(first) and stats["target_snapshot"].startswith(second)
    assert stats["added"]["files"] == 1 and stats["added"]["bytes"] == len(b"new file\n")
    assert stats["removed"]["files"] == 1 and stats["removed"]["bytes"] == len(b"going\n")
    assert stats["bytes_change"] == (len(b"new file\n") - len(b"going\n")
                                     + len(b"after, and longer\n") - len(b"before\n"))
    # A snapshot compared with itself has no change.
    same = json_lines(cluster.sdbackup("diff", first, first, "--json", cwd=root))
    assert [m["message_type"] for m in same] == ["statistics"]


def test_find_names_the_snapshots_holding_matching_paths(cluster, two_backups):
    root, first, second = two_backups
    result = cluster.sdbackup("find", "*.txt", "--snapshot", first, "--snapshot", second, cwd=root)
    assert result.stderr == "", result.describe()
    text = result.stdout
    assert f"Found matching entries in snapshot {first}" in text
    assert f"Found matching entries in snapshot {second}" in text
    assert "src/gone.txt" in text.split(second)[0] and "src/gone.txt" not in text.split(second)[1]
    assert " 5 " in next(line for line in text.splitlines() if line.endswith("src/keep.txt"))

    found = json.loads(cluster.sdbackup("find", "*.bin", "caf*", "--json", "--snapshot", first,
                                        "--snapshot", second, cwd=root).stdout)
    assert [f["snapshot"][:8] for f in found] == [first, second]
    for entry in found:
        paths = {unescape(m["path"]): m for m in entry["matches"]}
        assert set(paths) == {b"src/sub/big.bin", b"src/" + ODD}
        assert entry["hits"] == 2 and paths[b"src/sub/big.bin"]["size"] == 3 * MiB + 5
        assert paths[b"src/sub/big.bin"]["mtime"]
    # A pattern with / matches whole paths; one that matches nothing finds nothing.
    by_path = json.loads(cluster.sdbackup("find", "src/*/big.bin", "--json", "--snapshot", second,
                                          cwd=root).stdout)
    assert [m["path"] for m in by_path[0]["matches"]] == ["src/sub/big.bin"]
    assert json.loads(cluster.sdbackup("find", "nothing*", "--json", "--snapshot", second,
                                       cwd=root).stdout) == []


def test_dump_writes_a_file_byte_for_byte_and_a_folder_as_a_tar(cluster, two_backups, tmp_path):
    root, _first, second = two_backups
    src = root / "src"
    big = dump(cluster, root, second, "src/sub/big.bin")
    assert big.returncode == 0 and big.stderr == b"", big.stderr
    assert big.stdout == (src / "sub" / "big.bin").read_bytes()

    folder = dump(cluster, root, second, "src")
    assert folder.returncode == 0, folder.stderr
    with tarfile.open(fileobj=io.BytesIO(folder.stdout), mode="r|",
                      encoding="utf-8", errors="surrogateescape") as tar:
        tar.extractall(tmp_path, filter="fully_trusted")
    with tarfile.open(fileobj=io.BytesIO(folder.stdout), mode="r:") as tar:
        # The pax header holds the exact nanoseconds (Python's tarfile reads them as a float).
        mtime = os.stat(src / "keep.txt").st_mtime_ns
        assert tar.getmember("src/keep.txt").pax_headers["mtime"] == (
            f"{mtime // 10**9}.{mtime % 10**9:09d}")
    out = tmp_path / "src"
    for path in src.rglob("*"):
        twin = out / path.relative_to(src)
        if path.is_symlink():
            assert os.readlink(twin) == os.readlink(path)
            continue
        assert twin.exists(), twin
        assert os.stat(twin).st_mode == os.stat(path).st_mode, twin
        if path.is_file():
            assert twin.read_bytes() == path.read_bytes(), twin
            assert abs(os.stat(twin).st_mtime_ns - os.stat(path).st_mtime_ns) < 1000, twin
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        p.relative_to(src) for p in src.rglob("*"))
    assert (os.fsencode(out) + b"/" + ODD) in [os.fsencode(p) for p in out.iterdir()]

    missing = dump(cluster, root, second, "src/nope")
    assert missing.returncode == 1 and b"not in snapshot" in missing.stderr


def test_tag_replaces_the_snapshot_and_a_rebuilt_index_lists_the_same(
        start_cluster, fast_manager_options, tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options)
    make_tree(tmp_path)
    first = cluster.backup("src", cwd=tmp_path)
    other = cluster.backup("src", cwd=tmp_path)

    added = json_lines(cluster.sdbackup("tag", "--add", "a", "--add", "b,c", first, "--json",
                                        cwd=tmp_path))
    (changed, summary) = added
    assert changed["message_type"] == "changed" and changed["old_snapshot_id"].startswith(first)
    assert changed["tags"] == ["a", "b", "c"] and summary["changed_snapshots"] == 1
    tagged = changed["new_snapshot_id"]
    removed = cluster.sdbackup("tag", "--remove", "b", tagged[:8], cwd=tmp_path)
    assert "modified tags on 1 snapshots" in removed.stdout, removed.describe()
    listed = listing(cluster, tmp_path)
    ids = [s["id"] for s in listed]
    assert len(ids) == 2 and not any(i.startswith(first) or i == tagged for i in ids), ids
    (now,) = [s for s in listed if not s["id"].startswith(other)]
    assert now["tags"] == ["a", "c"] and now["paths"] == ["src"]
    assert now["hostname"] == socket.gethostname()
    # Tagging back to earlier tags makes a new version again, listed in its turn.
    back = json_lines(cluster.sdbackup("tag", "--set", "a", "--set", "b,c", now["id"][:8], "--json",
                                       cwd=tmp_path))
    assert back[0]["new_snapshot_id"] != tagged
    assert [s["tags"] for s in listing(cluster, tmp_path, "--tag", "b")] == [["a", "b", "c"]]
    # The same content under its new id: ls and restore read it.
    restored = tmp_path / "restored"
    cluster.sdbackup("restore", back[0]["new_snapshot_id"][:8], "--target", restored, cwd=tmp_path)
    assert (restored / "src" / "keep.txt").read_bytes() == b"kept\n"
    unchanged = cluster.sdbackup("tag", "--add", "a", back[0]["new_snapshot_id"][:8], cwd=tmp_path)
    assert "modified tags on 0 snapshots" in unchanged.stdout

    before = listing(cluster, tmp_path)
    marks = cluster.restart_manager(wipe_catalog=True)
    cluster.wait_registered_since(marks)
    deadline = time.monotonic() + REBUILD_TIMEOUT
    while True:
        result = cluster.sdbackup("snapshots", "--json", cwd=tmp_path, check=False)
        if result.returncode == 0 and json.loads(result.stdout) == before:
            break
        assert time.monotonic() < deadline, (result.describe(), before)
        time.sleep(0.3)


def test_tag_usage_errors_exit_2(cluster, tmp_path):
    for args in (("tag", "abc"), ("tag", "--set", "x", "--add", "y", "abc"), ("tag", "--add", "x")):
        result = cluster.sdbackup(*args, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.describe()
