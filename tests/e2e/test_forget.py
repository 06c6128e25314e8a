"""``sdbackup forget`` against a manager and three storage servers, all real processes."""

import os
import re

MiB = 1024 * 1024


def listed_ids(cluster, cwd) -> list[str]:
    lines = cluster.sdbackup("snapshots", cwd=cwd).stdout.splitlines()[1:]
    return [line.split()[0] for line in lines]


def test_forget_keep_last_leaves_one_that_restores(cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids, contents = [], []
    for n in range(3):
        contents.append(os.urandom(MiB + n))
        (src / "file.bin").write_bytes(contents[-1])
        ids.append(cluster.backup("file.bin", cwd=src))
    assert len(set(ids)) == 3

    # No policy and no ids: refused before anything is asked (restic too will not forget all).
    refused = cluster.sdbackup("forget", cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert "refusing to forget every snapshot" in refused.stderr

    dry = cluster.sdbackup("forget", "--keep-last", "1", "--dry-run", cwd=tmp_path)
    assert "2 snapshots would be forgotten" in dry.stdout
    assert listed_ids(cluster, tmp_path) == ids

    result = cluster.sdbackup("forget", "--keep-last", "1", cwd=tmp_path)
    out = result.stdout
    assert "Applying Policy: keep 1 latest snapshots" in out
    assert re.search(rf"^keep 1 snapshots:\n.*REASONS.*\n{ids[2]}\s.*last snapshot", out, re.M), out
    assert re.search(rf"^remove 2 snapshots:\n.*\n{ids[1]}\s.*\n{ids[0]}\s", out, re.M), out
    assert "2 snapshots forgotten" in out

    assert listed_ids(cluster, tmp_path) == [ids[2]]
    restored = cluster.sdbackup("restore", ids[2], "--target", tmp_path / "out", cwd=tmp_path)
    assert "every byte verified" in restored.stdout
    assert (tmp_path / "out" / "file.bin").read_bytes() == contents[2]
    # A forgotten one is no longer there to restore.
    gone = cluster.sdbackup("restore", ids[0], "--target", tmp_path / "gone", cwd=tmp_path,
                            check=False)
    assert gone.returncode == 1 and f"no snapshot '{ids[0]}'" in gone.stderr

    # By id (a prefix will do): that one only.
    (src / "file.bin").write_bytes(os.urandom(1000))
    newest = cluster.backup("file.bin", cwd=src)
    by_id = cluster.sdbackup("forget", ids[2][:6], cwd=tmp_path)
    assert "1 snapshots forgotten" in by_id.stdout
    assert listed_ids(cluster, tmp_path) == [newest]
