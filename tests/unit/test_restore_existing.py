"""Restoring over what is already there: ``--overwrite``'s decision (pure), and the writer's
survey of existing folders, ``--delete``'s removal (never through a link) and dry runs, with
real files and no cluster."""

import os
import subprocess

import blake3
import pytest

from sdbackup.client.cli import restore_line
from sdbackup.client.fswriter import FileSystemWriter
from sdbackup.client.overwrite import MODES, Action, Existing, decide
from sdbackup.client.restore import RestoreResult
from sdbackup.objects import Node

MTIME = 1_600_000_000_123_456_789
HOUR = 3600 * 10**9


def file_node(data: bytes, mtime_ns: int = MTIME, name: bytes = b"f") -> Node:
    return Node(name=name, type="file", size=len(data), mode=0o644, mtime_ns=mtime_ns,
                atime_ns=mtime_ns, hash=blake3.blake3(data).digest())


def folder_node(name: bytes) -> Node:
    return Node(name=name, type="dir", mode=0o755, mtime_ns=MTIME, atime_ns=MTIME)


SNAPSHOT_FILE = file_node(b"twelve bytes")
SAME = Existing("file", 12, MTIME)
OLDER_DIFFERENT = Existing("file", 5, MTIME - HOUR)
NEWER_DIFFERENT = Existing("file", 5, MTIME + HOUR)
SAME_TIME_OTHER_SIZE = Existing("file", 13, MTIME)
A_LINK = Existing("symlink", 12, MTIME)

W, U, K = Action.WRITE, Action.UNCHANGED, Action.KEEP


@pytest.mark.parametrize(("existing", "expected"), [
    # existing:                 always  if-changed  if-newer  never
    (None,                      (W,      W,          W,        W)),
    (SAME,                      (W,      U,          U,        U)),
    (OLDER_DIFFERENT,           (W,      W,          W,        K)),
    (NEWER_DIFFERENT,           (W,      W,          K,        K)),
    (SAME_TIME_OTHER_SIZE,      (W,      W,          K,        K)),
    (A_LINK,                    (W,      W,          K,        K)),
])
def test_decide(existing, expected):
    modes = ("always", "if-changed", "if-newer", "never")
    assert tuple(decide(mode, SNAPSHOT_FILE, existing) for mode in modes) == expected


def test_a_link_is_unchanged_when_its_target_length_and_mtime_match():
    link = Node(name=b"l", type="symlink", target=b"a.txt", mtime_ns=MTIME, atime_ns=MTIME)
    assert decide("if-changed", link, Existing("symlink", 5, MTIME)) is Action.UNCHANGED
    assert decide("if-changed", link, Existing("symlink", 6, MTIME)) is Action.WRITE


def test_an_unknown_mode_is_refused():
    assert "if-changed" in MODES
    with pytest.raises(ValueError, match="sometimes"):
        decide("sometimes", SNAPSHOT_FILE, OLDER_DIFFERENT)


def test_existing_reads_type_size_and_mtime_without_following_links(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    os.utime(tmp_path / "f", ns=(MTIME, MTIME))
    os.symlink("f", tmp_path / "l")
    assert Existing.of(os.lstat(tmp_path / "f")) == Existing("file", 3, MTIME)
    assert Existing.of(os.lstat(tmp_path / "l")).type == "symlink"


# --- the writer ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_bytes(b"must survive\n")
    return folder


def test_an_existing_folder_is_surveyed_and_a_new_one_holds_nothing(tmp_path):
    target = tmp_path / "t"
    (target / "old").mkdir(parents=True)
    (target / "old/a.txt").write_bytes(b"abc")
    writer = FileSystemWriter(str(target), survey=True)
    try:
        old = writer.make_folder(writer.root, folder_node(b"old"))
        new = writer.make_folder(writer.root, folder_node(b"new"))
        assert set(writer.root.existing) == {b"old"}
        assert old.existing == {b"a.txt": Existing.of(os.lstat(target / "old/a.txt"))}
        assert new.existing == {}
    finally:
        writer.close()


def test_remove_entries_takes_folders_whole_and_only_unlinks_links(tmp_path, outside):
    target = tmp_path / "t"
    (target / "extra/deep").mkdir(parents=True)
    (target / "extra/deep/f").write_bytes(b"x")
    os.symlink(outside, target / "extra/link-out")
    os.symlink(outside, target / "link-out")
    (target / "kept").write_bytes(b"kept")
    writer = FileSystemWriter(str(target), survey=True)
    try:
        removed, errors = writer.remove_entries(writer.root, [b"extra", b"link-out"])
    finally:
        writer.close()

    assert errors == []
    assert removed == [((b"extra",), 4), ((b"link-out",), 1)]
    assert os.listdir(target) == ["kept"]
    assert sorted(os.listdir(outside)) == ["precious.txt"]


def test_a_dry_run_makes_no_target_and_removes_nothing(tmp_path):
    missing = tmp_path / "missing"
    writer = FileSystemWriter(str(missing), dry_run=True)
    folder = writer.make_folder(writer.root, folder_node(b"sub"))
    writer.finish_folder(folder)
    writer.sync()
    writer.close()
    assert not missing.exists()

    target = tmp_path / "t"
    (target / "extra").mkdir(parents=True)
    (target / "extra/f").write_bytes(b"x")
    writer = FileSystemWriter(str(target), dry_run=True)
    try:
        removed, _ = writer.remove_entries(writer.root, [b"extra"])
    finally:
        writer.close()
    assert removed == [((b"extra",), 2)]
    assert (target / "extra/f").read_bytes() == b"x"


# --- the summary -------------------------------------------------------------------------


def test_the_summary_claims_every_byte_verified_only_when_nothing_failed():
    done = RestoreResult("ab" * 32, files=3, folders=1, bytes=2048, unchanged=2, skipped=1,
                         deleted=4)
    assert restore_line(done, "out") == (
        "snapshot abababab restored to out: 3 files, 1 folders, 0 links and special files, 2.0 KiB, "
        "2 unchanged, 1 kept (--overwrite), 4 deleted; every byte verified")
    failed = RestoreResult("ab" * 32, files=3, errors=["a: gone"] * 42)
    line = restore_line(failed, "out")
    assert "every byte verified" not in line
    assert line.endswith("; 42 entries failed and were not restored; what was written is verified")


def test_a_dry_run_summary_says_nothing_was_written():
    line = restore_line(RestoreResult("ab" * 32, files=2, deleted=1, dry_run=True), "out")
    assert line.startswith("snapshot abababab into out, dry run (nothing written or deleted): "
                           "would restore 2 files")
    assert "verified" not in line


def test_temporary_files_a_killed_restore_left_are_removed_but_not_a_live_ones(tmp_path):
    """On a file system without O_TMPFILE a restore writes under ``.sdbackup-PID-N.tmp``; one
    killed before it renamed them leaves them, and the next restore into the target removes
    them (not those of a restore still running)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    left = [target / f".sdbackup-{gone.pid}-0.tmp", target / f"sub/.sdbackup-{gone.pid}-7.tmp"]
    running = target / f".sdbackup-{os.getppid()}-0.tmp"
    mine = target / "sub/.sdbackup-12-x.tmp"  # not a restore's name
    for path in [*left, running, mine]:
        path.write_bytes(b"partial")

    writer = FileSystemWriter(str(target))
    writer.close_folder(writer.make_folder(writer.root, folder_node(b"sub")))
    writer.close()

    assert [p.exists() for p in left] == [False, False]
    assert running.exists() and mine.exists()
