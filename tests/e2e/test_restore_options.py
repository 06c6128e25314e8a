"""Restore's --overwrite, --delete and --dry-run, the client's --quiet and --verbose, and a
storage server's port given as the manager's: real processes, real files (issue 9)."""

import json
import os
from pathlib import Path

import pytest
from test_cli import write

#: The source files' mtime (ns), and how far the target's are moved from it.
MTIME = 1_700_000_000_123_456_789
HOUR = 3600 * 10**9


def make_source(root: Path) -> Path:
    """``src/`` with three files whose target copies a test changes, and a subfolder."""
    src = root / "src"
    write(src / "changed.txt", b"the snapshot's changed.txt\n")
    write(src / "unchanged.txt", b"the snapshot's unchanged.txt\n")
    write(src / "newer.txt", b"the snapshot's newer.txt\n")
    write(src / "sub/inner.txt", b"inside sub\n")
    for path in (src / "changed.txt", src / "unchanged.txt", src / "newer.txt", src / "sub/inner.txt"):
        os.utime(path, ns=(MTIME, MTIME))
    return src


def change_target(target: Path):
    """In a restored copy: ``changed.txt`` rewritten with an older mtime, ``newer.txt`` rewritten
    with a newer one, ``unchanged.txt`` left as restored."""
    write(target / "src/changed.txt", b"edited after the restore, older\n")
    os.utime(target / "src/changed.txt", ns=(MTIME - HOUR, MTIME - HOUR))
    write(target / "src/newer.txt", b"edited after the restore, newer\n")
    os.utime(target / "src/newer.txt", ns=(MTIME + HOUR, MTIME + HOUR))


def inodes(target: Path) -> dict[str, int]:
    """Each file's inode: a restore that replaces a file links a new one in its place."""
    return {name: os.lstat(target / "src" / name).st_ino
            for name in ("changed.txt", "unchanged.txt", "newer.txt")}


def state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): kind, bytes or link target, mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", os.readlink(path), st.st_mtime_ns)
            elif path.is_dir():
                found[str(path.relative_to(root))] = ("dir", st.st_mtime_ns)
            else:
                found[str(path.relative_to(root))] = ("file", path.read_bytes(), st.st_mtime_ns)
    return found


@pytest.fixture
def restored(cluster, tmp_path):
    """A snapshot of ``make_source``, restored to ``tmp_path/out``, then changed there: its
    id and the target."""
    make_source(tmp_path)
    sid = cluster.backup("src", cwd=tmp_path)
    target = tmp_path / "out"
    cluster.sdbackup("restore", sid, "--target", target, cwd=tmp_path)
    change_target(target)
    return sid, target


#: Which of the three files each mode writes again (the others keep their inode and content).
REWRITTEN = {
    "always": {"changed.txt", "unchanged.txt", "newer.txt"},
    "if-changed": {"changed.txt", "newer.txt"},
    "if-newer": {"changed.txt"},
    "never": set(),
}
#: The summary's counts for each mode: files restored, unchanged (sub/inner.txt is one), kept.
COUNTS = {"always": (4, 0, 0), "if-changed": (2, 2, 0), "if-newer": (1, 2, 1), "never": (0, 2, 2)}


@pytest.mark.parametrize("mode", sorted(REWRITTEN))
def test_overwrite_modes_decide_which_existing_files_are_written(cluster, restored, tmp_path, mode):
    sid, target = restored
    before = inodes(target)
    edited = {name: (target / "src" / name).read_bytes() for name in before}

    result = cluster.sdbackup("restore", sid, "--target", target, "--overwrite", mode, cwd=tmp_path)

    after = inodes(target)
    rewritten = {name for name in before if after[name] != before[name]}
    assert rewritten == REWRITTEN[mode], result.describe()
    for name in before:
        content = (target / "src" / name).read_bytes()
        if name in rewritten or name == "unchanged.txt":
            assert content == (tmp_path / "src" / name).read_bytes(), name
            assert os.lstat(target / "src" / name).st_mtime_ns == MTIME
        else:
            assert content == edited[name], name  # kept as the user left it
    files, unchanged, kept = COUNTS[mode]
    assert f"restored to {target}: {files} files, 2 folders" in result.stdout, result.describe()
    assert (f"{unchanged} unchanged" in result.stdout) == bool(unchanged), result.describe()
    assert (f"{kept} kept (--overwrite)" in result.stdout) == bool(kept), result.describe()
    assert result.stdout.rstrip().endswith("every byte verified"), result.describe()


def test_delete_removes_what_the_snapshot_lacks_and_never_follows_a_link(cluster, restored,
                                                                        tmp_path):
    sid, target = restored
    outside = tmp_path / "outside"
    write(outside / "precious.txt", b"must survive\n")
    write(target / "src/extra.txt", b"not in the snapshot\n")
    write(target / "src/extra folder/deep/file.txt", b"not in the snapshot either\n")
    os.symlink(outside, target / "src/extra folder/link-out")
    os.symlink(outside, target / "src/sub/link-out")  # inside a folder the snapshot has
    os.symlink(outside, target / "src/link-out")

    kept = cluster.sdbackup("restore", sid, "--target", target, cwd=tmp_path)
    assert (target / "src/extra.txt").exists(), "without --delete, extra files stay"
    assert "deleted" not in kept.stdout

    result = cluster.sdbackup("restore", sid, "--target", target, "--delete", "--verbose",
                              cwd=tmp_path)

    assert sorted(os.listdir(target / "src")) == ["changed.txt", "newer.txt", "sub", "unchanged.txt"]
    assert os.listdir(target / "src/sub") == ["inner.txt"]
    assert (outside / "precious.txt").read_bytes() == b"must survive\n"
    assert os.listdir(outside) == ["precious.txt"]
    # extra.txt, link-out, sub/link-out, and the extra folder with deep/, file.txt, link-out.
    assert "7 deleted" in result.stdout, result.describe()
    for line in ("deleted src/extra.txt", "deleted src/extra folder", "deleted src/link-out",
                 "deleted src/sub/link-out"):
        assert line in result.stdout.splitlines(), result.describe()


def test_delete_with_include_removes_only_inside_what_is_selected(cluster, restored, tmp_path):
    sid, target = restored
    write(target / "src/extra.txt", b"outside the selection\n")
    write(target / "src/sub/extra.txt", b"inside the selection\n")

    result = cluster.sdbackup("restore", sid, "--target", target, "--include", "src/sub", "--delete",
                              cwd=tmp_path)

    assert (target / "src/extra.txt").read_bytes() == b"outside the selection\n"
    assert os.listdir(target / "src/sub") == ["inner.txt"]
    assert "1 deleted" in result.stdout, result.describe()


def test_a_link_where_the_snapshot_has_a_folder_is_not_entered(cluster, restored, tmp_path):
    sid, target = restored
    outside = tmp_path / "outside"
    write(outside / "precious.txt", b"must survive\n")
    (target / "src/sub/inner.txt").unlink()
    (target / "src/sub").rmdir()
    os.symlink(outside, target / "src/sub")

    result = cluster.sdbackup("restore", sid, "--target", target, "--delete", cwd=tmp_path,
                              check=False)

    assert result.returncode == 3, result.describe()
    assert "src/sub: exists and is not a folder" in result.stderr, result.describe()
    assert os.listdir(outside) == ["precious.txt"]
    assert (outside / "precious.txt").read_bytes() == b"must survive\n"


def test_dry_run_creates_no_target(cluster, tmp_path):
    make_source(tmp_path)
    sid = cluster.backup("src", cwd=tmp_path)

    result = cluster.sdbackup("restore", sid, "--target", tmp_path / "never", "--dry-run",
                              "--verbose", cwd=tmp_path)

    assert not (tmp_path / "never").exists()
    assert "dry run (nothing written or deleted): would restore 4 files, 2 folders" in result.stdout, \
        result.describe()
    listed = [line for line in result.stdout.splitlines() if line.startswith("would restore ")]
    assert sorted(listed) == [f"would restore src/{name}" for name in
                              ("changed.txt", "newer.txt", "sub/inner.txt", "unchanged.txt")]


def test_dry_run_changes_nothing_and_says_what_a_restore_would(cluster, restored, tmp_path):
    sid, target = restored
    write(target / "src/extra.txt", b"not in the snapshot\n")
    before = state(target)

    result = cluster.sdbackup("restore", sid, "--target", target, "--dry-run", "--delete",
                              "--verbose", cwd=tmp_path)

    assert state(target) == before
    lines = result.stdout.splitlines()
    assert sorted(line for line in lines if line.startswith("would ")) == [
        "would delete src/extra.txt", "would restore src/changed.txt", "would restore src/newer.txt"]
    assert "would restore 2 files" in result.stdout and "2 unchanged, 1 deleted" in result.stdout, \
        result.describe()


def test_dry_run_json_summary_counts(cluster, restored, tmp_path):
    sid, target = restored

    result = cluster.sdbackup("restore", sid, "--target", target, "--dry-run", "--json",
                              "--overwrite", "never", cwd=tmp_path)

    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["dry_run"] is True
    assert (summary["files_restored"], summary["files_unchanged"], summary["files_skipped"]) == (0, 2, 4)


def test_quiet_prints_nothing_on_success(cluster, tmp_path):
    make_source(tmp_path)
    backup = cluster.sdbackup("--quiet", "backup", "src", cwd=tmp_path)
    assert (backup.stdout, backup.stderr) == ("", ""), backup.describe()
    restore = cluster.sdbackup("restore", "latest", "--target", tmp_path / "out", "-q", cwd=tmp_path)
    assert (restore.stdout, restore.stderr) == ("", ""), restore.describe()
    assert (tmp_path / "out/src/sub/inner.txt").read_bytes() == b"inside sub\n"


def test_quiet_still_reports_errors(cluster, tmp_path):
    write(tmp_path / "occupied", b"a file, not a folder\n")
    result = cluster.sdbackup("restore", "latest", "--target", tmp_path / "occupied", "--quiet",
                              cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.startswith("sdbackup: cannot restore into"), \
        result.describe()


def test_quiet_and_verbose_together_are_a_usage_error(cluster, tmp_path):
    result = cluster.sdbackup("-q", "restore", "latest", "--target", tmp_path / "x", "-v",
                              cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--quiet and --verbose" in result.stderr, result.describe()
    assert not (tmp_path / "x").exists()


def test_verbose_restore_lists_each_file_written(cluster, restored, tmp_path):
    sid, target = restored

    result = cluster.sdbackup("restore", sid, "--target", target, "--verbose", cwd=tmp_path)

    listed = sorted(line for line in result.stdout.splitlines() if line.startswith("restored "))
    assert listed == ["restored src/changed.txt", "restored src/newer.txt"], result.describe()


def test_verbose_json_lines_are_json(cluster, restored, tmp_path):
    sid, target = restored

    result = cluster.sdbackup("restore", sid, "--target", target, "--verbose", "--json", cwd=tmp_path)

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    verbose = sorted(line["item"] for line in lines if line["message_type"] == "verbose_status")
    assert verbose == ["src/changed.txt", "src/newer.txt"], result.describe()
    assert lines[-1]["message_type"] == "summary" and lines[-1]["files_unchanged"] == 2


def test_a_storage_servers_port_is_named_as_one(cluster, tmp_path):
    server = cluster.servers[0]

    result = cluster.sdbackup("status", "--manager", f"127.0.0.1:{server.port}", cwd=tmp_path,
                              check=False)

    assert result.returncode == 1, result.describe()
    assert result.stderr.strip() == (
        f"sdbackup: tcp:127.0.0.1:{server.port} is a storage server, not the manager: give the "
        f"manager's address (--manager or $SDBACKUP_MANAGER)"), result.describe()
def test_verbose_backup_names_new_and_modified_files(cluster, tmp_path):
    make_source(tmp_path)
    # A host of its own: other tests of this module back up a "src" too, whose snapshot
    # would be this one's parent.
    first = cluster.sdbackup("backup", "src", "--verbose", "--host", "verbose", cwd=tmp_path)
    assert sorted(line for line in first.stdout.splitlines() if line.startswith("new ")) == [
        f"new src/{name}" for name in ("changed.txt", "newer.txt", "sub/inner.txt", "unchanged.txt")]
    write(tmp_path / "src/changed.txt", b"changed since the first backup\n")

    second = cluster.sdbackup("backup", "src", "--verbose", "--host", "verbose", cwd=tmp_path)

    listed = [line for line in second.stdout.splitlines()
              if line.startswith(("new ", "modified "))]
    assert listed == ["modified src/changed.txt"], second.describe()


