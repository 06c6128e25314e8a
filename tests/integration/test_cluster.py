"""A manager and three servers in one process: backup, restore, replication, repair on read."""

import io
import os
import random

import pytest_twisted

from sdbackup import hashing
from sdbackup.chunking import cut, read_chunks
from sdbackup.client.backup import Backup
from sdbackup.client.repository import verify
from sdbackup.client.restore import Restore
from sdbackup.protocols.messages import FetchChunk
from sdbackup.protocols.peer import RemoteError


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


async def backup(cluster, *paths):
    session = await cluster.session()
    try:
        return await Backup(session, [str(p) for p in paths]).run()
    finally:
        await session.close()


async def restore(cluster, target, snapshot="latest", includes=()):
    session = await cluster.session()
    try:
        return await Restore(session, snapshot, str(target), includes).run()
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_backup_then_restore_small_files(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(300):
        write(f"src/d{i % 7}/file {i}.txt", f"contents {i}\n".encode() * (i % 5))
    result = await backup(cluster, "src")
    restored = await restore(cluster, tmp_path / "out")
    assert restored.errors == []
    for i in range(300):
        with open(tmp_path / f"out/src/d{i % 7}/file {i}.txt", "rb") as f:
            assert f.read() == f"contents {i}\n".encode() * (i % 5)
    assert result.entries == 308  # 300 files, 7 folders and src itself


def chunk_files(server) -> list[str]:
    return sorted(server.store.chunk_ids())


@pytest_twisted.ensureDeferred
async def test_large_file_is_on_exactly_two_servers_and_restores(cluster, tmp_path):
    data = os.urandom(24 * 1024 * 1024 + 12345)
    write(tmp_path / "big.bin", data)
    result = await backup(cluster, tmp_path / "big.bin")
    assert result.bytes == len(data)
    holders = {}
    for server in cluster.servers:
        for chunk_id in chunk_files(server):
            holders.setdefault(chunk_id, []).append(server.server.address)
    data_ids = {hashing.chunk_id(bytes(c)) for c in read_chunks(io.BytesIO(data))}
    objects = set(holders) - data_ids
    assert data_ids <= set(holders)
    # Besides the data: one tree per folder on the path to the file, and the snapshot.
    folders = len(str(tmp_path).strip("/").split("/"))
    assert len(objects) == folders + 1 + 1
    # Trees and the snapshot have two copies, like the data.
    assert {c: len(s) for c, s in holders.items() if len(s) != 2} == {}
    # Placement spreads the copies: every server holds some of them.
    assert all(chunk_files(server) for server in cluster.servers)
    await restore(cluster, tmp_path / "out")
    restored = tmp_path / "out" / str(tmp_path / "big.bin").lstrip("/")
    assert restored.read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_empty_file_and_empty_folder(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("src/empty", b"")
    os.makedirs("src/nothing/here")
    os.chmod("src/empty", 0o640)
    os.utime("src/empty", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    await backup(cluster, "src")
    await restore(cluster, tmp_path / "out")
    st = os.stat(tmp_path / "out/src/empty")
    assert st.st_size == 0
    assert st.st_mode & 0o777 == 0o640
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.path.isdir(tmp_path / "out/src/nothing/here")


@pytest_twisted.ensureDeferred
async def test_a_corrupt_copy_is_restored_from_the_other(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(12 * 1024 * 1024)
    write("src/file", data)
    await backup(cluster, "src")
    # Damage every copy one server holds: flip the last byte of each chunk's payload.
    damaged = max(cluster.servers, key=lambda s: len(chunk_files(s)))
    bad = chunk_files(damaged)
    for chunk_id in bad:
        with open(damaged.store.path_for(chunk_id), "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
    # Reads spread over both copies, so the restore meets bad copies and falls back.
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    assert (tmp_path / "out/src/file").read_bytes() == data
    # A bad copy is never served: asked directly, the server refuses each one, or serves a
    # good copy the manager's repair has put back since; the bad ones are in quarantine/.
    session = await cluster.session()
    try:
        for chunk_id in bad:
            try:
                reply = await session.servers.request(damaged.server.address,
                                                      FetchChunk(chunk_id=chunk_id))
            except RemoteError as refused:
                assert refused.code in ("chunk-corrupt", "chunk-missing")
            else:
                assert verify(reply.kind, chunk_id, reply.checksum, reply.payload)
    finally:
        await session.close()
    assert len(os.listdir(damaged.store.quarantine)) == len(bad)


@pytest_twisted.ensureDeferred
async def test_restore_while_one_server_is_down(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {f"src/f{i}": os.urandom(200_000 + i) for i in range(20)}
    for name, data in files.items():
        write(name, data)
    await backup(cluster, "src")
    await cluster.servers[1].stopService()
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_every_backup_is_a_new_snapshot_and_old_ones_stay(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("src/a", b"first version")
    first = await backup(cluster, "src")
    write("src/a", b"second version, longer")
    second = await backup(cluster, "src")
    assert first.snapshot_id != second.snapshot_id
    await restore(cluster, tmp_path / "old", snapshot=first.snapshot_id)
    await restore(cluster, tmp_path / "new")
    assert (tmp_path / "old/src/a").read_bytes() == b"first version"
    assert (tmp_path / "new/src/a").read_bytes() == b"second version, longer"


@pytest_twisted.ensureDeferred
async def test_unchanged_data_is_not_sent_again(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("src/a", os.urandom(2 * 1024 * 1024))
    first = await backup(cluster, "src")
    second = await backup(cluster, "src")
    assert first.new_bytes == 2 * 1024 * 1024
    assert second.new_bytes == 0


@pytest_twisted.ensureDeferred
async def test_restore_include_restores_only_that_part(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("src/keep/one", b"1")
    write("src/skip/two", b"2")
    await backup(cluster, "src")
    await restore(cluster, tmp_path / "out", includes=["src/keep"])
    assert (tmp_path / "out/src/keep/one").read_bytes() == b"1"
    assert not os.path.exists(tmp_path / "out/src/skip")


@pytest_twisted.ensureDeferred
async def test_a_long_file_keeps_its_chunk_ids_in_chunk_lists(cluster, tmp_path, monkeypatch):
    """A file with more chunks than a tree node holds inline lists them in chunk list objects,
    stored and replicated like trees, and restores exactly."""
    from sdbackup import objects

    monkeypatch.setattr(objects, "INLINE_CONTENT", 3)
    monkeypatch.chdir(tmp_path)
    # (random bytes of a fixed seed: some draws of os.urandom cut into as few as 6 chunks)
    data = random.Random(0).randbytes(10 * 1024 * 1024 + 7)
    assert len(cut(data, True)[0]) == 12  # lists of 3, 3, 3 and 3
    write("src/long", data)
    for i in range(6):
        write(f"src/short{i}", os.urandom(2 * 1024 * 1024))
    first = await backup(cluster, "src")
    lists = [(s, chunk_id) for s in cluster.servers for chunk_id in chunk_files(s)
             if s.store.get(chunk_id)[0] == "list"]
    assert len(lists) >= 2 * 4  # the long file's four lists, two copies each
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    assert (tmp_path / "out/src/long").read_bytes() == data
    for i in range(6):
        assert (tmp_path / f"out/src/short{i}").read_bytes() == (tmp_path / f"src/short{i}").read_bytes()
    # Unchanged, the long file is taken from the parent's lists without being read.
    second = await backup(cluster, "src")
    assert (second.unchanged, second.new_bytes) == (7, 0)
    assert first.snapshot_id != second.snapshot_id


@pytest_twisted.ensureDeferred
async def test_too_few_servers_is_said_clearly(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for server in cluster.servers[1:]:
        await cluster.stop_server(server)
    write("src/a", b"one copy only")
    result = await backup(cluster, "src")
    assert any("only 1 of 2 copies" in w for w in result.warnings)
    await restore(cluster, tmp_path / "out")
    assert (tmp_path / "out/src/a").read_bytes() == b"one copy only"


@pytest_twisted.ensureDeferred
async def test_unchanged_files_are_not_read_again(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(20):
        write(f"src/f{i}", os.urandom(50_000 + i))
    first = await backup(cluster, "src")
    assert first.unchanged == 0
    second = await backup(cluster, "src")
    assert (second.unchanged, second.new_bytes) == (20, 0)
    # A file written again (same size, new bytes) has a new ctime: it is read.
    write("src/f3", os.urandom(50_003))
    third = await backup(cluster, "src")
    assert third.unchanged == 19
    assert third.new_bytes == 50_003
    await restore(cluster, tmp_path / "out")
    for i in range(20):
        assert (tmp_path / f"out/src/f{i}").read_bytes() == (tmp_path / f"src/f{i}").read_bytes()
    # Another set of paths is another history: nothing is taken from this one.
    other = await backup(cluster, "src/f1")
    assert other.unchanged == 0


@pytest_twisted.ensureDeferred
async def test_several_large_files_restore_at_once(cluster, tmp_path, monkeypatch):
    """Files restored side by side share a window of chunks; none may wait for another."""
    monkeypatch.chdir(tmp_path)
    files = {f"src/big{i}": os.urandom(12 * 1024 * 1024 + i) for i in range(5)}
    for name, data in files.items():
        write(name, data)
    await backup(cluster, "src")
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
