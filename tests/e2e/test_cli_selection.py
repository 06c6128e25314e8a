"""Selection on the command line, against a manager and three storage servers (real processes):
backup's excludes, tag files and ``--files-from``; restore's ``--include`` and ``--exclude``."""

import os
import stat
from pathlib import Path

from sdbackup.client.selection import CACHEDIR_SIGNATURE

LATIN1_NAME = b"caf\xe9.txt"  # not UTF-8: ls shows it as caf\xe9.txt


def write(path: Path | bytes, data: bytes = b"x"):
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def listed(cluster, cwd: Path, snapshot: str = "latest") -> set[str]:
    return set(cluster.sdbackup("ls", snapshot, cwd=cwd).stdout.splitlines())


def restored(root: Path) -> set[str]:
    """Every path under ``root``, relative, folders with a final /, names escaped as ls does."""
    found = set()
    for folder, dirs, files in os.walk(os.fsencode(root)):
        rel = os.path.relpath(folder, os.fsencode(root))
        for name in dirs:
            found.add(os.fsdecode(os.path.normpath(os.path.join(rel, name))) + "/")
        for name in files:
            found.add(os.fsdecode(os.path.normpath(os.path.join(rel, name))))
    return found


def make_source(src: Path):
    write(src / "keep.txt", os.urandom(5000))
    write(src / "a.o", os.urandom(3000))
    write(src / "build/deep/x.o")
    write(src / "build/readme.txt")
    write(src / "node_modules/pkg/index.js", os.urandom(20_000))
    write(src / "cache/CACHEDIR.TAG", CACHEDIR_SIGNATURE + b"\n# a cache\n")
    write(src / "cache/blob.bin", os.urandom(50_000))
    write(src / "cache/sub/more.bin")
    write(src / "notacache/CACHEDIR.TAG", b"Signature: something else\n")
    write(src / "notacache/data")
    write(src / "marked/.nobackup")
    write(src / "marked/data.bin", os.urandom(10_000))
    write(src / "docs/Notes.TMP")
    write(src / "docs/guide.md")
    write(os.fsencode(src / "docs") + b"/" + LATIN1_NAME)
    write(src / "docs/café.txt")  # the UTF-8 é: another name


def test_backup_excludes_leave_out_exactly_what_matches(cluster, tmp_path):
    src = tmp_path / "src"
    make_source(src)
    exclude_file = tmp_path / "excludes"
    exclude_file.write_bytes(b"# build products\n\n   *.o   \nnode_modules\n")

    result = cluster.sdbackup(
        "backup", "src", "--exclude-file", exclude_file, "--iexclude", "*.tmp",
        "--exclude", "caf\\xe9.txt", "--exclude-caches", "--exclude-if-present", ".nobackup",
        cwd=tmp_path)

    assert result.stderr == ""
    expected = {
        "src/", "src/keep.txt", "src/build/", "src/build/deep/", "src/build/readme.txt",
        "src/cache/", "src/cache/CACHEDIR.TAG", "src/notacache/", "src/notacache/CACHEDIR.TAG",
        "src/notacache/data", "src/marked/", "src/marked/.nobackup", "src/docs/",
        "src/docs/guide.md", "src/docs/café.txt",
    }
    assert listed(cluster, tmp_path) == expected
    # The summary counts what was backed up only: 8 files, 7 folders (src included).
    assert " 8 files, 7 folders," in result.stdout, result.stdout


def test_exclude_by_raw_bytes_and_negation(cluster, tmp_path):
    """A name that is not UTF-8, given raw by the shell; ``!`` brings back one excluded name."""
    src = tmp_path / "src"
    make_source(src)
    raw = os.fsdecode(LATIN1_NAME)  # what a shell passes: the byte itself

    cluster.sdbackup("backup", "src/docs", "--exclude", raw, "--exclude", "*.md",
                     "--exclude", "!guide.md", cwd=tmp_path)

    assert listed(cluster, tmp_path) == {"src/", "src/docs/", "src/docs/Notes.TMP",
                                         "src/docs/guide.md", "src/docs/café.txt"}


def test_files_from_lists_the_paths_to_back_up(cluster, tmp_path):
    src = tmp_path / "src"
    make_source(src)
    listing = tmp_path / "list"
    listing.write_text("# what to keep\n\nsrc/keep.txt\n  src/docs/*.md  \nsrc/marked\n")
    raw = tmp_path / "raw"
    raw.write_bytes(b"src/build/readme.txt\0")

    result = cluster.sdbackup("backup", "--files-from", listing, "--files-from-raw", raw,
                              "--exclude", "data.bin", cwd=tmp_path)

    assert result.stderr == ""
    assert listed(cluster, tmp_path) == {
        "src/", "src/keep.txt", "src/docs/", "src/docs/guide.md", "src/marked/",
        "src/marked/.nobackup", "src/build/", "src/build/readme.txt"}
    row = cluster.sdbackup("snapshots", cwd=tmp_path).stdout.splitlines()[-1]
    assert set(row.split()) >= {"src/keep.txt", "src/docs/guide.md", "src/marked",
                                "src/build/readme.txt"}


def test_selection_usage_errors_exit_2_before_anything_is_done(cluster, tmp_path):
    bad = cluster.sdbackup("backup", "x", "--exclude", "[abc", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "unclosed '['" in bad.stderr
    missing = cluster.sdbackup("backup", "x", "--exclude-file", tmp_path / "nope", cwd=tmp_path,
                               check=False)
    assert missing.returncode == 2 and "--exclude-file" in missing.stderr
    assert "No such file" in missing.stderr
    glob = tmp_path / "globs"
    glob.write_text("nothing/*.here\n")
    unmatched = cluster.sdbackup("backup", "--files-from", glob, cwd=tmp_path, check=False)
    assert unmatched.returncode == 2 and "'nothing/*.here' matches no file" in unmatched.stderr
    restore = cluster.sdbackup("restore", "latest", "--target", tmp_path / "t", "--include", "a[",
                               cwd=tmp_path, check=False)
    assert restore.returncode == 2 and "unclosed '['" in restore.stderr
    assert not (tmp_path / "t").exists()


def backed_up_tree(cluster, tmp_path) -> str:
    src = tmp_path / "src"
    write(src / "top.txt")
    write(src / "docs/a.txt", os.urandom(3000))
    write(src / "docs/b.md")
    write(src / "docs/sub/c.txt", os.urandom(2_000_000))
    write(src / "docs/sub/d.bin")
    write(src / "media/e.bin")
    write(src / "media/empty/f.bin")
    write(os.fsencode(src / "media") + b"/" + LATIN1_NAME)
    (src / "docs/sub").chmod(0o750)
    os.utime(src / "docs/sub", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    return cluster.backup("src", cwd=tmp_path)


def test_restore_include_glob_restores_matches_and_the_folders_above_them(cluster, tmp_path):
    snapshot = backed_up_tree(cluster, tmp_path)
    target = tmp_path / "out"

    cluster.sdbackup("restore", snapshot, "--target", target, "--include", "*.txt", cwd=tmp_path)

    assert restored(target) == {"src/", "src/top.txt", "src/docs/", "src/docs/a.txt",
                                "src/docs/sub/", "src/docs/sub/c.txt", "src/media/",
                                "src/media/caf\udce9.txt"}
    # A folder above an included entry has the snapshot's metadata; no empty folder is made.
    sub = os.lstat(target / "src/docs/sub")
    assert stat.S_IMODE(sub.st_mode) == 0o750 and sub.st_mtime_ns == 1_500_000_000_123_456_789
    assert (target / "src/docs/sub/c.txt").read_bytes() == (tmp_path / "src/docs/sub/c.txt").read_bytes()


def test_restore_include_and_exclude_together(cluster, tmp_path):
    snapshot = backed_up_tree(cluster, tmp_path)
    target = tmp_path / "out"

    cluster.sdbackup("restore", snapshot, "--target", target, "--include", "./src/docs/",
                     "--include", "/src/media/caf\\xe9.txt", "--exclude", "*.md",
                     "--exclude", "sub/d.bin", cwd=tmp_path)

    assert restored(target) == {"src/", "src/docs/", "src/docs/a.txt", "src/docs/sub/",
                                "src/docs/sub/c.txt", "src/media/", "src/media/caf\udce9.txt"}


def test_restore_exclude_alone(cluster, tmp_path):
    snapshot = backed_up_tree(cluster, tmp_path)
    target = tmp_path / "out"

    cluster.sdbackup("restore", snapshot, "--target", target, "--exclude", "media",
                     "--exclude", "/src/docs/sub", cwd=tmp_path)

    assert restored(target) == {"src/", "src/top.txt", "src/docs/", "src/docs/a.txt",
                                "src/docs/b.md"}


def test_an_include_that_matches_nothing_fails_and_makes_no_target(cluster, tmp_path):
    snapshot = backed_up_tree(cluster, tmp_path)
    target = tmp_path / "out"

    result = cluster.sdbackup("restore", snapshot, "--target", target, "--include", "src/docs",
                              "--include", "*.jpg", cwd=tmp_path, check=False)

    assert result.returncode == 1, result.describe()
    assert f"--include '*.jpg': matches nothing in snapshot {snapshot}" in result.stderr
    assert not target.exists()
    # Matching only what an --exclude leaves out is matching nothing.
    excluded = cluster.sdbackup("restore", snapshot, "--target", target, "--include", "src/media",
                                "--exclude", "media", cwd=tmp_path, check=False)
    assert excluded.returncode == 1 and "matches nothing" in excluded.stderr
    assert not target.exists()
