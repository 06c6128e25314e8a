"""Failures inside one process: dead servers, repair, scrub, check, interrupted backups."""

import io
import os

import pytest_twisted
from twisted.internet import defer

from sdbackup import hashing
from sdbackup.chunking import read_chunks
from sdbackup.protocols.messages import CheckRequest, ChunkNeed, PlacementRequest, StoreChunk

from .test_cluster import backup, restore, write


def chunk_ids_of(data: bytes) -> set[str]:
    return {hashing.chunk_id(bytes(c)) for c in read_chunks(io.BytesIO(data))}


def copies(cluster) -> dict[str, int]:
    """How many servers hold each chunk, from the chunk files on disk."""
    counts: dict[str, int] = {}
    for server in cluster.servers:
        if server.running:
            for chunk_id in server.store.chunk_ids():
                counts[chunk_id] = counts.get(chunk_id, 0) + 1
    return counts


async def fully_replicated(cluster):
    total, under, missing = await cluster.chunk_health()
    return total > 0 and under == 0 and missing == 0


@pytest_twisted.ensureDeferred
async def test_a_silent_server_is_declared_dead_and_alive_again(cluster):
    server = cluster.servers[0]
    address = server.server.address
    for loop in server._loops:
        loop.stop()  # it stays connected but sends no heartbeat
    await cluster.until(lambda: address not in cluster.manager.manager.live, what="death")
    # It reconnects (the manager closed its link) and registers: alive again.
    server.every(0.2, server._send_heartbeat, "heartbeat")
    await cluster.until(lambda: address in cluster.manager.manager.live, what="return")


@pytest_twisted.ensureDeferred
async def test_chunks_of_a_dead_server_are_copied_back_to_two(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(8 * 1024 * 1024)
    write("src/a", data)
    await backup(cluster, "src")
    victim = max(cluster.servers, key=lambda s: s.store.count())
    await cluster.stop_server(victim)
    await cluster.until(lambda: fully_replicated(cluster), what="re-replication")
    assert set(copies(cluster).values()) == {2}
    # Every data chunk, and the trees and snapshot that give them meaning (src, the
    # root, the snapshot), are back to two copies.
    assert len(copies(cluster)) == len(chunk_ids_of(data)) + 3
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    assert (tmp_path / "out/src/a").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_scrub_quarantines_a_bad_copy_and_the_manager_repairs_it(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(3 * 1024 * 1024)
    write("src/a", data)
    await backup(cluster, "src")
    server = next(s for s in cluster.servers if s.store.count())
    chunk_id = next(server.store.chunk_ids())
    path = server.store.path_for(chunk_id)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    corrupt = await server.server.scrub()
    assert corrupt == [chunk_id]
    assert len(os.listdir(server.store.quarantine)) == 1
    # The manager hears of it and copies the chunk from its good copy to another server.
    await cluster.until(lambda: fully_replicated(cluster), what="repair")
    await cluster.until(lambda: copies(cluster).get(chunk_id) == 2, what="a second copy")
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_check_read_data_finds_corrupt_copies(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("src/a", os.urandom(2 * 1024 * 1024))
    await backup(cluster, "src")
    session = await cluster.session()
    try:
        healthy = await session.ask(CheckRequest(read_data=True))
        assert (healthy.missing, healthy.under_replicated, healthy.corrupt) == (0, 0, 0)
        assert len(healthy.servers_checked) == 3
        server = next(s for s in cluster.servers if s.store.count())
        # A data chunk (the check's walk reads trees, and would find a bad tree copy itself).
        chunk_id = max(server.store.chunk_ids(),
                       key=lambda c: os.path.getsize(server.store.path_for(c)))
        with open(server.store.path_for(chunk_id), "r+b") as f:
            f.seek(100)
            f.write(b"\x00\xff")
        # Listing alone does not read the data; --read-data does.
        listed = await session.ask(CheckRequest(read_data=False))
        assert listed.corrupt == 0
        checked = await session.ask(CheckRequest(read_data=True))
        assert checked.corrupt == 1
        assert checked.missing == 0
    finally:
        await session.close()
    await cluster.until(lambda: fully_replicated(cluster), what="repair")


@pytest_twisted.ensureDeferred
async def test_chunks_stored_before_a_client_crash_count_as_held(cluster):
    """Chunks confirmed by servers but never committed (the client died) count as held."""
    data = os.urandom(100_000)
    chunk_id = hashing.chunk_id(data)
    session = await cluster.session()
    try:
        servers = [s.server.address for s in cluster.servers[:2]]
        await session.servers.request(servers[0], StoreChunk(
            chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=servers[1:],
            ticket=cluster.ticket([chunk_id], servers), payload=data))

        async def known():
            placement = await session.ask(PlacementRequest(chunks=[ChunkNeed(chunk_id, len(data))]))
            return placement.known == [chunk_id]

        await cluster.until(known, what="the manager hearing of the stored chunk")
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_a_server_back_with_an_empty_folder_is_refilled(cluster, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    data = os.urandom(5 * 1024 * 1024)
    write("src/a", data)
    await backup(cluster, "src")
    index = max(range(3), key=lambda i: cluster.servers[i].store.count())
    victim = cluster.servers[index]
    port = victim.port.getHost().port
    await cluster.stop_server(victim)
    shutil.rmtree(victim.store.root)
    await cluster.add_server(index, f"tcp:{port}")
    await cluster.until(lambda: fully_replicated(cluster), what="repair")
    assert set(copies(cluster).values()) == {2}
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_losing_the_manager_mid_backup_is_a_clear_error(cluster, tmp_path, monkeypatch):
    import pytest

    from sdbackup.client.backup import Backup
    from sdbackup.client.session import ClientError

    monkeypatch.chdir(tmp_path)
    for i in range(40):
        write(f"src/f{i}", os.urandom(300_000))
    session = await cluster.session()
    try:
        running = defer.ensureDeferred(Backup(session, ["src"]).run())
        # The manager process goes away once the backup is under way.
        await cluster.until(lambda: any(s.store.count() for s in cluster.servers), what="a store")
        await cluster.manager.stopService()
        with pytest.raises(ClientError, match="lost the manager"):
            await running
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_check_read_data_runs_one_at_a_time_and_not_again_too_soon(cluster, tmp_path,
                                                                          monkeypatch):
    """Each --read-data re-reads every disk whole: a second one while one runs is refused, and
    so is one within --read-data-interval of the last; a plain check always runs."""
    import pytest

    from sdbackup.protocols.peer import RemoteError

    monkeypatch.chdir(tmp_path)
    write("src/a", os.urandom(4 * 1024 * 1024))
    await backup(cluster, "src")
    cluster.manager.manager.read_data_interval = 3600
    session = await cluster.session()
    try:
        first = defer.ensureDeferred(session.ask(CheckRequest(read_data=True)))
        with pytest.raises(RemoteError, match="under way") as busy:
            await session.ask(CheckRequest(read_data=True))
        assert busy.value.code == "busy"
        assert (await first).corrupt == 0
        with pytest.raises(RemoteError, match=r"the next may start in 3\d\d\d s") as soon:
            await session.ask(CheckRequest(read_data=True))
        assert soon.value.code == "too-soon"
        assert (await session.ask(CheckRequest(read_data=False))).missing == 0

        cluster.manager.manager.read_data_interval = 0
        assert (await session.ask(CheckRequest(read_data=True))).corrupt == 0
    finally:
        await session.close()
