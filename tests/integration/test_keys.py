"""The manager's index of key objects (encrypted repositories), over the wire: listed per
repository, never its last one removed, removed keys deleted on the servers, the index rebuilt
from the servers after a restart, and a sealed snapshot indexed from its public part only."""

import os

import pytest
import pytest_twisted

from sdbackup import objects, sealing
from sdbackup.objects import Kind
from sdbackup.protocols.messages import CommitKey, CommitSnapshot, KeyList, ListKeys, RemoveKey
from sdbackup.protocols.peer import RemoteError

#: The least scrypt cost a key object may carry: only wrapping is exercised here.
CHEAP = 2**10


def _key(repo: str, password: bytes, master: bytes) -> tuple[str, bytes]:
    data = sealing.encode_key(sealing.wrap(master, repo, password, n=CHEAP))
    return sealing.key_id(data), data


async def _add(wire_client, repo: str, password: bytes, master: bytes) -> str:
    key_id, data = _key(repo, password, master)
    await wire_client.store(Kind.KEY, [(key_id, data)])
    committed = await wire_client.ask(CommitKey(key_id=key_id))
    assert (committed.key_id, committed.repo) == (key_id, repo)
    return key_id


async def _keys(wire_client, repo: str) -> list[str]:
    reply = await wire_client.ask(ListKeys(repo=repo))
    assert isinstance(reply, KeyList)
    return reply.key_ids


async def _keys_anew(cluster, repo: str) -> list[str]:
    """The keys listed to a new connection (the old one ended with the manager's restart)."""
    client = await cluster.wire_client()
    try:
        return await _keys(client, repo)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_keys_are_listed_per_repository_and_the_last_one_stays(cluster, wire_client):
    master = os.urandom(32)
    first = await _add(wire_client, "alpha", b"one", master)
    second = await _add(wire_client, "alpha", b"two", master)
    other = await _add(wire_client, "beta", b"three", os.urandom(32))
    assert await _keys(wire_client, "alpha") == sorted([first, second])
    assert await _keys(wire_client, "beta") == [other]
    assert await _keys(wire_client, "default") == []

    await wire_client.ask(RemoveKey(key_id=first))
    assert await _keys(wire_client, "alpha") == [second]
    for server in cluster.servers:
        assert not server.store.has(first)
    with pytest.raises(RemoteError) as refused:
        await wire_client.ask(RemoveKey(key_id=second))
    assert refused.value.code == "key-refused" and "last key" in refused.value.reason
    with pytest.raises(RemoteError) as unknown:
        await wire_client.ask(RemoveKey(key_id=first))
    assert unknown.value.code == "key-refused"


@pytest_twisted.ensureDeferred
async def test_a_restarted_manager_lists_the_keys_again(cluster, wire_client):
    key_id = await _add(wire_client, "alpha", b"one", os.urandom(32))
    await cluster.restart_manager()
    await cluster.until_ready()
    assert await _keys_anew(cluster, "alpha") == [key_id]


@pytest_twisted.ensureDeferred
async def test_a_sealed_snapshot_is_indexed_without_paths_or_tags(cluster, wire_client):
    sealer = sealing.Sealer("alpha", os.urandom(32))
    tree = sealer.seal(Kind.TREE, objects.encode_tree(objects.make_tree([])))
    tree_id = objects.object_id(Kind.TREE, tree)
    snapshot = sealer.seal(Kind.SNAPSHOT, objects.encode_snapshot(objects.Snapshot(
        time_ns=1_700_000_000 * 10**9, host="laptop", paths=(b"/home/secret",),
        tree=bytes.fromhex(tree_id), tags=("secret-tag",), summary={"files": 0, "dirs": 1})))
    snapshot_id = objects.object_id(Kind.SNAPSHOT, snapshot)
    await wire_client.store(Kind.TREE, [(tree_id, tree)])
    await wire_client.store(Kind.SNAPSHOT, [(snapshot_id, snapshot)])
    summary = (await wire_client.ask(CommitSnapshot(snapshot_id=snapshot_id))).snapshot
    assert (summary.host, summary.tree, summary.dirs) == ("laptop", tree_id, 1)
    assert (summary.paths, summary.tags, summary.parent) == ([], [], "")


@pytest_twisted.ensureDeferred
async def test_a_key_removed_while_a_server_was_down_stays_removed_after_a_restart(cluster, wire_client):
    """The down server still holds the removed key when it comes back; the manager, restarted
    meanwhile, remembers the removal (in its catalog), does not list the key again, and has
    the server delete it."""
    master = os.urandom(32)
    kept = await _add(wire_client, "alpha", b"one", master)
    removed = await _add(wire_client, "alpha", b"two", master)
    holders = [i for i, s in enumerate(cluster.servers) if s.store.has(removed)]
    down = cluster.servers[holders[0]]
    await cluster.stop_server(down)
    await wire_client.ask(RemoveKey(key_id=removed))
    await cluster.restart_manager()
    await cluster.until_ready()
    back = await cluster.add_server(holders[0], f"tcp:{down.server.address.rsplit(':', 1)[1]}")
    await cluster.until(lambda: not back.store.has(removed), what="the removed key deleted")
    assert await _keys_anew(cluster, "alpha") == [kept]


@pytest_twisted.ensureDeferred
async def test_two_inits_at_once_never_leave_two_master_keys(cluster, wire_client):
    """Both clients stored their key before either committed (as two ``init``s at the same
    moment): the second commit is refused and its key removed, so the repository has one key,
    the first client's, and the second client's password opens nothing."""
    first_id, first_data = _key("alpha", b"one", os.urandom(32))
    second_id, second_data = _key("alpha", b"two", os.urandom(32))
    await wire_client.store(Kind.KEY, [(first_id, first_data), (second_id, second_data)])
    await wire_client.ask(CommitKey(key_id=first_id, first=True))
    with pytest.raises(RemoteError) as refused:
        await wire_client.ask(CommitKey(key_id=second_id, first=True))
    assert refused.value.code == "key-refused" and "initialised meanwhile" in refused.value.reason
    assert await _keys(wire_client, "alpha") == [first_id]
    for server in cluster.servers:
        assert not server.store.has(second_id)
