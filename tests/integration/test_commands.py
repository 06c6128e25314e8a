"""``dump``, ``find`` and ``diff`` on snapshots crafted with ``sdbackup.objects`` and stored
through the protocol (as a client, or an attacker, would store them) in a cluster in this
process: what a crafted tree cannot make them do, and what they skip reading."""

import os

import attrs
import blake3
import pytest
import pytest_twisted

from sdbackup import hashing, objects
from sdbackup.client import diff, dump, tagging
from sdbackup.client.find import Finder, Pattern
from sdbackup.client.repository import Repository
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import CommitSnapshot, ListSnapshots, Locate, ReplaceSnapshot
from sdbackup.protocols.peer import RemoteError


class Crafted:
    """Objects of a crafted snapshot, stored and committed together."""

    def __init__(self):
        self.pieces: dict[str, dict[str, bytes]] = {Kind.DATA: {}, Kind.LIST: {}, Kind.TREE: {}}

    def file(self, name: bytes, data: bytes, chunk: int = 10_000, in_lists: bool = False,
             **fields) -> Node:
        ids = []
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            self.pieces[Kind.DATA][hashing.chunk_id(piece)] = piece
            ids.append(bytes.fromhex(hashing.chunk_id(piece)))
        content, lists = tuple(ids), ()
        if in_lists:
            encoded = objects.encode_chunk_list(ids)
            list_id = objects.object_id(Kind.LIST, encoded)
            self.pieces[Kind.LIST][list_id] = encoded
            content, lists = (), (bytes.fromhex(list_id),)
        fields.setdefault("hash", blake3.blake3(data).digest())
        fields.setdefault("size", len(data))
        return Node(name=name, type="file", mode=0o644, content=content, content_lists=lists,
                    **fields)

    def folder(self, name: bytes, nodes) -> Node:
        return Node(name=name, type="dir", mode=0o755, subtree=self.tree(nodes))

    def tree(self, nodes) -> bytes:
        encoded = objects.encode_tree(objects.make_tree(nodes))
        tree_id = objects.object_id(Kind.TREE, encoded)
        self.pieces[Kind.TREE][tree_id] = encoded
        return bytes.fromhex(tree_id)

    async def commit(self, wire_client, nodes, tag: str) -> tuple[str, bytes]:
        root = self.tree(nodes)
        snapshot = objects.encode_snapshot(objects.Snapshot(
            time_ns=1, host="crafted", paths=(b"c",), tree=root, tags=(tag,)))
        snapshot_id = objects.object_id(Kind.SNAPSHOT, snapshot)
        for kind, pieces in self.pieces.items():
            if pieces:
                await wire_client.store(kind, list(pieces.items()))
        await wire_client.store(Kind.SNAPSHOT, [(snapshot_id, snapshot)])
        await wire_client.ask(CommitSnapshot(snapshot_id=snapshot_id))
        return snapshot_id, root


@pytest_twisted.async_yield_fixture
async def session(cluster):
    connected = await cluster.session()
    try:
        yield connected
    finally:
        await connected.close()


@pytest_twisted.ensureDeferred
async def test_dump_refuses_a_file_whose_bytes_do_not_match_its_hash(wire_client, session, tmp_path):
    crafted = Crafted()
    data = os.urandom(95_000)
    good = crafted.file(b"good", data, in_lists=True)
    lying = crafted.file(b"lying", data, hash=blake3.blake3(b"something else").digest())
    short = crafted.file(b"short", data, size=len(data) + 1)
    await crafted.commit(wire_client, [good, lying, short], "dump")
    repository = Repository(session)

    with open(tmp_path / "good", "wb") as out:
        assert await dump.dump_file(repository, (b"good",), good, out) == len(data)
    assert (tmp_path / "good").read_bytes() == data
    for node, why in ((lying, "do not match the file's hash"), (short, "the snapshot says")):
        with open(tmp_path / "bad", "wb") as out, pytest.raises(dump.DumpError, match=why):
            await dump.dump_file(repository, (node.name,), node, out)
        # In a tar too, whether the file goes in a batch of small files or streams alone.
        for batched in (True, False):
            with open(tmp_path / "bad.tar", "wb") as out, pytest.raises(dump.DumpError, match=why):
                tar = dump.TarDump(repository, out)
                await tar.add((b"good",), good)
                await tar.add((node.name,), node if batched else attrs.evolve(
                    node, content=(), content_lists=good.content_lists))
                await tar.close()


@pytest_twisted.ensureDeferred
async def test_find_and_diff_skip_subtrees_both_snapshots_share(wire_client, session):
    crafted = Crafted()
    shared = crafted.folder(b"shared", [crafted.folder(bytes([97 + i]), [
        crafted.file(b"f%d" % i, b"data %d" % i)]) for i in range(5)])
    _, first = await crafted.commit(wire_client, [shared, crafted.file(b"x.txt", b"one")], "a")
    _, second = await crafted.commit(wire_client, [shared, crafted.file(b"x.txt", b"two"),
                                                   crafted.file(b"y.txt", b"new")], "b")
    repository = Repository(session)

    finder = Finder(repository, [Pattern("*.txt")])
    found = [[path async for path, _ in finder.matches(root)] for root in (first, second)]
    assert found == [[(b"x.txt",)], [(b"x.txt",), (b"y.txt",)]]
    # The shared folder (6 trees) is read once; the second snapshot skips it unread.
    assert finder.trees_read == 2 + 6 and finder.trees_skipped == 1

    loaded = []
    loader = diff.TreeLoader(repository)
    load = loader.load

    async def counting(tree_id):
        loaded.append(tree_id)
        return await load(tree_id)

    loader.load = counting
    stats = diff.DiffStats()
    changes = [(c.modifier, c.path) async for c in diff.changes(loader, first, second, stats)]
    assert changes == [("M", (b"x.txt",)), ("+", (b"y.txt",))]
    assert loaded == [first, second] and stats.changed_files == 1


@pytest_twisted.ensureDeferred
async def test_a_stale_original_on_a_server_down_during_the_tag_is_not_listed_again(
        cluster, wire_client, tmp_path):
    crafted = Crafted()
    original, _ = await crafted.commit(wire_client, [crafted.file(b"f", b"content")], "old")
    holders = (await wire_client.ask(Locate(chunk_ids=[original]))).holders[original]
    down = cluster.server(holders[0])
    index, port = cluster.servers.index(down), down.server.address.rsplit(":", 1)[1]
    await cluster.stop_server(down)
    session = await cluster.session()
    try:
        (change,), _ = await tagging.change_tags(session, [original[:8]], add=["new"])
    finally:
        await session.close()
    # The manager loses its catalog; the server that missed the deletion comes back with the
    # original: the rebuilt index lists the retagged snapshot only, and the original is deleted.
    await cluster.restart_manager(str(tmp_path / "new-manager"))
    await cluster.add_server(index, f"tcp:{port}")
    await cluster.until_ready()
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        async def listed():
            return [s.snapshot_id for s in (await fresh.ask(ListSnapshots())).snapshots]

        await cluster.until(lambda: cluster.manager.manager.indexer.pending == 0
                            and not cluster.server(down.server.address).store.has(original),
                            what="the stale original deleted")
        assert await listed() == [change.new_id]
        (summary,) = (await fresh.ask(ListSnapshots())).snapshots
        assert summary.tags == ["new", "old"]
    finally:
        await fresh.close()


@pytest_twisted.ensureDeferred
async def test_the_manager_refuses_a_replacement_with_other_content(wire_client):
    crafted = Crafted()
    victim, _ = await crafted.commit(wire_client, [crafted.file(b"f", b"precious")], "victim")
    other, other_root = await crafted.commit(wire_client, [crafted.file(b"f", b"empty")], "other")
    # A snapshot that names the victim as its original but holds other files.
    forged = objects.encode_snapshot(objects.Snapshot(
        time_ns=1, host="crafted", paths=(b"c",), tree=other_root, original=bytes.fromhex(victim),
        generation=1))
    forged_id = objects.object_id(Kind.SNAPSHOT, forged)
    await wire_client.store(Kind.SNAPSHOT, [(forged_id, forged)])
    with pytest.raises(RemoteError) as refused:
        await wire_client.ask(ReplaceSnapshot(snapshot_id=forged_id, replaces=victim))
    assert refused.value.code == "bad-request" and "cannot replace" in str(refused.value)
    # The indexer read it too (from the servers' notices): it is listed beside the victim,
    # which stays listed.
    listed = {s.snapshot_id for s in (await wire_client.ask(ListSnapshots())).snapshots}
    assert victim in listed and other in listed


@pytest_twisted.ensureDeferred
async def test_a_rebuilt_index_keeps_the_latest_version_of_a_retagged_snapshot(
        cluster, wire_client, tmp_path):
    crafted = Crafted()
    original, _ = await crafted.commit(wire_client, [crafted.file(b"f", b"content")], "v0")
    session = await cluster.session()
    try:
        (first,), _ = await tagging.change_tags(session, [original[:8]], set_to=["v1"])
        holders = (await wire_client.ask(Locate(chunk_ids=[first.new_id]))).holders[first.new_id]
        down = cluster.server(holders[0])
        index, port = cluster.servers.index(down), down.server.address.rsplit(":", 1)[1]
        await cluster.stop_server(down)
        (second,), _ = await tagging.change_tags(session, [first.new_id[:8]], set_to=["v2"])
    finally:
        await session.close()
    # The server that missed the second change still holds the first version; the manager
    # loses its catalog: the rebuilt index lists the second version only.
    await cluster.restart_manager(str(tmp_path / "new-manager"))
    await cluster.add_server(index, f"tcp:{port}")
    await cluster.until_ready()
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        await cluster.until(lambda: cluster.manager.manager.indexer.pending == 0
                            and not cluster.server(down.server.address).store.has(first.new_id),
                            what="the stale version deleted")
        (summary,) = (await fresh.ask(ListSnapshots())).snapshots
        assert (summary.snapshot_id, summary.tags) == (second.new_id, ["v2"])
    finally:
        await fresh.close()
