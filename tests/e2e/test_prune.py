"""``sdbackup prune`` and ``forget --prune`` with real processes, while a backup runs.

The backup is held in the middle (SIGSTOP once it has stored part of its data, SIGCONT after
the prune): what it stored, and the unchanged file it took from a parent that the prune's
``forget`` removed, are unreachable from every listed snapshot when the prune runs, and older
than nothing but the grace period. The grace is short here (``--prune-grace``), so data of a
snapshot forgotten before the backup is old enough to go: the prune frees it, and the backup
still ends with a snapshot that restores exactly.
"""

import json
import os
import signal
import time

MiB = 1024 * 1024
#: The manager's grace here: longer than the part of the backup before the prune starts.
GRACE = 15.0


def random_file(path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def files_under(folder) -> dict[str, bytes]:
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def test_a_prune_during_a_backup_loses_nothing_and_frees_the_forgotten_data(start_cluster,
                                                                            tmp_path):
    cluster = start_cluster(manager_options=["--prune-grace", GRACE, "--prune-rate", 100_000])
    src, other = tmp_path / "src", tmp_path / "other"
    random_file(src / "keep.bin", 4 * MiB)  # unchanged: the backup takes it from its parent
    random_file(src / "old.bin", 4 * MiB)
    parent = cluster.backup("src", cwd=tmp_path)
    random_file(other / "gone.bin", 6 * MiB)
    doomed = cluster.backup("other", cwd=tmp_path)
    cluster.sdbackup("forget", doomed, cwd=tmp_path)
    # The forgotten snapshot's data (and the parent's) become older than the grace.
    time.sleep(GRACE + 1)

    (src / "old.bin").unlink()
    for n in range(12):
        random_file(src / f"new{n}.bin", 4 * MiB)
    expected = files_under(src)
    before_backup = cluster.data_bytes()
    backup = cluster.start_sdbackup("backup", "src", cwd=tmp_path)
    deadline = time.monotonic() + 60
    while cluster.data_bytes() < before_backup + 6 * MiB:  # some of its chunks are stored
        assert backup.running(), backup.wait().describe()
        assert time.monotonic() < deadline, "the backup stored nothing within 60 s"
        time.sleep(0.02)
    backup.popen.send_signal(signal.SIGSTOP)
    try:
        assert backup.running()
        dry = cluster.sdbackup("prune", "--dry-run", "--json", cwd=tmp_path)
        would = json.loads(dry.stdout)
        assert would["dry_run"] and would["state"] == "done"
        before = cluster.data_bytes()
        started = time.monotonic()
        # Its parent is forgotten (and pruned) while it runs, too.
        pruned = cluster.sdbackup("forget", parent, "--prune", "--json", cwd=tmp_path)
        took = time.monotonic() - started
        after = cluster.data_bytes()
    finally:
        backup.popen.send_signal(signal.SIGCONT)
    result = backup.wait(120)
    assert result.returncode == 0, result.describe()
    snapshot_id = cluster.snapshot_id(result.stdout)

    # Nothing it stored or counted on was lost.
    restored = cluster.sdbackup("restore", snapshot_id, "--target", tmp_path / "out",
                                cwd=tmp_path)
    assert "every byte verified" in restored.stdout
    assert files_under(tmp_path / "out" / "src") == expected
    check = cluster.sdbackup("check", cwd=tmp_path)
    assert "snapshots reference 0 missing chunks" in check.stdout

    summary = json.loads(pruned.stdout)
    prune = summary["prune"]
    assert summary["forgotten"] == 1 and prune["state"] == "done" and not prune["dry_run"]
    print(f"prune during a backup: {before} bytes on the servers before, {after} after "
          f"({prune['freed_bytes']} freed, {prune['deleted_copies']} copies deleted, "
          f"{prune['spared_recent_chunks']} chunks spared as recent); prune took "
          f"{prune['duration_seconds']:.2f} s ({took:.2f} s for the command)")
    # The forgotten snapshot's 6 MiB, twice, went (and the parent's snapshot object, which
    # forget deletes); the backup's chunks stayed.
    assert prune["spared_recent_chunks"] > 0
    assert 2 * 6 * MiB <= prune["freed_bytes"] <= before - after < 2 * 6 * MiB * 1.01
    assert would["freed_bytes"] == prune["freed_bytes"]

    # A plain prune now: the grace has not passed for the parent's data, so nothing goes.
    again = json.loads(cluster.sdbackup("prune", "--json", cwd=tmp_path).stdout)
    assert again["state"] == "done" and again["deleted_copies"] == 0
    listed = cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    assert snapshot_id in listed and parent not in listed and doomed not in listed


def test_prune_prints_its_summary(start_cluster, tmp_path):
    cluster = start_cluster(manager_options=["--prune-grace", 0])
    src = tmp_path / "src"
    random_file(src / "a.bin", 2 * MiB)
    first = cluster.backup("src", cwd=tmp_path)
    random_file(src / "a.bin", 2 * MiB)
    cluster.backup("src", cwd=tmp_path)
    forgotten = cluster.sdbackup("forget", "--keep-last", "1", "--prune", cwd=tmp_path)
    assert "1 snapshots forgotten" in forgotten.stdout
    assert "unreachable chunks" in forgotten.stdout and "freed in" in forgotten.stdout
    assert first not in cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    dry = cluster.sdbackup("prune", "--dry-run", cwd=tmp_path)
    assert "0 unreachable chunks" in dry.stdout and "would be freed" in dry.stdout
