"""The replication chain, hop by hop: a primary acknowledges only what every server after it
confirmed, reports the server at fault when one lies or fails, and tells a full disk from a
failing one. Real in-process servers on loopback; a liar is a real server whose answer is
changed on purpose."""

import errno
import os

import attrs
import pytest
import pytest_twisted

from sdbackup import hashing
from sdbackup.protocols.messages import ChunkRef, ReplicateChunk, StoreChunk, StoreChunks
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.server import FULL_MARGIN

from .test_tickets import as_manager, placed

#: Digests that sort before and after any real one (a lie on either side of the truth).
LOWEST, HIGHEST = "0" * 64, "f" * 64


async def refusal(request) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        await request
    return caught.value


def held_by(cluster, chunk_id: str) -> list[str]:
    return [s.server.address for s in cluster.servers if s.store.has(chunk_id)]


# --- a replica that confirms something else -----------------------------------------------------


@pytest.mark.parametrize("lie", ["checksum before", "checksum after", "id before", "id after"])
@pytest_twisted.ensureDeferred
async def test_a_replica_confirming_another_chunk_fails_the_store(cluster, wire_client, lie):
    data = os.urandom(5000)
    chunk_id, chain, ticket = await placed(wire_client, data)
    replica = cluster.server(chain[1]).server
    real = replica.handle_StoreChunk

    async def confirms_another(msg, connection):
        reply = await real(msg, connection)
        field, where = lie.split()
        told = LOWEST if where == "before" else HIGHEST
        return attrs.evolve(reply, **{"chunk_id" if field == "id" else "checksum": told})

    replica.handle_StoreChunk = confirms_another
    error = await refusal(wire_client.servers.request(chain[0], StoreChunk(
        chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=chain[1:], ticket=ticket,
        payload=data)))
    assert error.code == "replication-failed"
    assert error.culprit == chain[1]
    assert "confirmed a different chunk" in error.reason


@pytest.mark.parametrize("lie", ["one missing", "one more"])
@pytest_twisted.ensureDeferred
async def test_a_replica_confirming_other_chunks_of_a_batch_fails_the_store(cluster, wire_client,
                                                                            lie):
    pieces = [os.urandom(3000 + i) for i in range(3)]
    ids = [hashing.chunk_id(p) for p in pieces]
    chain = [s.server.address for s in cluster.servers[:2]]
    ticket = cluster.ticket(ids, chain)
    replica = cluster.server(chain[1]).server
    real = replica.handle_StoreChunks

    async def confirms_others(msg, connection):
        reply = await real(msg, connection)
        told = reply.chunk_ids[:-1] if lie == "one missing" else [*reply.chunk_ids, HIGHEST]
        return attrs.evolve(reply, chunk_ids=told)

    replica.handle_StoreChunks = confirms_others
    error = await refusal(wire_client.servers.request(chain[0], StoreChunks(
        chunks=[ChunkRef(c, len(p), hashing.checksum(p)) for c, p in zip(ids, pieces, strict=True)],
        forward_to=chain[1:], ticket=ticket, payload=b"".join(pieces))))
    assert error.code == "replication-failed"
    assert error.culprit == chain[1]
    assert "confirmed other chunks" in error.reason


@pytest_twisted.ensureDeferred
async def test_a_replica_confirming_another_copy_fails_a_repair(cluster, wire_client):
    data = os.urandom(5000)
    chunk_id, chain, ticket = await placed(wire_client, data)
    await wire_client.servers.request(chain[0], StoreChunk(
        chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=chain[1:], ticket=ticket,
        payload=data))
    target = next(s.server for s in cluster.servers if s.server.address not in chain)
    real = target.handle_StoreChunk

    async def confirms_another(msg, connection):
        return attrs.evolve(await real(msg, connection), checksum=HIGHEST)

    target.handle_StoreChunk = confirms_another
    manager = await as_manager(chain[0])
    try:
        order = ReplicateChunk(chunk_id=chunk_id, forward_to=[target.address],
                               ticket=cluster.ticket([chunk_id], [chain[0], target.address]))
        error = await refusal(manager.request(order, 30))
    finally:
        manager.transport.loseConnection()
    assert (error.code, error.culprit) == ("replication-failed", target.address)


@pytest_twisted.ensureDeferred
async def test_a_replica_that_cannot_be_reached_fails_the_store_naming_it(cluster, wire_client):
    first, gone = cluster.servers[:2]
    await cluster.stop_server(gone)
    data = os.urandom(4000)
    chunk_id = hashing.chunk_id(data)
    chain = [first.server.address, gone.server.address]
    error = await refusal(wire_client.servers.request(chain[0], StoreChunks(
        chunks=[ChunkRef(chunk_id, len(data), hashing.checksum(data))], forward_to=chain[1:],
        ticket=cluster.ticket([chunk_id], chain), payload=data)))
    assert (error.code, error.culprit) == ("replication-failed", gone.server.address)
    assert "unreachable" in error.reason


# --- three servers in a chain -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_store_along_a_chain_of_three_reaches_each_server_in_order(make_cluster):
    cluster = await make_cluster(servers=3, replicas=3)
    wire_client = await cluster.wire_client()
    try:
        data = os.urandom(6000)
        chunk_id, chain, ticket = await placed(wire_client, data)
        assert len(chain) == 3
        reply = await wire_client.servers.request(chain[0], StoreChunk(
            chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=chain[1:],
            ticket=ticket, payload=data))
    finally:
        await wire_client.close()
    assert reply.holders == chain
    assert sorted(held_by(cluster, chunk_id)) == sorted(chain)


@pytest_twisted.ensureDeferred
async def test_a_repair_to_two_servers_copies_along_both(make_cluster):
    cluster = await make_cluster(servers=3, replicas=3)
    source = cluster.servers[0].server
    data = os.urandom(7000)
    chunk_id = hashing.chunk_id(data)
    source.store.put("data", chunk_id, hashing.checksum(data), data)
    targets = [s.server.address for s in cluster.servers[1:]]
    manager = await as_manager(source.address)
    try:
        reply = await manager.request(ReplicateChunk(
            chunk_id=chunk_id, forward_to=targets,
            ticket=cluster.ticket([chunk_id], [source.address, *targets])), 30)
    finally:
        manager.transport.loseConnection()
    assert reply.holders == targets
    assert sorted(held_by(cluster, chunk_id)) == sorted([source.address, *targets])


@pytest_twisted.ensureDeferred
async def test_a_copy_order_without_a_server_to_go_to_is_refused(cluster):
    source = cluster.servers[0].server
    data = os.urandom(100)
    chunk_id = hashing.chunk_id(data)
    source.store.put("data", chunk_id, hashing.checksum(data), data)
    manager = await as_manager(source.address)
    try:
        error = await refusal(manager.request(ReplicateChunk(
            chunk_id=chunk_id, forward_to=[], ticket=cluster.ticket([chunk_id], [source.address])),
            30))
    finally:
        manager.transport.loseConnection()
    assert error.code == "bad-request"


# --- a full disk and a failing one --------------------------------------------------------------


def fail_next_write(server, code: int):
    """Make the next write of ``server``'s store fail with ``code``, as the disk would."""
    real = server.store.put_many

    def failing(*args):
        server.store.put_many = real
        raise OSError(code, os.strerror(code))

    server.store.put_many = failing


async def store_one(cluster, wire_client, primary: str):
    data = os.urandom(4000)
    chunk_id = hashing.chunk_id(data)
    return await wire_client.servers.request(primary, StoreChunk(
        chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=[],
        ticket=cluster.ticket([chunk_id], [primary]), payload=data))


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS])
@pytest_twisted.ensureDeferred
async def test_a_failing_disk_refuses_the_store_but_is_not_called_full(cluster, wire_client, code):
    """An I/O error, or a file system remounted read-only, is not a lack of space."""
    server = cluster.servers[0].server
    fail_next_write(server, code)
    error = await refusal(store_one(cluster, wire_client, server.address))
    assert error.code == "io-error"
    assert server.disk_state()["full"] is False
    reply = await store_one(cluster, wire_client, server.address)  # the next write works
    assert reply.holders == [server.address]


@pytest_twisted.ensureDeferred
async def test_a_disk_that_ran_out_stays_full_until_a_margin_is_free_again(cluster, wire_client):
    server = cluster.servers[0].server
    free, _ = server.store.disk_space()
    server.reserve = free - FULL_MARGIN // 2  # room now, but less than the margin above it
    assert server.disk_state()["full"] is False
    fail_next_write(server, errno.ENOSPC)
    error = await refusal(store_one(cluster, wire_client, server.address))
    assert error.code == "disk-full"
    assert server.disk_state()["full"] is True
    assert server.disk_state()["full"] is True  # (at every heartbeat, not once)
    server.reserve = free - 2 * FULL_MARGIN  # the margin is free again
    assert server.disk_state()["full"] is False
    reply = await store_one(cluster, wire_client, server.address)
    assert reply.holders == [server.address]
