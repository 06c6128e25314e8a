"""Restores from a cluster in this process: snapshots crafted with ``sdbackup.objects`` and
stored through the protocol (as a client, or an attacker, would store them), then restored
with the real ``Restore`` into ``tmp_path`` and compared entry by entry.
"""

import grp
import os
import pwd
import stat

import attrs
import blake3
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from sdbackup import hashing, objects
from sdbackup.client.listing import entry_line
from sdbackup.client.repository import ChunkUnavailable, Repository
from sdbackup.client.restore import Restore
from sdbackup.client.session import ClientError
from sdbackup.client.treereader import Enter, Entry, TreeReader
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import CommitSnapshot, FetchChunks
from sdbackup.protocols.peer import MessageProtocol

ROOT = os.geteuid() == 0
MTIME = 1_600_000_000_123_456_789
ATIME = 1_500_000_000_987_654_321
MiB = 1024 * 1024


class Builder:
    """The objects of a crafted snapshot, built bottom up as a client builds them."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.lists: dict[str, bytes] = {}
        self.trees: dict[str, bytes] = {}

    def file(self, name: bytes, data: bytes, chunk: int = 64 * 1024, in_lists: bool = False,
             **fields) -> Node:
        ids = []
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            chunk_id = hashing.chunk_id(piece)
            self.data[chunk_id] = piece
            ids.append(bytes.fromhex(chunk_id))
        content, lists = tuple(ids), ()
        if in_lists:
            half = len(ids) // 2
            lists = tuple(self._list(part) for part in (ids[:half], ids[half:]))
            content = ()
        _defaults(fields, 0o644)
        return Node(name=name, type="file", size=len(data), hash=blake3.blake3(data).digest(),
                    content=content, content_lists=lists, **fields)

    def folder(self, name: bytes, nodes, **fields) -> Node:
        _defaults(fields, 0o755)
        return Node(name=name, type="dir", subtree=self.tree(nodes), **fields)

    def tree(self, nodes) -> bytes:
        encoded = objects.encode_tree(objects.Tree(tuple(sorted(nodes, key=lambda n: n.name))))
        tree_id = objects.object_id(Kind.TREE, encoded)
        self.trees[tree_id] = encoded
        return bytes.fromhex(tree_id)

    def _list(self, ids) -> bytes:
        encoded = objects.encode_chunk_list(ids)
        list_id = objects.object_id(Kind.LIST, encoded)
        self.lists[list_id] = encoded
        return bytes.fromhex(list_id)

    async def commit(self, wire_client, nodes, seed: str = "") -> str:
        """Store everything and commit a snapshot of ``nodes``; its id."""
        snapshot = objects.encode_snapshot(objects.Snapshot(
            time_ns=MTIME, host="crafted", paths=(b"crafted",), tree=self.tree(nodes), tags=(seed,),
            summary={"files": 1, "dirs": 1, "bytes": 1}))
        snapshot_id = objects.object_id(Kind.SNAPSHOT, snapshot)
        for kind, pieces in ((Kind.DATA, self.data), (Kind.LIST, self.lists), (Kind.TREE, self.trees)):
            if pieces:
                await wire_client.store(kind, list(pieces.items()))
        await wire_client.store(Kind.SNAPSHOT, [(snapshot_id, snapshot)])
        await wire_client.ask(CommitSnapshot(snapshot_id=snapshot_id))
        return snapshot_id


def _defaults(fields: dict, mode: int):
    fields.setdefault("mode", mode)
    fields.setdefault("mtime_ns", MTIME)
    fields.setdefault("atime_ns", ATIME)


def special(name: bytes, type: str, **fields) -> Node:
    _defaults(fields, 0o644)
    return Node(name=name, type=type, **fields)


@pytest_twisted.async_yield_fixture
async def session(cluster):
    connected = await cluster.session()
    try:
        yield connected
    finally:
        await connected.close()


async def restore(session, snapshot: str, target, includes=()):
    return await Restore(session, snapshot, str(target), includes).run()


# --- a faithful copy -------------------------------------------------------------------------


DEEP = [bytes([ord("a") + i % 26]) * 200 for i in range(25)]  # 5,000 bytes of path


def fidelity_tree(b: Builder):
    """Every kind of entry, odd names, hard links across folders, a chunked, a listed and a
    sparse file, owners, modes and times; returns the root's nodes and what to expect."""
    hard = os.urandom(5000)
    link_fields = dict(links=3, dev=7, inode=99, mode=0o640)
    sparse = bytearray(16 * MiB)
    sparse[9 * MiB + 5 : 9 * MiB + 5 + 4096] = os.urandom(4096)
    deep_leaf = b.file(b"leaf", b"at the bottom")
    deep = deep_leaf
    for name in reversed(DEEP):
        deep = b.folder(name, [deep], mode=0o750)
    docs = b.folder(b"docs", [
        b.file(b"chunked", os.urandom(300_000), user="daemon", group="daemon", uid=4242, gid=4343),
        b.file(b"listed", os.urandom(200_000), chunk=10_000, in_lists=True, mode=0o600),
        b.file(b"run", b"#!/bin/sh\n", mode=0o6755, uid=4242, gid=4343),
        b.file(b"empty", b""),
        b.file(b"\xff\nodd\\name", b"odd"),
        b.file(b"n" * 255, b"a 255-byte name"),
        b.file(b"hard1", hard, **link_fields),
        special(b"link", "symlink", target=b"chunked", uid=4242, gid=4343),
        special(b"pipe", "fifo", mode=0o620),
    ], mode=0o2750, xattrs=((b"user.comment", b"a folder \xff"),))
    other = b.folder(b"other", [
        b.file(b"hard2", hard, **link_fields),
        b.folder(b"sub", [b.file(b"hard3", hard, **link_fields)]),
    ])
    nodes = [docs, other, b.folder(b"sticky", [], mode=0o1777),
             b.file(b"sparse", bytes(sparse), chunk=MiB, mode=0o600), deep]
    if ROOT:
        nodes.append(b.folder(b"dev", [
            special(b"null", "chardev", mode=0o666, rdev=os.makedev(1, 3)),
            special(b"loop", "blockdev", mode=0o660, rdev=os.makedev(7, 200)),
        ]))
    return nodes


async def walk_snapshot(session, snapshot_id):
    """``(path, node)`` of every entry of a snapshot, read back through the cluster."""
    repository = Repository(session)
    snapshot = await repository.load_snapshot(snapshot_id)
    found = []
    async for event in TreeReader(repository).walk(snapshot.tree):
        if isinstance(event, (Enter, Entry)) and event.node is not None:
            assert not getattr(event, "error", "")
            found.append((event.path, event.node))
    return found


def assert_restored(target, path: tuple, node: Node, contents: bool):
    """The entry at ``path`` is ``node``: its metadata, or (``contents``) its bytes, checked apart
    since reading a file moves its atime, seen by its hard links too. Reached one name at a
    time: paths can be longer than PATH_MAX."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in path[:-1]:
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        if contents:
            _assert_contents(fd, path[-1], node)
        else:
            _assert_metadata(fd, path[-1], node)
    finally:
        os.close(fd)


def _assert_metadata(fd: int, name: bytes, node: Node):
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    kinds = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "symlink": stat.S_ISLNK, "fifo": stat.S_ISFIFO,
             "chardev": stat.S_ISCHR, "blockdev": stat.S_ISBLK}
    assert kinds[node.type](st.st_mode), name
    if node.type != "symlink":
        assert stat.S_IMODE(st.st_mode) == node.mode, (name, oct(st.st_mode))
    assert st.st_mtime_ns == node.mtime_ns, name
    if node.type != "dir":  # a folder's atime moves when the test lists it
        assert st.st_atime_ns == node.atime_ns, name
    if ROOT:
        uid = pwd.getpwnam(node.user).pw_uid if node.user else node.uid
        gid = grp.getgrnam(node.group).gr_gid if node.group else node.gid
        assert (st.st_uid, st.st_gid) == (uid, gid), name
    if node.type in ("chardev", "blockdev"):
        assert st.st_rdev == node.rdev
    if node.type == "symlink":
        assert os.readlink(name, dir_fd=fd) == node.target
    for key, value in node.xattrs:
        assert os.getxattr(f"/proc/self/fd/{fd}/".encode() + name, key, follow_symlinks=False) == value


def _assert_contents(fd: int, name: bytes, node: Node):
    if node.type == "file":
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as f:
            assert blake3.blake3(f.read()).digest() == node.hash and st.st_size == node.size


@pytest_twisted.ensureDeferred
async def test_a_snapshot_comes_back_entry_by_entry(cluster, wire_client, session, tmp_path):
    builder = Builder()
    snapshot_id = await builder.commit(wire_client, fidelity_tree(builder))
    target = tmp_path / "restored"

    result = await restore(session, snapshot_id[:8], target)

    assert result.errors == [] and result.notes == []
    assert result.snapshot_id == snapshot_id
    entries = await walk_snapshot(session, snapshot_id)
    for contents in (False, True):
        for path, node in entries:
            assert_restored(target, path, node, contents)
    # Nothing else is there: no temporary file, no stray entry.
    on_disk = sorted(os.path.relpath(os.path.join(d, n), bytes(target))
                     for d, dirs, files, _ in os.fwalk(bytes(target)) for n in dirs + files)
    assert on_disk == sorted(os.path.join(*path) for path, _ in entries)
    # Hard links are one inode; the sparse file is sparse.
    inodes = {os.lstat(target / p).st_ino for p in ("docs/hard1", "other/hard2", "other/sub/hard3")}
    assert len(inodes) == 1 and os.lstat(target / "docs/hard1").st_nlink == 3
    assert os.lstat(target / "sparse").st_blocks * 512 <= 256 * 1024
    assert result.files == sum(node.type == "file" for _, node in entries)
    assert result.folders == sum(node.type == "dir" for _, node in entries)


@pytest_twisted.ensureDeferred
async def test_ls_lines_in_tree_order(cluster, wire_client, session):
    builder = Builder()
    snapshot_id = await builder.commit(wire_client, [
        builder.folder(b"a", [builder.file(b"x", b"1"), special(b"l", "symlink", target=b"x")]),
        builder.folder(b"a b", []),
        builder.file(b"\xff", b"2"),
    ])
    lines = [entry_line(path, node) for path, node in await walk_snapshot(session, snapshot_id)]
    assert lines == ["a/", "a/l -> x", "a/x", "a b/", "\\xff"]


@pytest_twisted.ensureDeferred
async def test_include_restores_only_those_paths_and_the_folders_above_them(
        cluster, wire_client, session, tmp_path):
    builder = Builder()
    snapshot_id = await builder.commit(wire_client, fidelity_tree(builder))

    result = await restore(session, snapshot_id, tmp_path / "part",
                           ["docs/\\xff\\nodd\\\\name", "other/sub"])

    assert sorted(os.listdir(tmp_path / "part")) == ["docs", "other"]
    assert os.listdir(bytes(tmp_path / "part/docs")) == [b"\xff\nodd\\name"]
    assert sorted(os.listdir(tmp_path / "part/other")) == ["sub"]
    assert os.listdir(tmp_path / "part/other/sub") == ["hard3"]
    assert stat.S_IMODE(os.lstat(tmp_path / "part/docs").st_mode) == 0o2750
    assert result.errors == []
    # An include that matches nothing: an error before anything is written, no target made.
    with pytest.raises(ClientError, match=f"--include 'nowhere': matches nothing in snapshot "
                                          f"{snapshot_id[:8]}"):
        await restore(session, snapshot_id, tmp_path / "none", ["other/sub", "nowhere"])
    assert not (tmp_path / "none").exists()


# --- snapshots that try to escape ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_link_restored_earlier_is_never_followed(cluster, wire_client, session, tmp_path):
    """Snapshot one holds ``esc -> outside``; snapshot two holds a folder ``esc`` with a file.
    Both restored into one target: nothing is written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    first = Builder()
    first_id = await first.commit(wire_client, [
        special(b"esc", "symlink", target=str(outside).encode()),
        special(b"up", "symlink", target=b"../outside"),
    ], seed="links")
    second = Builder()
    second_id = await second.commit(wire_client, [
        second.folder(b"esc", [second.file(b"x", b"planted")]),
        second.folder(b"up", [second.folder(b"deeper", [second.file(b"y", b"planted")])]),
        second.file(b"fine", b"restored"),
    ], seed="attack")
    target = tmp_path / "target"

    assert (await restore(session, first_id, target)).errors == []
    result = await restore(session, second_id, target)

    assert os.listdir(outside) == []
    assert sorted(result.errors) == [
        "esc: exists and is not a folder (a link or a file); nothing is restored through it",
        "up: exists and is not a folder (a link or a file); nothing is restored through it"]
    assert (target / "fine").read_bytes() == b"restored"
    assert os.readlink(target / "esc") == str(outside)


@pytest_twisted.ensureDeferred
async def test_a_tree_with_hostile_names_restores_nothing_of_it(cluster, wire_client, session, tmp_path):
    builder = Builder()
    with attrs.validators.disabled():
        hostile = [Node(name=b"..", type="dir", subtree=builder.tree([builder.file(b"x", b"!")])),
                   Node(name=b"a/../../b", type="file", size=1, content=(bytes.fromhex(
                       hashing.chunk_id(b"!")),), hash=blake3.blake3(b"!").digest())]
    snapshot_id = await builder.commit(wire_client, [
        Node(name=b"evil", type="dir", mode=0o755, subtree=builder.tree(hostile)),
        builder.file(b"fine", b"restored"),
    ])
    before = sorted(os.listdir(tmp_path))

    result = await restore(session, snapshot_id, tmp_path / "target")

    assert sorted(os.listdir(tmp_path)) == sorted([*before, "target"])
    assert sorted(os.listdir(tmp_path / "target")) == ["evil", "fine"]
    assert os.listdir(tmp_path / "target/evil") == []
    assert len(result.errors) == 1 and result.errors[0].startswith("evil: its entries cannot be read")


@pytest_twisted.ensureDeferred
async def test_a_missing_chunk_fails_its_file_only(cluster, wire_client, session, tmp_path):
    builder = Builder()
    lost = builder.file(b"lost", os.urandom(1000))
    snapshot_id = await builder.commit(wire_client, [lost, builder.file(b"kept", b"kept")])
    lost_id = lost.content[0].hex()
    for server in cluster.servers:
        if server.store.has(lost_id):
            os.unlink(server.store.path_for(lost_id))

    result = await restore(session, snapshot_id, tmp_path / "target")

    assert os.listdir(tmp_path / "target") == ["kept"]
    assert len(result.errors) == 1 and result.errors[0].startswith("lost: ")


@pytest.mark.skipif(not ROOT, reason="only root restores owners")
@pytest_twisted.ensureDeferred
async def test_owner_names_win_over_numbers(cluster, wire_client, session, tmp_path):
    builder = Builder()
    snapshot_id = await builder.commit(wire_client, [
        builder.file(b"named", b"x", user="daemon", uid=4242, group="daemon", gid=4343),
        builder.file(b"numbered", b"y", user="no-such-user-here", uid=4242, group="nope", gid=4343),
    ])
    await restore(session, snapshot_id, tmp_path / "target")
    daemon = pwd.getpwnam("daemon")
    named, numbered = os.lstat(tmp_path / "target/named"), os.lstat(tmp_path / "target/numbered")
    assert (named.st_uid, named.st_gid) == (daemon.pw_uid, daemon.pw_gid)
    assert (numbered.st_uid, numbered.st_gid) == (4242, 4343)


@pytest_twisted.ensureDeferred
async def test_when_the_first_of_a_hard_link_group_fails_the_next_is_restored_whole(
        cluster, wire_client, session, tmp_path):
    builder = Builder()
    data = os.urandom(2000)
    fields = dict(links=3, dev=1, inode=5)
    snapshot_id = await builder.commit(wire_client, [
        builder.folder(b"a", [builder.file(b"h1", data, **fields)]),
        builder.folder(b"b", [builder.file(b"h2", data, **fields), builder.file(b"h3", data, **fields)]),
    ])
    target = tmp_path / "target"
    (target / "a/h1").mkdir(parents=True)  # a folder in the way of the first
    (target / "a/h1/kept").write_bytes(b"kept")

    result = await restore(session, snapshot_id, target)

    assert [e.split(":")[0] for e in result.errors] == ["a/h1"]
    assert (target / "a/h1/kept").read_bytes() == b"kept"
    assert (target / "b/h2").read_bytes() == data
    assert os.lstat(target / "b/h2").st_ino == os.lstat(target / "b/h3").st_ino


# --- batched fetches ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_batch_takes_each_chunk_from_a_holder_with_a_good_copy(cluster, wire_client, session):
    pieces = {hashing.chunk_id(data): data for data in (os.urandom(3000 + i) for i in range(8))}
    await wire_client.store(Kind.DATA, list(pieces.items()))
    repository = Repository(session)


    async def all_located():
        found = await repository.locate(list(pieces))
        # (each copy is reported apart: a chunk located once may be on one holder so far)
        return found if len(found) == len(pieces) and all(
            len(servers) == 2 for servers in found.values()) else None

    holders = await cluster.until(all_located, what="the manager hearing of every copy")
    damaged = cluster.server(holders[next(iter(pieces))][0])
    on_damaged = [c for c in pieces if damaged.server.address in holders[c]]
    gone, bad = on_damaged[: len(on_damaged) // 2], on_damaged[len(on_damaged) // 2 :]
    for chunk_id in gone:
        os.unlink(damaged.store.path_for(chunk_id))
    for chunk_id in bad:
        path = damaged.store.path_for(chunk_id)
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    only_there = gone[0]  # asked of the damaged server alone: nobody can give it

    found = await repository.fetch_many(Kind.DATA, {
        chunk_id: [damaged.server.address] if chunk_id == only_there else holders[chunk_id]
        for chunk_id in pieces})

    assert {c: d for c, d in found.items() if c != only_there} == {
        c: d for c, d in pieces.items() if c != only_there}
    assert isinstance(found[only_there], ChunkUnavailable)
    assert "does not hold it" in str(found[only_there])


@pytest_twisted.ensureDeferred
async def test_a_reader_that_does_not_read_stops_being_served(cluster):
    """50 fetches of 4 MiB each are sent at once and their answers are not read: the server
    stops reading the requests instead of holding 200 MiB of answers; once the reader reads,
    every answer comes, whole."""
    server = cluster.servers[0]
    big = [os.urandom(2 * MiB) for _ in range(2)]
    ids = [hashing.chunk_id(data) for data in big]
    for chunk_id, data in zip(ids, big, strict=True):
        server.store.put(Kind.DATA, chunk_id, hashing.checksum(data), data)
    port = server.server.address.rsplit(":", 1)[1]
    reader = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(port)),
                                   MessageProtocol(None, "client"))
    await reader.ready
    try:
        reader.pauseProducing()  # replies are not read
        asked = [reader.request(FetchChunks(chunk_ids=ids)) for _ in range(50)]
        served_before = server.server.bytes_served
        await cluster.until(lambda: server.server.bytes_served > served_before, what="some answers")
        settled = -1
        while settled != server.server.bytes_served:
            settled = server.server.bytes_served
            await task.deferLater(reactor, 0.5)

        assert settled - served_before <= 16 * 4 * MiB  # of the 200 MiB asked for

        reader.resumeProducing()
        replies = await defer.gatherResults(asked)
    finally:
        reader.transport.loseConnection()
    assert all([bytes(piece) for _, piece in reply.pieces()] == big for reply in replies)
    assert server.server.bytes_served - served_before == 50 * 4 * MiB
