"""The promises behind "it never loses data", each held to a measure: a chain of three copies,
a primary that acknowledges only once its replica and itself have stored (sending a store on
only once verified, while it writes its own copy), and repair and scrub that keep
to their rates."""

import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock

from sdbackup import hashing
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ChunkRef, StoreChunks
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.chunkstore import ChunkStore
from sdbackup.services.server import StorageServer

from .test_cluster import backup, restore

MiB = 1024 * 1024


def copies(servers) -> dict:
    """chunk id -> the servers holding a file of it."""
    held = {}
    for server in servers:
        for chunk_id in server.store.chunk_ids():
            held.setdefault(chunk_id, []).append(server)
    return held


@pytest_twisted.ensureDeferred
async def test_replication_factor_three_keeps_three_copies_through_two_deaths(
        make_cluster, tmp_path, monkeypatch):
    cluster = await make_cluster(servers=4, replicas=3)
    monkeypatch.chdir(tmp_path)
    data = os.urandom(5 * MiB + 77)
    os.makedirs("src")
    with open("src/file", "wb") as f:
        f.write(data)
    result = await backup(cluster, "src")
    assert result.warnings == []

    held = copies(cluster.servers)
    assert held and {len(servers) for servers in held.values()} == {3}

    # Any two of a chunk's holders may die: the third still restores it.
    first = next(iter(held.values()))
    for dead in first[:2]:
        await cluster.stop_server(dead)
    out = await restore(cluster, tmp_path / "out")
    assert out.errors == []
    assert (tmp_path / "out/src/file").read_bytes() == data

    # And the repair brings every chunk back to three copies on the two left alive? It cannot:
    # two servers are left, so each chunk gets two, the most there can be.
    alive = [s for s in cluster.servers if s.running]

    def at_most_possible():
        now = copies(alive)
        return set(now) >= set(held) and all(len(now[c]) == len(alive) for c in held)

    await cluster.until(at_most_possible, timeout=30, what="every chunk on both live servers")


@pytest_twisted.ensureDeferred
async def test_a_primary_acknowledges_only_after_its_replica_has_stored(cluster, wire_client):
    """The replica is held back: the primary must not answer the client until it lets go, and
    when it answers, the replica's copy is on disk."""
    released = defer.Deferred()
    held_back = []
    for service in cluster.servers:
        real = service.server.handle_StoreChunks

        async def last_in_chain(msg, connection, real=real, service=service):
            if not msg.forward_to:
                held_back.append(service)
                await released
            return await real(msg, connection)

        service.server.handle_StoreChunks = last_in_chain

    pieces = [(hashing.chunk_id(d), d) for d in (os.urandom(4000 + i) for i in range(5))]
    storing = defer.ensureDeferred(wire_client.store(Kind.DATA, pieces))
    await cluster.until(lambda: held_back, what="the replica being asked")
    await task.deferLater(reactor, 0.5)
    assert not storing.called, "the primary acknowledged before its replica stored"

    released.callback(None)
    placement = await storing
    for chunk_id, _ in pieces:
        holders = [s for s in cluster.servers if s.store.has(chunk_id)]
        assert len(holders) == 2
        assert len(placement.assignments[chunk_id]) == 2


@pytest_twisted.ensureDeferred
async def test_a_primary_sends_a_store_on_while_it_writes_and_answers_once_both_are_done(
        cluster, wire_client):
    """The primary's own write is held back (a slow disk): its replica stores meanwhile, and the
    primary answers only once its own copy is on disk too."""
    first, second = cluster.servers[:2]
    let_go, writing = threading.Event(), threading.Event()
    real = first.store.put_verified

    def slow_disk(kind, chunks):
        writing.set()
        let_go.wait(30)
        return real(kind, chunks)

    first.store.put_verified = slow_disk
    pieces = [os.urandom(3000 + i) for i in range(3)]
    ids = [hashing.chunk_id(p) for p in pieces]
    chain = [first.server.address, second.server.address]
    storing = defer.ensureDeferred(wire_client.servers.request(chain[0], StoreChunks(
        chunks=[ChunkRef(c, len(p), hashing.checksum(p)) for c, p in zip(ids, pieces, strict=True)],
        forward_to=chain[1:], ticket=cluster.ticket(ids, chain), payload=b"".join(pieces))))
    try:
        await cluster.until(writing.is_set, what="the primary writing")
        await cluster.until(lambda: all(second.store.has(c) for c in ids),
                            what="the replica's copies, the primary's still being written")
        assert not any(first.store.has(c) for c in ids)
        assert not storing.called, "the primary acknowledged before its own copy was written"
    finally:
        let_go.set()
    reply = await storing
    assert reply.holders == chain
    held = copies(cluster.servers)
    assert all(held[c] == [first, second] for c in ids)


@pytest_twisted.ensureDeferred
async def test_a_primary_sends_nothing_on_that_it_has_not_verified(cluster, wire_client):
    """A batch with one chunk whose bytes are not what its checksum says is refused by the
    primary before its replica hears of it."""
    first, second = (s.server for s in cluster.servers[:2])
    asked = []
    real = second.handle_StoreChunks

    async def recording(msg, connection):
        asked.append(msg)
        return await real(msg, connection)

    second.handle_StoreChunks = recording
    pieces = [os.urandom(3000 + i) for i in range(3)]
    ids = [hashing.chunk_id(p) for p in pieces]
    refs = [ChunkRef(c, len(p), hashing.checksum(p)) for c, p in zip(ids, pieces, strict=True)]
    refs[1] = refs[1]._replace(checksum=hashing.checksum(b"other bytes"))
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(first.address, StoreChunks(
            chunks=refs, forward_to=[second.address],
            ticket=cluster.ticket(ids, [first.address, second.address]),
            payload=b"".join(pieces)))
    assert caught.value.code == "checksum-mismatch"
    assert asked == []
    assert not set(ids) & set(copies(cluster.servers))


@pytest_twisted.ensureDeferred
async def test_repair_keeps_to_its_rate(cluster, tmp_path, monkeypatch):
    """Several MiB to copy again at 4 MiB/s: the copies take about that many quarter seconds,
    never much less."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("src")
    with open("src/file", "wb") as f:
        f.write(os.urandom(12 * MiB))
    await backup(cluster, "src")
    rate = 4 * MiB
    cluster.manager.manager.repair.rate = rate

    victim = max(cluster.servers, key=lambda s: s.store.count())
    lost = sum(len(s.store.get(c)[2]) for s in [victim] for c in s.store.chunk_ids())
    await cluster.stop_server(victim)
    started = reactor.seconds()  # the manager knows the death: the repair starts
    alive = [s for s in cluster.servers if s is not victim]
    wanted = set(copies(cluster.servers)) | set(victim.store.chunk_ids())

    def repaired():
        now = copies(alive)
        return all(len(now.get(c, ())) == 2 for c in wanted)

    await cluster.until(repaired, timeout=60, what="the repair")
    took = reactor.seconds() - started
    assert lost >= 4 * MiB
    assert took >= 0.8 * lost / rate, f"{lost} bytes repaired in {took:.2f} s: faster than the rate"
    assert took <= 3 * lost / rate + 5, f"{lost} bytes repaired in {took:.2f} s: far slower"
    # What the dashboard shows as copied: each lost chunk once, to the one server left for it.
    repair = cluster.manager.manager.repair
    await cluster.until(lambda: repair.running is None, what="the repair pass to end")
    assert repair.copied_bytes == lost


@pytest_twisted.ensureDeferred
async def test_scrub_keeps_to_its_rate(tmp_path):
    """On a fake clock: 4 chunks of 1 MiB at 1 MiB/s are read one a second, not faster."""
    store = ChunkStore(str(tmp_path / "data"))
    for _ in range(4):
        data = os.urandom(MiB)
        store.put(Kind.DATA, hashing.chunk_id(data), hashing.checksum(data), data)
    clock = MemoryReactorClock()

    async def on_disk(f, *args):
        return f(*args)

    server = StorageServer(store, on_disk, None, clock)
    scrubbing = defer.ensureDeferred(server.scrub(rate=MiB))
    seen = []
    for _ in range(5):
        await task.deferLater(reactor, 0)  # let the read finish
        seen.append(server.scrubbed_bytes)
        clock.advance(1.0)
    await scrubbing
    assert seen == [MiB, 2 * MiB, 3 * MiB, 4 * MiB, 4 * MiB]
    store.close()
