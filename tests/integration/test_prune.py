"""``prune`` in an in-process cluster, with the real client: forgotten snapshots' data leaves the
servers' disks, what the kept ones need stays and restores, a dry run deletes nothing, copies
above the factor are trimmed, and only an admin may prune."""

import os
import random

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import connectProtocol

from sdbackup import objects
from sdbackup.client.backup import Backup
from sdbackup.client.prune import run_prune
from sdbackup.client.repository import Repository
from sdbackup.client.restore import Restore
from sdbackup.localcluster import make_certificates, tls_transport
from sdbackup.objects import Kind
from sdbackup.protocols.messages import (
    CheckRequest,
    CommitSnapshot,
    ForgetSnapshots,
    PruneRequest,
    PruneStatusRequest,
    StatusRequest,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.services.manager import ManagerService

from .backups import make_backup
from .test_manager_index import listed

KiB = 1024
#: The six versions of the backed-up folder: each has a file of its own (random, so nothing
#: is shared between versions) and a file common to all.
VERSIONS = 6
COMMON = random.Random("common").randbytes(200 * KiB)


def version_files(index: int) -> dict[str, bytes]:
    return {"common.bin": COMMON,
            "own.bin": random.Random(f"version {index}").randbytes(600 * KiB),
            "notes.txt": f"version {index}\n".encode() * 50}


def write_version(folder, index: int):
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    for name, data in version_files(index).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def disk_bytes(cluster) -> int:
    """Bytes of every chunk and object file on the running servers' disks."""
    total = 0
    for server in cluster.servers:
        if not server.running:
            continue
        for top in ("chunks", "snapshots"):
            for folder, _, files in os.walk(os.path.join(server.store.root, top)):
                total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


async def back_up_versions(cluster, folder, indexes) -> list[str]:
    ids = []
    for index in indexes:
        write_version(folder, index)
        ids.append(await back_up(cluster, folder))
    return ids


async def back_up(cluster, folder) -> str:
    """``folder`` backed up as it is; the snapshot's id."""
    session = await cluster.session()
    try:
        return (await Backup(session, [str(folder)]).run()).snapshot_id
    finally:
        await session.close()


async def prune(cluster, dry_run: bool = False):
    session = await cluster.session()
    try:
        return await run_prune(session, dry_run, show_progress=False)
    finally:
        await session.close()


async def restored_files(cluster, snapshot_id: str, target) -> dict[str, bytes]:
    session = await cluster.session()
    try:
        result = await Restore(session, snapshot_id, str(target)).run()
    finally:
        await session.close()
    assert result.errors == []
    found = {}
    for folder, _, files in os.walk(target):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[name] = f.read()
    return found


def no_grace(cluster, rate: float = 1e6):
    """The prune's test override: chunks stored a moment ago count as old (no backup runs)."""
    pruner = cluster.manager.manager.pruner
    pruner.grace, pruner.rate = 0.0, rate


@pytest_twisted.ensureDeferred
async def test_prune_frees_what_forgotten_snapshots_held_and_the_kept_ones_restore(
        make_cluster, tmp_path):
    cluster = await make_cluster()
    no_grace(cluster)
    folder = tmp_path / "src"
    ids = await back_up_versions(cluster, folder, range(VERSIONS))
    session = await cluster.session()
    try:
        forgotten = await session.ask(ForgetSnapshots(snapshot_ids=ids[:4]))
    finally:
        await session.close()
    assert len(forgotten.snapshot_ids) == 4
    before = disk_bytes(cluster)

    dry = await prune(cluster, dry_run=True)
    assert dry.state == "done" and dry.dry_run
    assert disk_bytes(cluster) == before  # nothing deleted
    assert dry.snapshots == 2 and dry.unreachable > 0 and dry.trimmed_copies == 0
    # Four own files of 600 KiB, twice each, would go.
    assert 4 * 600 * KiB * 2 <= dry.deleted_bytes < 4 * 600 * KiB * 2 * 1.1

    done = await prune(cluster)
    assert done.state == "done" and not done.dry_run and done.error == ""
    after = disk_bytes(cluster)
    assert (done.deleted_chunks, done.deleted_copies) == (dry.unreachable, dry.deleted_copies)
    assert before - after == done.deleted_bytes >= 4 * 600 * KiB * 2

    # The same two versions backed up into a fresh cluster: what the kept snapshots need.
    reference = await make_cluster()
    await back_up_versions(reference, tmp_path / "src", [4, 5])
    needed = disk_bytes(reference)
    assert abs(after - needed) <= 0.1 * needed, (after, needed)

    for index, snapshot_id in zip((4, 5), ids[4:], strict=True):
        assert await restored_files(cluster, snapshot_id, tmp_path / f"out{index}") == \
            version_files(index)
    session = await cluster.session()
    try:
        report = await session.ask(CheckRequest())
        status = await session.ask(StatusRequest())
    finally:
        await session.close()
    assert (report.snapshots, report.missing, report.damaged) == (2, 0, [])
    assert (status.under_replicated, status.missing) == (0, 0)
    # A second prune finds nothing more.
    again = await prune(cluster)
    assert (again.unreachable, again.deleted_copies, again.trimmed_copies) == (0, 0, 0)


@pytest_twisted.ensureDeferred
async def test_prune_spares_unreachable_chunks_within_the_grace(cluster, wire_client, tmp_path):
    """With the default grace, data of a snapshot forgotten a moment ago is kept: a backup
    under way may have it as its parent."""
    ids = await back_up_versions(cluster, tmp_path / "src", range(2))
    await wire_client.ask(ForgetSnapshots(snapshot_ids=ids[:1]))
    before = disk_bytes(cluster)
    done = await prune(cluster)
    assert done.state == "done" and done.grace == 24 * 3600
    assert (done.unreachable, done.deleted_copies) == (0, 0)
    assert done.recent == 0  # its trees are walked as roots still: nothing is even unreachable
    assert disk_bytes(cluster) == before


@pytest_twisted.ensureDeferred
async def test_copies_above_the_factor_are_trimmed_after_a_server_returns(make_cluster, tmp_path):
    cluster = await make_cluster(servers=3, dead_after=1.0)
    no_grace(cluster)
    [snapshot_id] = await back_up_versions(cluster, tmp_path / "src", [0])
    victim = cluster.servers[0]
    port = victim.port.getHost().port
    await cluster.stop_server(victim)
    # The repair brings every chunk the victim held back to two copies on the others.
    await cluster.until(async_true(lambda h: h[1] == 0 and h[2] == 0, cluster.chunk_health),
                        what="the repair")
    returned = await cluster.add_server(0, f"tcp:{port}")
    manager = cluster.manager.manager
    await cluster.until(lambda: returned.server.address in manager.live
                        and not manager.live[returned.server.address].reporting,
                        what="the returning server's inventory")
    extra = await manager.db(manager.catalog.over_replicated, set(manager.live), 2, "", 10_000)
    assert extra  # its copies are back: three of some chunks
    before = disk_bytes(cluster)

    dry = await prune(cluster, dry_run=True)
    assert dry.trimmed_copies == len(extra) and disk_bytes(cluster) == before
    done = await prune(cluster)
    assert done.state == "done"
    assert done.trimmed_copies == len(extra) and done.deleted_copies == 0
    assert before - disk_bytes(cluster) == done.trimmed_bytes > 0
    assert await manager.db(manager.catalog.over_replicated, set(manager.live), 2, "", 10) == []
    assert (await cluster.chunk_health())[1:] == (0, 0)  # never below the factor
    for chunk_id in await manager.db(lambda: [r[0] for r in manager.catalog.db.execute(
            "SELECT chunk_id FROM chunks")]):
        if chunk_id != snapshot_id:  # (a prune deletes no snapshot object: only forget does)
            assert sum(s.store.has(chunk_id) for s in cluster.servers) == 2
    assert await restored_files(cluster, snapshot_id, tmp_path / "out") == version_files(0)


def async_true(predicate, produce):
    async def check():
        return predicate(await produce())
    return check


@pytest_twisted.ensureDeferred
async def test_a_second_prune_while_one_runs_is_refused(make_cluster, tmp_path):
    cluster = await make_cluster()
    no_grace(cluster, rate=20.0)  # slow: the first prune is still deleting
    ids = await back_up_versions(cluster, tmp_path / "src", range(3))
    session = await cluster.session()
    try:
        await session.ask(ForgetSnapshots(snapshot_ids=ids[:2]))
        first = await session.ask(PruneRequest())
        with pytest.raises(RemoteError) as caught:
            await session.ask(PruneRequest())
        assert caught.value.code == "busy"
        while (status := await session.ask(PruneStatusRequest())).state != "done":
            assert status.prune_id == first.prune_id
            await task.deferLater(reactor, 0.1)
    finally:
        await session.close()
    assert status.deleted_copies > 0


@pytest_twisted.ensureDeferred
async def test_only_an_admin_may_prune(tmp_path):
    """Under TLS a client's certificate may not prune; an admin's passes the check (and hears
    that the manager, with no server yet, is starting)."""
    make_certificates(str(tmp_path))
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=tls_transport(str(tmp_path), "manager"))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        codes = {}
        for name in ("client", "admin"):
            proto = MessageProtocol(None, "client", tls=True, expect=("manager",), clock=reactor)
            endpoint = tls_transport(str(tmp_path), name).client_endpoint(
                reactor, f"tcp:127.0.0.1:{port}", 5)
            await connectProtocol(endpoint, proto)
            await proto.ready
            for request in (PruneRequest(), PruneStatusRequest()):
                with pytest.raises(RemoteError) as caught:
                    await proto.request(request, 5, reactor)
                codes[name, type(request).__name__] = caught.value.code
            proto.transport.loseConnection()
            await task.deferLater(reactor, 0.1)
        assert codes == {("client", "PruneRequest"): "forbidden",
                         ("client", "PruneStatusRequest"): "forbidden",
                         ("admin", "PruneRequest"): "starting",
                         ("admin", "PruneStatusRequest"): "starting"}
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_commit_referencing_pruned_chunks_is_refused(cluster, wire_client):
    """The last guard: a backup that ran longer than the grace (here none) and counts on
    chunks a prune deleted meanwhile is refused at commit, and not listed."""
    no_grace(cluster)
    backup = make_backup("slow")
    await wire_client.store(Kind.DATA, backup.data)
    await wire_client.store(Kind.LIST, backup.lists)
    await wire_client.store(Kind.TREE, backup.trees)
    stored = len(backup.data + backup.lists + backup.trees)
    # Every copy reported: a second copy's notice after the prune began would make its chunk
    # count as stored since the cutoff, and be spared.
    await cluster.until(async_true(lambda health: health == (stored, 0, 0), cluster.chunk_health),
                        what="the servers' notices of every copy")
    done = await prune(cluster)  # nothing references them yet, and they are "old"
    assert done.deleted_chunks == stored
    await wire_client.store(Kind.SNAPSHOT, [(backup.snapshot_id, backup.snapshot)])
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(CommitSnapshot(snapshot_id=backup.snapshot_id))
    assert caught.value.code == "snapshot-incomplete"
    assert "run the backup again" in caught.value.reason
    assert await listed(wire_client) == []
    # Its object is deleted on the servers, as a forgotten snapshot's is.
    await cluster.until(lambda: not any(s.store.has(backup.snapshot_id) for s in cluster.servers),
                        what="the refused snapshot's object deleted")
    # A backup run again (a new snapshot) stores what is missing and commits.
    again = make_backup("again", time_s=int(reactor.seconds()))
    await wire_client.backup(again)
    assert await listed(wire_client) == [again.snapshot_id]



async def folder_tree(cluster, snapshot_id: str, folder) -> tuple[bytes, object]:
    """The id of ``folder``'s tree in a snapshot, and that tree object decoded."""
    session = await cluster.session()
    try:
        repository = Repository(session)
        snapshot = await repository.load_snapshot(snapshot_id)
        node = await repository.find(snapshot.tree, str(folder).strip("/").encode())
        data = await repository.fetch_object(Kind.TREE, node.subtree.hex())
    finally:
        await session.close()
    return node.subtree, objects.decode_tree(data)


@pytest_twisted.ensureDeferred
async def test_a_prune_keeps_the_pages_a_kept_snapshot_shares_and_deletes_the_others(
        cluster, wire_client, tmp_path, monkeypatch):
    """A folder stored as pages (of 4 KiB here), backed up again with one file changed: the
    snapshots share every page but one. Forgetting the first and pruning deletes its own
    page and head, and nothing the second needs."""
    monkeypatch.setattr(objects, "TREE_PAGE_SIZE", 4096)
    no_grace(cluster)
    folder = tmp_path / "src"
    expected = {f"file {i:03d}": f"entry {i}".encode() for i in range(300)}
    os.makedirs(folder)
    for name, data in expected.items():
        (folder / name).write_bytes(data)
    first = await back_up(cluster, folder)
    expected["file 123"] = b"changed"
    (folder / "file 123").write_bytes(b"changed")
    second = await back_up(cluster, folder)
    (old_id, old), (new_id, new) = [await folder_tree(cluster, s, folder) for s in (first, second)]
    assert isinstance(new, objects.TreeHead) and len(new.pages) > 10
    [own_page] = set(old.pages) - set(new.pages)

    await wire_client.ask(ForgetSnapshots(snapshot_ids=[first]))
    done = await prune(cluster)
    assert done.state == "done" and done.error == ""
    held = {bytes.fromhex(c) for server in cluster.servers for c in server.store.chunk_ids()}
    assert own_page not in held and old_id not in held
    assert {new_id, *new.pages} <= held
    assert await restored_files(cluster, second, tmp_path / "out") == expected
