"""Bad input gets a clear error and loses nothing; servers and the manager keep serving."""

import json
import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from sdbackup import hashing, limits, objects
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError
from sdbackup.objects import Kind
from sdbackup.protocols.messages import (
    PROTOCOL_VERSION,
    ChunkInventory,
    ChunkRef,
    FetchChunk,
    HasChunks,
    Hello,
    ListSnapshots,
    RegisterServer,
    StatusRequest,
    StoreChunk,
    StoreChunks,
    encode_frame,
)
from sdbackup.protocols.peer import RemoteError

from .backups import make_backup
from .test_manager_index import listed


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def send_raw(port: int, data: bytes, wait_for_close: bool = True) -> bytes:
    """Connect, send ``data``, and read until the server closes (blocking: run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        received = b""
        if not wait_for_close:
            return received
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # an aborted connection: closed all the same
        return received


HELLO = frame(encode_frame(Hello(version=PROTOCOL_VERSION, role="client")))


def nothing_stored(cluster) -> bool:
    return all(s.store.count() == 0 and os.listdir(s.store.incoming) == []
               for s in cluster.servers)


async def still_serving(cluster, wire_client):
    """A whole backup still goes through and is listed."""
    backup = make_backup("still serving")
    await wire_client.backup(backup)
    assert backup.snapshot_id in await listed(wire_client)


@pytest.mark.parametrize("bad", [
    pytest.param(HELLO + struct.pack("!I", 2**31), id="oversized-frame"),
    pytest.param(HELLO + frame(b"\xff\xff garbage that is not a message"), id="unknown-type"),
    pytest.param(HELLO + frame(b"\x00\x0a\x00\x00\x00\x05{nope"), id="malformed-header"),
    pytest.param(frame(encode_frame(StoreChunk(chunk_id="a" * 64, checksum="b" * 64))),
                 id="no-handshake"),
    pytest.param(HELLO + frame(encode_frame(Hello(version=PROTOCOL_VERSION, role="client"))),
                 id="unexpected-message"),
    pytest.param(HELLO + frame(b"\x00\x0a\x00\x00\x00\x20" + b'{"kind":"secret","chunk_id":"x"}'),
                 id="unknown-kind"),
])
@pytest_twisted.ensureDeferred
async def test_bad_frames_close_only_that_connection(cluster, wire_client, bad):
    for role, address in (("server", cluster.servers[0].server.address),
                          ("manager", cluster.manager_address)):
        # The peer answers with its own Hello at most, then closes the connection.
        received = await deferToThread(send_raw, port_of(address), bad)
        assert frame(encode_frame(Hello(version=PROTOCOL_VERSION, role=role))).startswith(received)
    await still_serving(cluster, wire_client)


@pytest_twisted.ensureDeferred
async def test_peer_vanishing_mid_chunk_leaves_nothing(cluster, wire_client):
    server = cluster.servers[0]
    data = os.urandom(1024 * 1024)
    whole = frame(encode_frame(StoreChunk(chunk_id="c" * 64, checksum="c" * 64, payload=data)))
    await deferToThread(send_raw, port_of(server.server.address), HELLO + whole[: len(whole) // 2],
                        wait_for_close=False)
    await still_serving(cluster, wire_client)
    # The half-sent chunk left no trace.
    assert os.listdir(server.store.incoming) == []
    assert not server.store.has("c" * 64)


@pytest_twisted.ensureDeferred
async def test_a_chunk_with_a_wrong_checksum_is_refused(cluster, wire_client):
    address = cluster.servers[0].server.address
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(address, StoreChunk(
            chunk_id="d" * 64, checksum="d" * 64, ticket=cluster.ticket(["d" * 64], [address]),
            payload=b"not what the checksum says"))
    assert caught.value.code == "checksum-mismatch"
    assert nothing_stored(cluster)


@pytest_twisted.ensureDeferred
async def test_a_bogus_tree_is_refused_by_the_first_server(cluster, wire_client):
    first, second = (s.server.address for s in cluster.servers[:2])
    good = objects.encode_tree(objects.make_tree([objects.Node(name=b"ok", type="file")]))
    bogus = b"a tree, says the sender"
    pack = [(objects.object_id(Kind.TREE, good), good), (hashing.object_id(Kind.TREE, bogus), bogus)]
    ticket = cluster.ticket([i for i, _ in pack], [first, second])
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(first, StoreChunks(
            chunks=[ChunkRef(i, len(d), hashing.checksum(d)) for i, d in pack],
            forward_to=[second], kind=Kind.TREE, ticket=ticket, payload=good + bogus))
    assert caught.value.code == "bad-object"
    assert "tree" in caught.value.reason
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(first, StoreChunk(
            chunk_id=pack[1][0], checksum=hashing.checksum(bogus), kind=Kind.TREE,
            ticket=cluster.ticket([pack[1][0]], [first]), payload=bogus))
    assert caught.value.code == "bad-object"
    # Nothing of the pack was stored, here or on the replica.
    assert nothing_stored(cluster)
    await still_serving(cluster, wire_client)


@pytest_twisted.ensureDeferred
async def test_an_object_sent_as_another_kind_is_refused(cluster, wire_client):
    tree = objects.encode_tree(objects.make_tree([objects.Node(name=b"x", type="file")]))
    tree_id = objects.object_id(Kind.TREE, tree)
    address = cluster.servers[0].server.address
    ticket = cluster.ticket([tree_id], [address])
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(address, StoreChunk(
            chunk_id=tree_id, checksum=hashing.checksum(tree), kind=Kind.SNAPSHOT, ticket=ticket,
            payload=tree))
    assert caught.value.code == "bad-object"
    assert nothing_stored(cluster)
    # Stored as a tree, the same id cannot then be passed off as file data.
    await wire_client.servers.request(address, StoreChunk(
        chunk_id=tree_id, checksum=hashing.checksum(tree), kind=Kind.TREE, ticket=ticket,
        payload=tree))
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(address, StoreChunk(
            chunk_id=tree_id, checksum=hashing.checksum(b"data"), kind=Kind.DATA, ticket=ticket,
            payload=b"data"))
    assert caught.value.code == "invalid-chunk-id"  # the id is the tree's hash, not the data's
    reply = await wire_client.servers.request(address, FetchChunk(chunk_id=tree_id))
    assert (reply.kind, reply.payload) == (Kind.TREE, tree)


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_report_chunks_as_a_server(cluster, wire_client):
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(ChunkInventory(chunks=[], snapshots=[], final=True))
    assert caught.value.code == "forbidden"  # only servers report inventories (authority)
    await still_serving(cluster, wire_client)


@pytest_twisted.ensureDeferred
async def test_manager_unreachable_is_a_clear_error(tmp_path):
    from sdbackup.client.session import Session
    with pytest.raises(ClientError, match="cannot reach the manager"):
        await Session(reactor, "tcp:127.0.0.1:1").connect()


# --- hostile input: bounded fields, small logs, paged listings ------------------------------

MiB = 1024 * 1024


def typed_frame(cls, header: dict) -> bytes:
    """A frame of ``cls`` with ``header`` as is: what no honest sender could build."""
    body = json.dumps(header).encode()
    return frame(struct.pack("!HI", cls.TYPE_CODE, len(body)) + body)


def send_and_wait(port: int, data: bytes) -> None:
    """Send ``data`` and wait until the peer closes; it may close before all is sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused before the end of the frame: closed all the same


HELLO_AS_SERVER = frame(encode_frame(Hello(version=PROTOCOL_VERSION, role="server")))


class LogVolume:
    """How much the log would write: the text of every event, and its longest field."""

    def __init__(self):
        self.text = 0
        self.longest_field = 0

    def __call__(self, event):
        self.text += len(formatEvent(event))
        for key, value in event.items():
            if not key.startswith("log_"):
                self.longest_field = max(self.longest_field, len(str(value)))


@pytest.fixture
def log_volume():
    volume = LogVolume()
    globalLogPublisher.addObserver(volume)
    yield volume
    globalLogPublisher.removeObserver(volume)


@pytest_twisted.ensureDeferred
async def test_huge_invalid_ids_are_not_logged_in_full(cluster, wire_client, log_volume):
    # Attack 13: three frames of 8 MiB invalid ids made 24 MiB of log.
    huge = "z" * (8 * MiB)
    server = port_of(cluster.servers[0].server.address)
    manager = port_of(cluster.manager_address)
    for port, bad in (
        (server, typed_frame(StoreChunk, {"chunk_id": huge, "checksum": "a" * 64})),
        (server, typed_frame(FetchChunk, {"chunk_id": huge})),
        (manager, typed_frame(HasChunks, {"chunk_ids": [huge]})),
        (manager, typed_frame(ChunkInventory, {"snapshots": [huge[: 7 * MiB]]})),
    ):
        await deferToThread(send_and_wait, port, HELLO + bad)
    await still_serving(cluster, wire_client)
    assert log_volume.text < 64 * 1024
    assert log_volume.longest_field < 2000


@pytest_twisted.ensureDeferred
async def test_an_over_long_address_is_never_registered(cluster, wire_client, log_volume):
    # Attack 12: one registration with an 8 MiB address broke status and every backup for good.
    manager = port_of(cluster.manager_address)
    for address in ("tcp:" + "x" * (8 * MiB), "tcp:127.0.0.1:9\nforged log line", "tcp:\udc80:1"):
        bad = typed_frame(RegisterServer, {"request_id": 1, "address": address,
                                           "free_bytes": 10**15, "chunk_count": 0})
        await deferToThread(send_and_wait, manager, HELLO_AS_SERVER + bad)
    # (a registration whose numbers do not fit the catalog, either)
    bad = typed_frame(RegisterServer, {"request_id": 1, "address": "tcp:127.0.0.1:9",
                                       "free_bytes": 2**64})
    await deferToThread(send_and_wait, manager, HELLO_AS_SERVER + bad)
    status = await wire_client.ask(StatusRequest())
    real = sorted(s.server.address for s in cluster.servers)
    assert sorted(s.address for s in status.servers) == real
    catalog = cluster.manager.manager.catalog
    assert sorted(await cluster.manager.manager.db(catalog.server_addresses)) == real
    await still_serving(cluster, wire_client)
    assert log_volume.text < 64 * 1024


@pytest_twisted.ensureDeferred
async def test_a_snapshot_with_an_over_long_host_is_never_listed(cluster, wire_client, log_volume):
    # Attack 12: one snapshot with an 8 MiB host was listed, and broke every listing after it,
    # across restarts. Its object is stored (servers hold bytes); the index refuses it.
    bad = make_backup("huge host", host="h" * (7 * MiB))
    with pytest.raises(RemoteError) as caught:
        await wire_client.backup(bad)
    # (Why, unless the index had already read the object from a server's notice and refused it.)
    assert caught.value.code == "bad-object"
    assert len(caught.value.reason) < 1000
    await still_serving(cluster, wire_client)
    # A manager that starts again finds the object in the servers' inventories, and skips it.
    await cluster.restart_manager()
    await cluster.until_ready()
    fresh = await cluster.wire_client()
    try:
        await cluster.until(lambda: cluster.manager.manager.indexer.pending == 0)
        snapshots = (await fresh.ask(ListSnapshots())).snapshots
        assert [s.tags for s in snapshots] == [["still serving"]]
        assert (await fresh.ask(StatusRequest())).snapshots == 1
    finally:
        await fresh.close()
    assert log_volume.text < 64 * 1024
    assert log_volume.longest_field < 2000


@pytest_twisted.ensureDeferred
async def test_an_over_long_snapshot_indexed_before_the_limits_does_not_break_listings(
        cluster, wire_client):
    # A catalog written before fields were bounded may hold such a row: it is left out.
    good = make_backup("good")
    await wire_client.backup(good)
    manager = cluster.manager.manager

    def insert_old_row():
        with manager.catalog._transaction():
            manager.catalog.db.execute(
                "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 'default')",
                ("e" * 64, 1.0, "h" * MiB, json.dumps(["/"]), "[]", good.tree_id, ""))

    await manager.db(insert_old_row)
    assert await listed(wire_client) == [good.snapshot_id]


@pytest_twisted.ensureDeferred
async def test_snapshots_are_listed_in_pages(cluster, wire_client):
    ids = []
    for n in range(5):
        backup = make_backup(f"page {n}", time_s=1_700_000_000 + n // 2)  # (equal times too)
        await wire_client.backup(backup)
        ids.append(backup.snapshot_id)
    expected = [s.snapshot_id for s in (await wire_client.ask(ListSnapshots())).snapshots]
    assert sorted(expected) == sorted(ids)
    pages, request = [], ListSnapshots(limit=2)
    while True:
        page = await wire_client.ask(request)
        pages.append(([s.snapshot_id for s in page.snapshots], page.more))
        if not page.more:
            break
        last = page.snapshots[-1]
        request = ListSnapshots(after_time=last.time, after_id=last.snapshot_id, limit=2)
    assert [more for _, more in pages] == [True, True, False]
    assert [i for page, _ in pages for i in page] == expected
    assert limits.MAX_SNAPSHOTS_PER_PAGE >= 1000  # (a plain ListSnapshots asks for that many)


@pytest_twisted.ensureDeferred
async def test_the_client_reads_every_page_of_a_long_snapshot_list(cluster, wire_client):
    # Snapshots as large as a listing allows (64 KiB of paths each): about sixteen to a page.
    paths = tuple(f"/{n}/".encode() + b"p" * 16_000 for n in range(4))
    ids = []
    for n in range(40):
        backup = make_backup(f"big {n}", time_s=1_700_000_000 + n, paths=paths)
        await wire_client.backup(backup)
        ids.append(backup.snapshot_id)
    assert (await wire_client.ask(ListSnapshots())).more  # one page does not hold them all

    session = await cluster.session()
    try:
        repository = Repository(session)
        assert [s.snapshot_id for s in await repository.snapshots()] == ids
        assert (await repository.resolve("latest")).snapshot_id == ids[-1]
    finally:
        await session.close()
