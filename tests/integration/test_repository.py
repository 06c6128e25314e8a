"""The client's reads of the repository (``client/repository.py``) against an in-process
cluster: snapshots listed page by page, ``latest`` and id prefixes, files whose chunk ids sit
in chunk lists, an encrypted repository opened on the way (and its sealed bytes on demand),
and a holder that cannot be reached named with its reason."""

import os

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory

from sdbackup import objects, sealing
from sdbackup.client.backup import Backup
from sdbackup.client.repository import ChunkUnavailable, Repository
from sdbackup.client.restore import Restore
from sdbackup.client.session import ClientError
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ChunksData
from sdbackup.services.dagcheck import DagCheck

from .test_cluster import write
from .test_lying_peers import data_chunks, files_under, garbage, lie_on_reads


async def backup(cluster, path, sealer=None) -> str:
    session = await cluster.session()
    if sealer is not None:
        session.sealer = sealer
    try:
        return (await Backup(session, [str(path)]).run()).snapshot_id
    finally:
        await session.close()


async def restored_encrypted(cluster, tmp_path, source: dict) -> tuple:
    """``source`` (path -> bytes) written under ``tmp_path``, backed up from ``src`` into a new
    encrypted repository and restored to ``out``: the restore's result, then a session (to
    close) and a Repository with the key, and the snapshot."""
    for path, data in source.items():
        write(tmp_path / path, data)
    sealer = sealing.Sealer(sealing.DEFAULT_REPO, sealing.new_master_key())
    await backup(cluster, "src", sealer)
    session = await cluster.session()
    session.sealer = sealer
    try:
        result = await Restore(session, "latest", str(tmp_path / "out"), ()).run()
        repository = Repository(session)
        snapshot = await repository.load_snapshot((await repository.resolve("latest")).snapshot_id)
    except BaseException:
        await session.close()
        raise
    return result, session, repository, snapshot


@pytest_twisted.ensureDeferred
async def test_snapshots_are_read_page_by_page_and_latest_is_the_newest(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = cluster.manager.manager
    honest = manager.handle_ListSnapshots

    def small_pages(msg, connection):  # three a page, so 17 take six pages
        return honest(attrs.evolve(msg, limit=3), connection)

    manager.handle_ListSnapshots = small_pages
    taken = []
    for i in range(17):  # two ids share their first hex digit at least
        write(tmp_path / "src" / "f", f"version {i}".encode())
        taken.append(await backup(cluster, "src"))

    session = await cluster.session()
    try:
        repository = Repository(session)
        listed = [s.snapshot_id for s in await repository.snapshots()]
        latest = await repository.resolve("".join(["lat", "est"]))  # as typed: not interned
        second = await repository.resolve(taken[1][:10])
        for ref in ("ffff", "zzzz", "LATEST"):
            with pytest.raises(ClientError, match=f"no snapshot '{ref}'"):
                await repository.resolve(ref)
        shared = next(i[0] for i in taken if sum(t.startswith(i[0]) for t in taken) > 1)
        with pytest.raises(ClientError, match=f"'{shared}' names several snapshots"):
            await repository.resolve(shared)
    finally:
        await session.close()
    assert listed == taken
    assert latest.snapshot_id == taken[-1] and second.snapshot_id == taken[1]


@pytest_twisted.ensureDeferred
async def test_an_encrypted_repository_with_chunk_lists_restores_through_its_key(
        cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(objects, "INLINE_CONTENT", 2)  # a file of 3 chunks or more has lists
    source = {"src/big": os.urandom(9 * 1024 * 1024), "src/small": b"the marker " * 50}  # 3+ chunks
    result, session, repository, snapshot = await restored_encrypted(cluster, tmp_path, source)
    try:
        big = await repository.find(snapshot.tree, b"src/big")
        listed = [chunk_id async for chunk_id in repository.content(big)]
        stored = await data_chunks(cluster)
        sealed = await repository.fetch_many(Kind.DATA, await repository.locate(list(stored)),
                                             opened=False)
        opened = await repository.fetch_many(Kind.DATA, await repository.locate(list(stored)))
    finally:
        await session.close()

    assert result.errors == [] and files_under(tmp_path / "out") == source
    assert big.content_lists and len(listed) >= 3 and set(c.hex() for c in listed) <= set(stored)
    assert sealed == stored  # as the servers hold them: sealed
    assert all(b"the marker" not in data for data in stored.values())
    assert b"".join(opened[c.hex()] for c in listed) == source["src/big"]


@pytest_twisted.ensureDeferred
async def test_a_holder_that_cannot_be_reached_is_named_with_its_reason(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "src" / "f", b"some words")
    await backup(cluster, "src")
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    closed = f"tcp:127.0.0.1:{listening.getHost().port}"
    await listening.stopListening()  # nothing listens there now
    chunk_id = next(iter(await data_chunks(cluster)))
    session = await cluster.session()
    try:
        repository = Repository(session)
        found = await repository.fetch_many(Kind.DATA, {chunk_id: [closed]})
        with pytest.raises(ChunkUnavailable) as one:
            await repository.fetch(Kind.DATA, chunk_id, [closed])
        with pytest.raises(ChunkUnavailable) as nowhere:
            await repository.fetch(Kind.DATA, chunk_id, [])
    finally:
        await session.close()
    for error in (found[chunk_id], one.value):
        assert isinstance(error, ChunkUnavailable)
        assert error.args[0].startswith(f"no good copy of data {chunk_id[:16]}: {closed}: ")
        assert "refused" in error.args[0].lower(), error
    assert str(nowhere.value) == f"no server holds data {chunk_id[:16]}"


@pytest_twisted.ensureDeferred
async def test_a_holder_whose_reply_names_nothing_is_left_not_asked_forever(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "src" / "f", b"some words")
    await backup(cluster, "src")
    chunks = await data_chunks(cluster)
    mute = cluster.servers[0]

    async def nothing(msg, connection):
        return ChunksData(request_id=msg.request_id)

    mute.server.handle_FetchChunks = nothing
    session = await cluster.session()
    try:
        found = await Repository(session).fetch_many(
            Kind.DATA, {c: [mute.server.address] for c in chunks})
    finally:
        await session.close()
    assert all(str(found[c]) == f"no good copy of data {c[:16]}: {mute.server.address}: answered "
               f"nothing" for c in chunks), found


@pytest_twisted.ensureDeferred
async def test_in_an_encrypted_repository_bad_copies_and_another_keys_chunks_are_refused(
        cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "src" / "f", os.urandom(100_000))
    sealer = sealing.Sealer(sealing.DEFAULT_REPO, sealing.new_master_key())
    await backup(cluster, "src", sealer)
    chunks = await data_chunks(cluster)
    session = await cluster.session()
    session.sealer = sealing.Sealer(sealing.DEFAULT_REPO, sealing.new_master_key())  # not its key
    try:
        repository = Repository(session)
        wanted = await repository.locate(list(chunks))
        with pytest.raises(ChunkUnavailable, match=r"^data [0-9a-f]{16} cannot be opened: "):
            await repository.fetch_many(Kind.DATA, wanted)  # another key's: the read fails
        session.sealer = sealer
        for server in cluster.servers:
            lie_on_reads(server, {Kind.DATA}, garbage)
        lied = await repository.fetch_many(Kind.DATA, wanted)
    finally:
        await session.close()
    for chunk_id in chunks:
        assert isinstance(lied[chunk_id], ChunkUnavailable), lied[chunk_id]


@pytest_twisted.ensureDeferred
async def test_a_folder_stored_as_pages_restores_and_the_managers_walk_reaches_its_pages(
        cluster, tmp_path, monkeypatch):
    """A folder too large for one tree object (pages of 4 KiB here), in an encrypted
    repository: a restore brings every entry back, a path inside it is found, and the
    manager's walk of the graph, which has no key, reads every page and misses nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(objects, "TREE_PAGE_SIZE", 4096)
    source = {f"src/crowded/file {i:03d}": f"entry {i}".encode() for i in range(400)}
    result, session, repository, snapshot = await restored_encrypted(cluster, tmp_path, source)
    try:
        crowded = await repository.find(snapshot.tree, b"src/crowded")
        head = objects.decode_tree(await repository.fetch_object(Kind.TREE, crowded.subtree.hex()))
        inside = await repository.find(snapshot.tree, b"src/crowded/file 321")
    finally:
        await session.close()
    assert result.errors == [] and files_under(tmp_path / "out") == source
    assert isinstance(head, objects.TreeHead) and len(head.pages) > 10
    assert inside.size == len(b"entry 321")

    manager = cluster.manager.manager
    walk = await DagCheck(manager).run(await manager.db(manager.catalog.snapshots))
    assert (walk.missing, walk.damaged) == (set(), [])
    assert walk.trees == len(head.pages) + 3  # the pages, their head, src and the root
