"""Bad input gets a clear error and loses nothing; servers keep serving."""

import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from sdbackup.client.session import ClientError
from sdbackup.protocols.messages import (
    PROTOCOL_VERSION,
    CommitFiles,
    FileEntry,
    Hello,
    StoreChunk,
    encode_frame,
)
from sdbackup.protocols.peer import RemoteError

from .test_cluster import backup, restore, write


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


@pytest.mark.parametrize("bad", [
    pytest.param(HELLO + struct.pack("!I", 2**31), id="oversized-frame"),
    pytest.param(HELLO + frame(b"\xff\xff garbage that is not a message"), id="unknown-type"),
    pytest.param(HELLO + frame(b"\x00\x0a\x00\x00\x00\x05{nope"), id="malformed-header"),
    pytest.param(frame(encode_frame(StoreChunk(chunk_id="a" * 64, checksum="b" * 64))),
                 id="no-handshake"),
    pytest.param(HELLO + frame(encode_frame(Hello(version=PROTOCOL_VERSION, role="client"))),
                 id="unexpected-message"),
])
@pytest_twisted.ensureDeferred
async def test_bad_frames_close_only_that_connection(cluster, tmp_path, monkeypatch, bad):
    server = cluster.servers[0]
    # The server answers with its own Hello at most, then closes the connection.
    received = await deferToThread(send_raw, port_of(server.server.address), bad)
    assert len(received) <= len(HELLO)
    # The server closed that connection and still serves everyone else.
    monkeypatch.chdir(tmp_path)
    write("src/a", os.urandom(100_000))
    await backup(cluster, "src")
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == (tmp_path / "src/a").read_bytes()


@pytest_twisted.ensureDeferred
async def test_peer_vanishing_mid_chunk_leaves_nothing(cluster, tmp_path, monkeypatch):
    server = cluster.servers[0]
    data = os.urandom(1024 * 1024)
    whole = frame(encode_frame(StoreChunk(chunk_id="c" * 64, checksum="c" * 64, payload=data)))
    await deferToThread(send_raw, port_of(server.server.address), HELLO + whole[: len(whole) // 2],
                        wait_for_close=False)
    # The server keeps serving others...
    monkeypatch.chdir(tmp_path)
    write("src/a", b"still here")
    await backup(cluster, "src")
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == b"still here"
    # ...and the half-sent chunk left no trace.
    assert os.listdir(server.store.incoming) == []
    assert not server.store.has("c" * 64)


@pytest_twisted.ensureDeferred
async def test_a_chunk_with_a_wrong_checksum_is_refused(cluster):
    session = await cluster.session()
    try:
        address = cluster.servers[0].server.address
        with pytest.raises(RemoteError) as caught:
            await session.servers.request(address, StoreChunk(
                chunk_id="d" * 64, checksum="d" * 64, payload=b"not what the checksum says"))
        assert caught.value.code == "checksum-mismatch"
        assert cluster.servers[0].store.count() == 0
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_manager_refuses_unsafe_paths(cluster):
    session = await cluster.session()
    try:
        from sdbackup.protocols.messages import BeginSnapshot
        begun = await session.ask(BeginSnapshot(host="h", paths=["x"]))
        for path in ["../escape", "/etc/passwd", "a/../../b"]:
            with pytest.raises(RemoteError) as caught:
                await session.ask(CommitFiles(snapshot_id=begun.snapshot_id, files=[
                    FileEntry(path=path, kind="file", mode=0o644, mtime_ns=0)]))
            assert caught.value.code == "unsafe-path"
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_restore_never_writes_outside_the_target(cluster, tmp_path, monkeypatch):
    """A tampered catalog (paths with .., a link out of the target) cannot escape it."""
    monkeypatch.chdir(tmp_path)
    write("src/ok", b"fine")
    result = await backup(cluster, "src")
    outside = tmp_path / "outside"
    outside.mkdir()
    db = cluster.manager.manager.catalog.db
    chunk_row = db.execute("SELECT chunk_id, size, checksum FROM file_chunks").fetchone()
    rows = [
        ("../escape", "file"),
        ("src/link", "symlink"),
        ("src/link/evil", "file"),
    ]
    for path, kind in rows:
        db.execute("INSERT INTO files (snapshot_id, path, kind, mode, mtime_ns, size, file_hash,"
                   " link_target) VALUES (?, ?, ?, 420, 0, 4, ?, ?)",
                   (result.snapshot_id, path, kind, "", str(outside) if kind == "symlink" else ""))
        if kind == "file":
            db.execute("INSERT INTO file_chunks VALUES (?, ?, 0, ?, ?, ?)",
                       (result.snapshot_id, path, *chunk_row))
    # The link exists before the restore writes through it: a second restore would meet it.
    target = tmp_path / "out"
    (target / "src").mkdir(parents=True)
    os.symlink(outside, target / "src/link")
    restored = await restore(cluster, target)
    assert (target / "src/ok").read_bytes() == b"fine"
    assert os.listdir(outside) == []
    assert not (tmp_path / "escape").exists()
    assert len(restored.errors) >= 2


@pytest_twisted.ensureDeferred
async def test_backup_fails_over_from_an_unreachable_server(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(6 * 1024 * 1024)
    write("src/a", data)
    # One server stays registered with the manager but stops accepting connections.
    unreachable = cluster.servers[2]
    await unreachable.port.stopListening()
    result = await backup(cluster, "src")
    # The chunks went to the two other servers instead, two copies each.
    assert not any("copies" in w for w in result.warnings)
    assert unreachable.store.count() == 0
    held = [set(server.store.chunk_ids()) for server in cluster.servers[:2]]
    assert held[0] and held[0] == held[1]
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_manager_unreachable_is_a_clear_error(tmp_path):
    from sdbackup.client.session import Session
    with pytest.raises(ClientError, match="cannot reach the manager"):
        await Session(reactor, "tcp:127.0.0.1:1").connect()
