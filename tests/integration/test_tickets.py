"""Placements are tickets the manager signs: servers store and forward only under them.

Attacks of the security issue, against a cluster in this process (real loopback TCP,
real chunk files): a store or a replication order that names an endpoint of the
attacker's choosing (attack 8, and 2's ``ReplicateChunk``) makes no connection to it;
a store under no ticket, a forged, expired or borrowed one, stores nothing; and what a
client claims never becomes a location (attack 4).
"""

import os

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol

from sdbackup import hashing, tickets
from sdbackup.protocols.messages import (
    ChunkNeed,
    ChunkRef,
    ChunksAdded,
    CommitSnapshot,
    HasChunks,
    HeldChunk,
    Locate,
    PlacementRequest,
    ReplicateChunk,
    StoreChunk,
    StoreChunks,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError

from .backups import make_backup
from .test_bad_input import nothing_stored
from .test_manager_index import listed


class Trap(Factory):
    """An endpoint an attacker wants a server to send bytes to: counts who connects."""

    def __init__(self):
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return Protocol()


@pytest_twisted.async_yield_fixture
async def traps(tmp_path):
    """A TCP and a unix endpoint that must never be reached: ``(trap, address)`` pairs."""
    found, ports = [], []
    tcp = Trap()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tcp)
    ports.append(port)
    found.append((tcp, f"tcp:127.0.0.1:{port.getHost().port}"))
    unix = Trap()
    path = tmp_path / "trap.sock"
    ports.append(await serverFromString(reactor, f"unix:{path}").listen(unix))
    found.append((unix, f"unix:{path}"))
    try:
        yield found
    finally:
        for port in ports:
            await port.stopListening()


async def placed(wire_client, data: bytes):
    """A real placement of one chunk (two servers): its chain and ticket."""
    chunk_id = hashing.chunk_id(data)
    placement = await wire_client.ask(PlacementRequest(chunks=[ChunkNeed(chunk_id, len(data))]))
    chain = placement.assignments[chunk_id]
    ticket, = placement.tickets
    assert ticket.chain == chain and ticket.chunk_ids == [chunk_id]
    return chunk_id, chain, ticket


def store(chunk_id: str, data: bytes, forward_to: list, ticket) -> StoreChunk:
    return StoreChunk(chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=forward_to,
                      ticket=ticket, payload=data)


async def refused(request, code: str = tickets.BAD_TICKET) -> str:
    with pytest.raises(RemoteError) as caught:
        await request
    assert caught.value.code == code, caught.value.reason
    return caught.value.reason


async def as_manager(address: str) -> MessageProtocol:
    """A local process that says it is the manager (without TLS there are no identities)."""
    proto = MessageProtocol(None, "manager")
    await connectProtocol(clientFromString(reactor, address), proto)
    await proto.ready
    return proto


@pytest_twisted.ensureDeferred
async def test_a_store_never_connects_to_an_endpoint_its_ticket_does_not_name(cluster, wire_client,
                                                                              traps):
    # Attack 8 (SSRF): forward_to of any tcp: or unix: endpoint made the server connect there
    # and send the bytes, and its errors scanned ports.
    data = b"bytes for an attacker's port\n"
    chunk_id, chain, ticket = await placed(wire_client, data)
    primary = chain[0]
    for _, address in traps:
        forged_chain = attrs.evolve(ticket, chain=[primary, address])
        for forward_to, with_ticket in (([address], None), ([address], ticket),
                                        ([address], forged_chain), ([chain[1], address], ticket)):
            reason = await refused(wire_client.servers.request(
                primary, store(chunk_id, data, forward_to, with_ticket)))
            assert address not in reason  # (no error text to scan ports with)
        # The same as a batch.
        await refused(wire_client.servers.request(primary, StoreChunks(
            chunks=[ChunkRef(chunk_id, len(data), hashing.checksum(data))], forward_to=[address],
            ticket=ticket, payload=data)))
    await task.deferLater(reactor, 0.3, lambda: None)  # (time for a connection to arrive)
    assert [trap.connections for trap, _ in traps] == [0, 0]
    assert nothing_stored(cluster)
    # The ticket does what it was signed for.
    reply = await wire_client.servers.request(primary, store(chunk_id, data, chain[1:], ticket))
    assert reply.holders == chain


@pytest_twisted.ensureDeferred
async def test_a_replication_order_goes_only_along_its_ticket(cluster, wire_client, traps):
    # Attack 2: ReplicateChunk with forward_to pushed any chunk to a port of the attacker's
    # choosing. Under TLS only the manager may send it (test_tls); without TLS any local
    # process may say it is the manager, and the order still needs the manager's ticket.
    data = os.urandom(10_000)
    chunk_id, chain, ticket = await placed(wire_client, data)
    await wire_client.servers.request(chain[0], store(chunk_id, data, chain[1:], ticket))
    fake = await as_manager(chain[0])
    try:
        for _, address in traps:
            for order in (ReplicateChunk(chunk_id=chunk_id, forward_to=[address]),
                          ReplicateChunk(chunk_id=chunk_id, forward_to=[address], ticket=ticket),
                          ReplicateChunk(chunk_id=chunk_id, forward_to=[address],
                                         ticket=attrs.evolve(ticket, chain=[chain[0], address]))):
                await refused(fake.request(order, 10, reactor))
    finally:
        fake.transport.loseConnection()
    await task.deferLater(reactor, 0.3, lambda: None)
    assert [trap.connections for trap, _ in traps] == [0, 0]


@pytest_twisted.ensureDeferred
async def test_a_store_under_a_bad_ticket_stores_nothing(cluster, wire_client):
    data, other = b"the chunk the ticket is for\n", b"another chunk\n"
    chunk_id, chain, ticket = await placed(wire_client, data)
    other_id = hashing.chunk_id(other)
    primary, replica = chain
    manager = cluster.manager.manager
    now = manager.clock.seconds()
    expired = tickets.sign(manager.tickets.current(now), [chunk_id], chain, int(now) - 1)
    assert "expired" in await refused(wire_client.servers.request(
        primary, store(chunk_id, data, [replica], expired)), tickets.TICKET_EXPIRED)
    assert "signature" in await refused(wire_client.servers.request(
        primary, store(chunk_id, data, [replica], attrs.evolve(ticket, expires=ticket.expires + 3600))))
    assert "signature" in await refused(wire_client.servers.request(
        primary, store(chunk_id, data, [replica], attrs.evolve(ticket, mac="0" * 64))))
    assert "signature" in await refused(wire_client.servers.request(
        primary, store(other_id, other, [replica], attrs.evolve(ticket, chunk_ids=[other_id]))))
    assert "these chunks" in await refused(wire_client.servers.request(
        primary, store(other_id, other, [replica], ticket)))
    assert "a ticket" in await refused(wire_client.servers.request(
        primary, store(chunk_id, data, [replica], None)))
    third = next(s.server.address for s in cluster.servers if s.server.address not in chain)
    assert "this server" in await refused(wire_client.servers.request(
        third, store(chunk_id, data, [], ticket)))
    # A ticket of another manager's key (one from before a restart, say): a new placement
    # is needed, which the client asks for.
    stranger = tickets.Keyring().issue([chunk_id], chain, now)
    await refused(wire_client.servers.request(primary, store(chunk_id, data, [replica], stranger)),
                  tickets.TICKET_EXPIRED)
    assert nothing_stored(cluster)


@pytest_twisted.ensureDeferred
async def test_tickets_signed_before_a_key_change_stay_valid_until_they_expire(cluster, wire_client):
    manager = cluster.manager.manager
    data = b"placed before the key changed\n"
    chunk_id, chain, before = await placed(wire_client, data)
    old_key = manager.tickets.current(manager.clock.seconds()).key_id
    manager.tickets.interval = 0  # the next look signs with a new key
    manager.rotate_ticket_keys()
    manager.tickets.interval = tickets.DEFAULT_KEY_INTERVAL
    new_key = manager.tickets.current(manager.clock.seconds()).key_id
    assert new_key != old_key
    await cluster.until(lambda: all(set(s.server.ticket_keys) == {old_key, new_key}
                                    for s in cluster.servers), what="the servers hearing the new key")
    reply = await wire_client.servers.request(chain[0], store(chunk_id, data, chain[1:], before))
    assert reply.holders == chain
    backup = make_backup("after the key changed")
    await wire_client.backup(backup)
    assert backup.snapshot_id in await listed(wire_client)


@pytest_twisted.ensureDeferred
async def test_a_server_registering_again_gets_the_keys_from_a_restarted_manager(cluster, wire_client):
    data = b"placed by the first manager\n"
    chunk_id, chain, old = await placed(wire_client, data)
    await cluster.restart_manager()
    await cluster.until_ready()
    keys = {k.key_id for k in cluster.manager.manager.tickets.valid(reactor.seconds())}
    await cluster.until(lambda: all(set(s.server.ticket_keys) == keys for s in cluster.servers),
                        what="the servers registering again")
    fresh = await cluster.wire_client()
    try:
        # The old manager's ticket is not honoured; the client is told to place again.
        await refused(fresh.servers.request(chain[0], store(chunk_id, data, chain[1:], old)),
                      tickets.TICKET_EXPIRED)
        backup = make_backup("after a manager restart")
        await fresh.backup(backup)
        assert backup.snapshot_id in await listed(fresh)
    finally:
        await fresh.close()


@pytest_twisted.ensureDeferred
async def test_what_a_client_claims_never_becomes_a_location(cluster, wire_client):
    # Attack 4: a client claimed to hold chunks it did not have; later backups skipped that
    # data as stored, and it could never be restored.
    claimed = hashing.chunk_id(b"never stored anywhere\n")
    wire_client.manager.send(ChunksAdded(chunks=[HeldChunk(claimed, 22)]))  # a server's notice
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(CommitSnapshot(snapshot_id=hashing.object_id("snapshot", b"none")))
    assert caught.value.code != "forbidden"  # (a client may commit; there is nothing to commit)
    assert (await wire_client.ask(HasChunks(chunk_ids=[claimed]))).chunk_ids == []
    assert (await wire_client.ask(Locate(chunk_ids=[claimed]))).holders == {}
    placement = await wire_client.ask(PlacementRequest(chunks=[ChunkNeed(claimed, 22)]))
    assert placement.known == [] and claimed in placement.assignments
    # A client that cuts its chain short (one copy, though told two) is no holder either: the
    # manager counts the copy the server reports, and repair makes the second.
    data = os.urandom(20_000)
    chunk_id, chain, ticket = await placed(wire_client, data)
    reply = await wire_client.servers.request(chain[0], store(chunk_id, data, [], ticket))
    assert reply.holders == chain[:1]

    async def copies():
        return (await wire_client.ask(Locate(chunk_ids=[chunk_id]))).holders.get(chunk_id, [])

    await cluster.until(lambda: copies(), what="the primary's notice")
    await cluster.until(_len_is(copies, 2), what="repair")
    holding = [s for s in cluster.servers if s.store.has(chunk_id)]
    assert sorted(s.server.address for s in holding) == sorted(await copies())


def _len_is(ask, count: int):
    async def check():
        return len(await ask()) == count
    return check
