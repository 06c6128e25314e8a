"""Attacks of the security issue against a cluster of ``twistd`` processes, as a client can
make them: a store that sends bytes to a port of its choosing (8), and a forged parent
snapshot that would pass the attacker's content off as the victim's (6).
"""

import json
import os
import socket
import time

import attrs
import pytest
import pytest_twisted
from conftest import run_sdbackup
from test_metadata import Attacker, file_node
from twisted.internet import reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol

from sdbackup import hashing, objects, sealing
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError, Session
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import ChunkNeed, CommitKey, PlacementRequest, StoreChunk
from sdbackup.protocols.peer import RemoteError

pytestmark = pytest.mark.timeout(120)


class Trap(Factory):
    """The attacker's port: counts who connects to it."""

    def __init__(self):
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return Protocol()


@pytest_twisted.ensureDeferred
async def test_a_server_sends_nothing_to_a_port_a_client_names(start_cluster):
    # Attack 8 (SSRF): StoreChunk with forward_to set to any endpoint made the server connect
    # there and send the bytes. A client holding a real placement cannot add a hop to it.
    cluster = start_cluster(repository=None)  # (no key object on the servers)
    trap = Trap()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(trap)
    evil = f"tcp:127.0.0.1:{port.getHost().port}"
    session = await Session(reactor, cluster.manager_endpoint).connect()
    try:
        data = b"to the attacker's port\n"
        chunk_id = hashing.chunk_id(data)
        placement = await session.ask(PlacementRequest(chunks=[ChunkNeed(chunk_id, len(data))]))
        ticket, = placement.tickets
        for forward_to in ([evil], [ticket.chain[1], evil]):
            with pytest.raises(RemoteError) as refused:
                await session.servers.request(ticket.chain[0], StoreChunk(
                    chunk_id=chunk_id, checksum=hashing.checksum(data), forward_to=forward_to,
                    ticket=ticket, payload=data))
            assert refused.value.code == "bad-ticket"
            assert "forward_to is not the rest of the ticket's chain" in refused.value.reason
        await task.deferLater(reactor, 0.5, lambda: None)
        assert trap.connections == 0
        assert all(server.chunk_files() == set() for server in cluster.servers)
    finally:
        await session.close()
        await port.stopListening()


async def forge_parent(manager: str, victim_id: str, content: bytes) -> str:
    """Commit a snapshot of the victim's host and paths, newer than the victim's, whose files
    keep all the victim's metadata (sizes, times, inode, whole-file hash) but hold ``content``."""
    session = await Session(reactor, manager).connect()
    try:
        repository, attacker = Repository(session), Attacker(session)
        victim = await repository.load_snapshot(victim_id)
        content_id, = await attacker.store(Kind.DATA, [content])

        async def forged(tree_id: bytes) -> bytes:
            nodes = []
            for node in (await repository.load_tree(tree_id)).nodes:
                if node.type == "dir":
                    node = attrs.evolve(node, subtree=await forged(node.subtree))
                elif node.type == "file":
                    node = attrs.evolve(node, content=(content_id,), content_lists=())
                nodes.append(node)
            tree_id, = await attacker.store(Kind.TREE, [objects.encode_tree(objects.make_tree(nodes))])
            return tree_id

        snapshot = attrs.evolve(victim, time_ns=time.time_ns(), tree=await forged(victim.tree),
                                parent=b"")
        return await attacker.commit(objects.encode_snapshot(snapshot))
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_a_forged_parent_in_an_encrypted_repository_is_not_the_victims(start_cluster, tmp_path):
    # Attack 6 against the default, encrypted repository. The attacker, a client of the cluster
    # without the password, cannot read the victim's snapshot to copy it; so it forges one
    # blind but consistent: the victim's host and path, a file with every stat field of the
    # victim's file (size, times, inode) and other bytes, under their own whole-file hash,
    # newer than the victim's. The victim never takes it as a parent, never lists it, and
    # restores its own bytes.
    cluster = start_cluster()
    src = tmp_path / "src"
    src.mkdir()
    words = b"the victim's own words\n" * 500
    (src / "doc.txt").write_bytes(words)
    first = cluster.snapshot_id(cluster.sdbackup("backup", "src", cwd=tmp_path).stdout)
    listed = cluster.sdbackup("snapshots", "--json", cwd=tmp_path).stdout
    victim_id = next(s["id"] for s in json.loads(listed) if s["id"].startswith(first))

    session = await Session(reactor, cluster.manager_endpoint).connect()  # no password
    try:
        public = await Repository(session).load_snapshot(victim_id)
        assert public.paths == () and public.tags == ()  # all it shows: no paths, no tags...
        with pytest.raises(ClientError, match="needs a password"):  # ...and no tree to copy
            await Repository(session).load_tree(public.tree)
        attacker, other = Attacker(session), b"X" * len(words)
        st = os.lstat(src / "doc.txt")
        content_id, = await attacker.store(Kind.DATA, [other])
        doc = file_node(b"doc.txt", other, content_id, mtime_ns=st.st_mtime_ns,
                        ctime_ns=st.st_ctime_ns, inode=st.st_ino, dev=st.st_dev)
        folder, = await attacker.store(Kind.TREE, [objects.encode_tree(objects.make_tree([doc]))])
        root, = await attacker.store(Kind.TREE, [objects.encode_tree(objects.make_tree([
            Node(name=b"src", type="dir", mode=0o40755, subtree=folder)]))])
        forged = await attacker.commit(objects.encode_snapshot(objects.Snapshot(
            time_ns=time.time_ns(), host=socket.gethostname(), paths=(b"src",), tree=root)))
    finally:
        await session.close()

    second = cluster.sdbackup("backup", "src", cwd=tmp_path)
    assert f"parent {first}" in second.stdout, second.describe()
    assert forged[:8] not in cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    target = tmp_path / "restored"
    cluster.sdbackup("restore", "latest", "--target", target, cwd=tmp_path)
    assert (target / "src" / "doc.txt").read_bytes() == words


@pytest_twisted.ensureDeferred
async def test_a_forged_parent_cannot_pass_other_bytes_off_as_the_victims(start_cluster, tmp_path):
    # Attack 6 against a plaintext repository (``init --encryption none``), which trusts every
    # client of the cluster: a snapshot of the same host and paths, with the victim's metadata
    # copied, is taken as the parent of the victim's next backup: its files count as unchanged
    # and keep the attacker's chunks. The whole-file hash the victim's own snapshot recorded
    # goes with the metadata, and the restore checks every file against it.
    cluster = start_cluster(repository="none")
    src = tmp_path / "src"
    src.mkdir()
    words = b"the victim's own words\n" * 500
    (src / "doc.txt").write_bytes(words)
    first = cluster.backup("src", cwd=tmp_path)
    victim_id = next(s for s in await snapshot_ids(cluster) if s.startswith(first))
    forged = await forge_parent(cluster.manager_endpoint, victim_id, b"X" * len(words))

    second = cluster.sdbackup("backup", "src", cwd=tmp_path)
    assert f"parent {forged[:8]}" in second.stdout  # the attack took: the forgery is the parent
    target = tmp_path / "restored"
    restored = cluster.sdbackup("restore", cluster.snapshot_id(second.stdout), "--target", target,
                                cwd=tmp_path, check=False)

    assert restored.returncode == 3, restored.describe()
    assert "src/doc.txt: restored bytes do not match the file's hash; not written" in restored.stderr
    assert not (target / "src" / "doc.txt").exists()
    assert "0 files" in restored.stdout and "1 entries failed" in restored.stdout


@pytest_twisted.ensureDeferred
async def test_a_plaintext_mark_slipped_into_an_encrypted_repository_downgrades_nothing(
        start_cluster, tmp_path):
    # A client of the cluster without the password commits a plaintext mark into the default,
    # encrypted repository, hoping the victim's next backup goes out unencrypted. The victim's
    # client refuses the repository, says why, and sends nothing; its old snapshot still
    # restores once the mark is removed.
    cluster = start_cluster()
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc.txt").write_bytes(b"secret words\n" * 100)
    first = cluster.backup("src", cwd=tmp_path)

    session = await Session(reactor, cluster.manager_endpoint).connect()
    try:
        mark_id, = await Attacker(session).store(Kind.KEY, [sealing.encode_key(
            sealing.plaintext_mark("default"))])
        await session.ask(CommitKey(key_id=mark_id.hex()))
    finally:
        await session.close()

    (src / "new.txt").write_bytes(b"written after the mark\n")
    stored_before = cluster.data_bytes()
    refused = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)
    assert refused.returncode == 1, refused.describe()
    assert "has both encryption keys and a plaintext mark" in refused.stderr, refused.describe()
    env = cluster.client_env()
    del env["SDBACKUP_PASSWORD"]
    plain = run_sdbackup("backup", "src", cwd=tmp_path, env=env, check=False)
    assert plain.returncode == 1 and "plaintext mark" in plain.stderr, plain.describe()
    assert cluster.data_bytes() == stored_before  # nothing was sent

    # The owner's password lists the mark for what it is and removes it; all is as before.
    listed = cluster.sdbackup("key", "list", cwd=tmp_path).stdout
    assert f"{mark_id.hex()[:8]}" in listed and "plaintext mark" in listed, listed
    cluster.sdbackup("key", "remove", mark_id.hex()[:8], cwd=tmp_path)
    second = cluster.backup("src", cwd=tmp_path)
    target = tmp_path / "restored"
    cluster.sdbackup("restore", second, "--target", target, cwd=tmp_path)
    assert (target / "src" / "doc.txt").read_bytes() == b"secret words\n" * 100
    assert (target / "src" / "new.txt").exists() and first != second


async def snapshot_ids(cluster) -> list[str]:
    session = await Session(reactor, cluster.manager_endpoint).connect()
    try:
        return [s.snapshot_id for s in await Repository(session).snapshots()]
    finally:
        await session.close()
