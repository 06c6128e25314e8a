"""A disk that fills during a backup: the backup moves to the other servers, and nothing the
full server held is damaged."""

import os

import pytest_twisted

from sdbackup.client.backup import Backup
from sdbackup.client.restore import Restore


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


async def run_backup(cluster, *paths):
    session = await cluster.session()
    try:
        return await Backup(session, [str(p) for p in paths]).run()
    finally:
        await session.close()


def held(server) -> dict[str, bytes]:
    return {chunk_id: open(server.store.path_for(chunk_id), "rb").read()
            for chunk_id in server.store.chunk_ids()}


@pytest_twisted.ensureDeferred
async def test_a_server_whose_disk_fills_during_a_backup_is_left_out_and_loses_nothing(
        cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("first/a.bin", os.urandom(3 * 1024 * 1024))
    earlier = await run_backup(cluster, "first")
    full = cluster.servers[0]
    before = held(full)
    assert before
    # Its disk now refuses every write (as a disk does that is full where statvfs still showed
    # room): the manager has not heard, and places chunks on it until a store is refused.
    full.store.reserve = 2**62
    for i in range(8):
        write(f"second/f{i}.bin", os.urandom(512 * 1024 + i))
    result = await run_backup(cluster, "second")
    assert result.warnings == []  # two copies of everything, on the two other servers

    assert held(full) == before  # nothing added, nothing damaged
    assert os.listdir(full.store.incoming) == []
    manager = cluster.manager.manager
    others = {s.server.address for s in cluster.servers[1:]}
    second_ids = set(await manager.db(manager.catalog.holders, [
        c for s in cluster.servers[1:] for c in s.store.chunk_ids()]))
    holders = await manager.db(manager.catalog.holders, second_ids - set(before))
    assert holders and all(sorted(h) == sorted(others) for h in holders.values())

    session = await cluster.session()
    try:
        for name, snapshot in (("first", earlier.snapshot_id), ("second", result.snapshot_id)):
            restored = await Restore(session, snapshot, str(tmp_path / f"out-{name}")).run()
            assert restored.errors == []
    finally:
        await session.close()
    for path in ["first/a.bin", *(f"second/f{i}.bin" for i in range(8))]:
        folder = "out-first" if path.startswith("first") else "out-second"
        with open(tmp_path / folder / path, "rb") as a, open(tmp_path / path, "rb") as b:
            assert a.read() == b.read()
