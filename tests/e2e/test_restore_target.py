"""Restoring where something already is: the rough edges a new user met (issue 9)."""

import os

from test_cli import write


def test_restoring_again_over_links_to_folders_succeeds(cluster, tmp_path):
    src = tmp_path / "src"
    write(src / "real/file.txt", b"inside the real folder\n")
    os.symlink("real", src / "link-to-folder")
    sid = cluster.backup("src", cwd=tmp_path)
    target = tmp_path / "out"

    for _ in range(2):  # the second time, every entry is already there
        result = cluster.sdbackup("restore", sid, "--target", target, cwd=tmp_path)
        assert "every byte verified" in result.stdout, result.describe()

    assert os.readlink(target / "src/link-to-folder") == "real"
    assert (target / "src/real/file.txt").read_bytes() == b"inside the real folder\n"


def test_a_target_that_is_a_file_is_one_clear_error_and_the_file_is_kept(cluster, tmp_path):
    write(tmp_path / "a.txt", b"backed up\n")
    sid = cluster.backup("a.txt", cwd=tmp_path)
    write(tmp_path / "occupied", b"not a folder\n")

    result = cluster.sdbackup("restore", sid, "--target", tmp_path / "occupied", cwd=tmp_path,
                              check=False)

    assert result.returncode == 1, result.describe()
    assert result.stderr.startswith("sdbackup: cannot restore into"), result.describe()
    assert "Traceback" not in result.stderr
    assert (tmp_path / "occupied").read_bytes() == b"not a folder\n"


def test_an_unknown_snapshot_creates_no_target(cluster, tmp_path):
    result = cluster.sdbackup("restore", "0123abcd", "--target", tmp_path / "never", cwd=tmp_path,
                              check=False)

    assert result.returncode == 1, result.describe()
    assert "0123abcd" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
