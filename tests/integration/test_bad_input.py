"""Bad input gets a clear error and loses nothing; servers and the manager keep serving."""

import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from sdbackup import hashing, objects
from sdbackup.client.session import ClientError
from sdbackup.objects import Kind
from sdbackup.protocols.messages import (
    PROTOCOL_VERSION,
    ChunkInventory,
    ChunkRef,
    FetchChunk,
    Hello,
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
            chunk_id="d" * 64, checksum="d" * 64, payload=b"not what the checksum says"))
    assert caught.value.code == "checksum-mismatch"
    assert nothing_stored(cluster)


@pytest_twisted.ensureDeferred
async def test_a_bogus_tree_is_refused_by_the_first_server(cluster, wire_client):
    first, second = (s.server.address for s in cluster.servers[:2])
    good = objects.encode_tree(objects.make_tree([objects.Node(name=b"ok", type="file")]))
    bogus = b"a tree, says the sender"
    pack = [(objects.object_id(Kind.TREE, good), good), (hashing.object_id(Kind.TREE, bogus), bogus)]
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(first, StoreChunks(
            chunks=[ChunkRef(i, len(d), hashing.checksum(d)) for i, d in pack],
            forward_to=[second], kind=Kind.TREE, payload=good + bogus))
    assert caught.value.code == "bad-object"
    assert "tree" in caught.value.reason
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(first, StoreChunk(
            chunk_id=pack[1][0], checksum=hashing.checksum(bogus), kind=Kind.TREE, payload=bogus))
    assert caught.value.code == "bad-object"
    # Nothing of the pack was stored, here or on the replica.
    assert nothing_stored(cluster)
    await still_serving(cluster, wire_client)


@pytest_twisted.ensureDeferred
async def test_an_object_sent_as_another_kind_is_refused(cluster, wire_client):
    tree = objects.encode_tree(objects.make_tree([objects.Node(name=b"x", type="file")]))
    tree_id = objects.object_id(Kind.TREE, tree)
    address = cluster.servers[0].server.address
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(address, StoreChunk(
            chunk_id=tree_id, checksum=hashing.checksum(tree), kind=Kind.SNAPSHOT, payload=tree))
    assert caught.value.code == "bad-object"
    assert nothing_stored(cluster)
    # Stored as a tree, the same id cannot then be passed off as file data.
    await wire_client.servers.request(address, StoreChunk(
        chunk_id=tree_id, checksum=hashing.checksum(tree), kind=Kind.TREE, payload=tree))
    with pytest.raises(RemoteError) as caught:
        await wire_client.servers.request(address, StoreChunk(
            chunk_id=tree_id, checksum=hashing.checksum(b"data"), kind=Kind.DATA, payload=b"data"))
    assert caught.value.code == "kind-conflict"
    reply = await wire_client.servers.request(address, FetchChunk(chunk_id=tree_id))
    assert (reply.kind, reply.payload) == (Kind.TREE, tree)


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_report_chunks_as_a_server(cluster, wire_client):
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(ChunkInventory(chunks=[], snapshots=[], final=True))
    assert caught.value.code == "not-registered"
    await still_serving(cluster, wire_client)


@pytest_twisted.ensureDeferred
async def test_manager_unreachable_is_a_clear_error(tmp_path):
    from sdbackup.client.session import Session
    with pytest.raises(ClientError, match="cannot reach the manager"):
        await Session(reactor, "tcp:127.0.0.1:1").connect()
