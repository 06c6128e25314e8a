"""A whole backup against a manager and three servers in this process: the snapshot object,
the parent chosen like restic, and an unchanged backup that stores almost nothing."""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from sdbackup.client.backup import Backup
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


async def backup(cluster, paths, **options):
    session = await cluster.session()
    try:
        return await Backup(session, [str(p) for p in paths], **options).run()
    finally:
        await session.close()


def stored_objects(cluster) -> dict:
    """Copies of each kind of chunk and object on the servers."""
    kinds = [server.store.get(c)[0] for server in cluster.servers for c in server.store.chunk_ids()]
    return {kind: kinds.count(kind) for kind in set(kinds)}


@pytest_twisted.ensureDeferred
async def test_a_backup_is_a_snapshot_object_the_manager_lists(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(30):
        write(f"src/d{i % 3}/f{i}", os.urandom(100 + i))
    os.symlink("d0", "src/link")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("src/sock")
    try:
        result = await backup(cluster, ["src"], tags=("daily",))
    finally:
        listener.close()
    assert (result.files, result.dirs, result.parent) == (31, 4, "")
    assert result.warnings == [] and len(result.notes) == 1 and "socket" in result.notes[0]
    session = await cluster.session()
    try:
        repository = Repository(session)
        [summary] = await repository.snapshots()
        assert summary.snapshot_id == result.snapshot_id
        assert (summary.paths, summary.host, summary.files, summary.dirs) == (
            ["src"], socket.gethostname(), 31, 4)
        snapshot = await repository.load_snapshot(result.snapshot_id)
        assert snapshot.paths == (b"src",) and snapshot.tags == ("daily",)
        assert snapshot.summary["bytes"] == result.bytes == sum(100 + i for i in range(30))
        node = await repository.find(snapshot.tree, b"src/d1/f4")
        chunks = [c async for c in repository.content(node)]
        data = b"".join([await repository.fetch_object("data", c.hex()) for c in chunks])
        assert data == (tmp_path / "src/d1/f4").read_bytes()
        assert (await repository.find(snapshot.tree, b"src/link")).target == b"d0"
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_an_unchanged_backup_stores_only_its_snapshot(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(200):
        write(f"src/{i % 7}/{i}", os.urandom(1000 + i))
    write("src/big", os.urandom(5 * 1024 * 1024))
    first = await backup(cluster, ["src"])
    before = stored_objects(cluster)
    second = await backup(cluster, ["src"])
    assert (second.parent, second.unchanged, second.new_bytes) == (first.snapshot_id, 201, 0)
    assert second.snapshot_id != first.snapshot_id
    # No file data, no tree: the snapshot object alone, twice (2 replicas).
    assert stored_objects(cluster) == before | {"snapshot": 4}
    session = await cluster.session()
    try:
        repository = Repository(session)
        old, new = [await repository.load_snapshot(s.snapshot_id)
                    for s in (first, second)]
        assert new.tree == old.tree and new.parent == bytes.fromhex(first.snapshot_id)
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_the_parent_is_the_latest_of_this_host_with_the_same_set_of_paths(
        cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write("a/f", b"in a")
    write("b/f", b"in b")
    first = await backup(cluster, ["a", "b"])
    assert first.parent == ""
    reordered = await backup(cluster, ["b", "a"])
    assert (reordered.parent, reordered.unchanged) == (first.snapshot_id, 2)
    assert (await backup(cluster, ["a"])).parent == ""  # another set of paths
    assert (await backup(cluster, ["a", "b"], host="elsewhere")).parent == ""
    forced = await backup(cluster, ["a", "b"], force=True)
    assert (forced.parent, forced.unchanged) == ("", 0)
    # Asked for by a prefix of its id: used whatever its paths.
    chosen = await backup(cluster, ["a"], parent=first.snapshot_id[:12])
    assert (chosen.parent, chosen.unchanged) == (first.snapshot_id, 1)


@pytest_twisted.ensureDeferred
async def test_a_tag_too_long_to_list_is_refused_before_anything_is_stored(cluster, tmp_path):
    write(tmp_path / "a.txt", b"some data")
    with pytest.raises(ClientError, match="one of the tags is 300 characters long, more than 255"):
        await backup(cluster, [tmp_path / "a.txt"], tags=("t" * 300,))
    assert stored_objects(cluster) == {}
    session = await cluster.session()
    try:
        assert await Repository(session).snapshots() == []
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_a_placement_that_fails_at_once_fails_the_backup_instead_of_hanging(cluster, tmp_path):
    # A request fails before anything is sent when its message cannot be encoded, or when its
    # link is closed already. The walk's last batch then failed inside its flush, before the
    # walk waited for it: the backup waited for good, logging nothing.
    write(tmp_path / "src" / "a.txt", b"some data")
    session = await cluster.session()

    def drop_the_manager_link(change, path):  # after the parent lookup, before the placement
        session.manager.transport.abortConnection()

    try:
        run = defer.ensureDeferred(
            Backup(session, [str(tmp_path / "src")], listed=drop_the_manager_link).run())
        with pytest.raises(ClientError, match=r"lost the manager at .*connection already closed"):
            await run.addTimeout(20, reactor)
    finally:
        await session.close()
    assert stored_objects(cluster) == {}
