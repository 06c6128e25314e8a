"""The manager's index, driven with protocol messages as a client would send them.

Objects are built with ``sdbackup.objects``, placed (PlacementRequest), stored on
their servers (StoreChunks, one kind per pack) and committed (CommitSnapshot);
then the manager's catalog is lost, or a server is, and the index comes back
from what the servers hold.
"""

import os
import shutil
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from sdbackup import hashing, objects
from sdbackup.names import unescape
from sdbackup.objects import Kind
from sdbackup.protocols.messages import (
    CheckRequest,
    CommitSnapshot,
    FetchChunk,
    HasChunks,
    ListSnapshots,
    Locate,
    PlacementRequest,
    StatusRequest,
)
from sdbackup.protocols.peer import RemoteError
from sdbackup.services import manager as manager_module
from sdbackup.services import server as server_module

from .backups import make_backup


async def listed(wire_client) -> list[str]:
    return [s.snapshot_id for s in (await wire_client.ask(ListSnapshots())).snapshots]


async def starting_reason(wire_client, msg) -> str:
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(msg)
    assert caught.value.code == "starting"
    return caught.value.reason


def holding(cluster, chunk_id: str) -> list:
    return [s for s in cluster.servers if s.running and s.store.has(chunk_id)]


# --- committing and listing ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_committed_snapshot_is_listed_and_located(cluster, wire_client):
    backup = make_backup("first", paths=(b"/home/me", b"/srv/odd\\dir\n\xff"))
    summary = await wire_client.backup(backup)
    assert summary.snapshot_id == backup.snapshot_id
    # Paths are bytes in the snapshot, escaped in the index (losslessly).
    assert summary.paths == ["/home/me", "/srv/odd\\\\dir\\n\\xff"]
    assert [unescape(p) for p in summary.paths] == [b"/home/me", b"/srv/odd\\dir\n\xff"]
    assert (summary.host, summary.tags) == ("laptop", ["first"])
    assert (summary.files, summary.dirs, summary.bytes) == (2, 3, 9000)
    assert summary.time == 1_700_000_000.5
    assert summary.tree == backup.tree_id and summary.parent == ""
    assert (await wire_client.ask(ListSnapshots())).snapshots == [summary]

    # Every chunk and object is on two servers, as its kind.
    everything = [*backup.data, *backup.lists, *backup.trees,
                  (backup.snapshot_id, backup.snapshot)]
    for chunk_id, _ in everything:
        assert len(holding(cluster, chunk_id)) == 2
    kinds = {server.store.get(i)[0] for i, _ in backup.trees for server in holding(cluster, i)}
    assert kinds == {"tree"}
    assert holding(cluster, backup.snapshot_id)[0].store.snapshot_ids() == [backup.snapshot_id]

    # Locate names the holders; an id nobody holds is left out.
    unknown = hashing.chunk_id(b"never stored")
    located = (await wire_client.ask(Locate(chunk_ids=[i for i, _ in everything] + [unknown]))).holders
    assert set(located) == {i for i, _ in everything}
    for chunk_id, _ in everything:
        assert sorted(located[chunk_id]) == sorted(s.server.address
                                                   for s in holding(cluster, chunk_id))
    # A fetch from a holder gives the bytes with their kind.
    reply = await wire_client.servers.request(located[backup.tree_id][0],
                                         FetchChunk(chunk_id=backup.tree_id))
    assert reply.kind == "tree" and reply.payload == dict(backup.trees)[backup.tree_id]

    status = await wire_client.ask(StatusRequest())
    assert (status.state, status.snapshots, status.chunks) == ("ready", 1, len(everything))
    assert (status.under_replicated, status.missing) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_snapshots_are_listed_oldest_first_and_unchanged_objects_are_known(cluster, wire_client):
    later = make_backup("later", time_s=1_700_000_100)
    earlier = make_backup("earlier", time_s=1_700_000_000)
    await wire_client.backup(later)
    await wire_client.backup(earlier)
    assert await listed(wire_client) == [earlier.snapshot_id, later.snapshot_id]
    # The same trees again: placement answers they are known, and nothing is stored twice.
    placement = await wire_client.store(Kind.TREE, later.trees)
    assert sorted(placement.known) == sorted(i for i, _ in later.trees)
    assert placement.assignments == {}
    # Committing the same snapshot again lists it once.
    await wire_client.ask(CommitSnapshot(snapshot_id=later.snapshot_id))
    assert await listed(wire_client) == [earlier.snapshot_id, later.snapshot_id]


@pytest_twisted.ensureDeferred
async def test_a_commit_knows_every_copy_stored_before_it(cluster, wire_client, monkeypatch):
    # The servers tell the manager of new chunks a moment later; a commit asks them first, so
    # once it is answered the manager knows every copy of the backup (from the servers).
    monkeypatch.setattr(server_module, "NOTIFY_DELAY", 30.0)
    backup = make_backup("just stored")
    await wire_client.backup(backup)
    ids = [i for i, _ in [*backup.data, *backup.lists, *backup.trees]] + [backup.snapshot_id]
    held = await wire_client.ask(HasChunks(chunk_ids=ids))
    assert held.chunk_ids == ids


@pytest_twisted.ensureDeferred
async def test_a_page_of_new_chunks_is_told_at_once(cluster, wire_client, monkeypatch):
    # A server gathers news of new chunks for a while (each notice is a catalog transaction),
    # but no longer than it takes a page of them to gather: then it tells the manager at once,
    # with what was waiting.
    monkeypatch.setattr(server_module, "NOTIFY_DELAY", 30.0)
    waiting = make_backup("waiting")
    await wire_client.store(Kind.DATA, waiting.data)
    await deferLater(reactor, 0.5, lambda: None)
    waiting_ids = [i for i, _ in waiting.data]
    assert (await wire_client.ask(HasChunks(chunk_ids=waiting_ids))).chunk_ids == []

    monkeypatch.setattr(server_module, "INVENTORY_PAGE", 1)
    told = make_backup("told")
    await wire_client.store(Kind.DATA, told.data)
    ids = waiting_ids + [i for i, _ in told.data]

    async def copies() -> dict[str, int]:
        located = (await wire_client.ask(Locate(chunk_ids=ids))).holders
        return {i: len(located.get(i, [])) for i in ids}

    async def all_told() -> bool:
        return await copies() == dict.fromkeys(ids, 2)

    await cluster.until(all_told, timeout=5, what="both copies of every new chunk told")
    assert await copies() == dict.fromkeys(ids, 2)


@pytest_twisted.ensureDeferred
async def test_noticed_copies_reach_the_catalog_file_within_the_commit_delay(
        cluster, wire_client, monkeypatch):
    # The manager gathers the copies the servers notice in one transaction for a moment,
    # then writes them (a crash before loses only what the servers' inventories bring back).
    monkeypatch.setattr(server_module, "NOTIFY_DELAY", 0.05)
    monkeypatch.setattr(manager_module, "NOTICE_COMMIT_DELAY", 0.5)
    backup = make_backup("noticed")
    await wire_client.store(Kind.DATA, backup.data)
    ids = [i for i, _ in backup.data]
    catalog = os.path.join(cluster.manager.data, "catalog.sqlite")

    def written() -> int:
        other = sqlite3.connect(catalog)
        try:
            return other.execute("SELECT COUNT(*) FROM locations WHERE chunk_id IN (?, ?, ?)",
                                 ids).fetchone()[0]
        finally:
            other.close()

    await cluster.until(lambda: written() == 2 * len(ids), timeout=10,
                        what="the noticed copies written to the catalog file")


@pytest_twisted.ensureDeferred
async def test_a_snapshot_no_server_holds_cannot_be_committed(cluster, wire_client):
    backup = make_backup("never stored")
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(CommitSnapshot(snapshot_id=backup.snapshot_id))
    assert caught.value.code == "unknown-snapshot"
    assert backup.snapshot_id[:16] in caught.value.reason
    assert await listed(wire_client) == []


@pytest_twisted.ensureDeferred
async def test_a_snapshot_object_that_does_not_decode_is_refused(cluster, wire_client):
    root = make_backup("root").tree_id
    # A well-formed envelope (servers accept it) with a body that is not a snapshot.
    garbage = objects.seal(Kind.SNAPSHOT, [bytes.fromhex(root)], [], b"\xc1 not msgpack")
    garbage_id = objects.object_id(Kind.SNAPSHOT, garbage)
    await wire_client.store(Kind.SNAPSHOT, [(garbage_id, garbage)])
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(CommitSnapshot(snapshot_id=garbage_id))
    assert caught.value.code == "bad-object"
    # A real snapshot under an id that is not its own: no server takes it, none can be committed.
    real = make_backup("misnamed").snapshot
    wrong_id = hashing.object_id(Kind.SNAPSHOT, b"something else")
    with pytest.raises(RemoteError) as caught:
        await wire_client.store(Kind.SNAPSHOT, [(wrong_id, real)])
    assert caught.value.code == "invalid-chunk-id"
    with pytest.raises(RemoteError) as caught:
        await wire_client.ask(CommitSnapshot(snapshot_id=wrong_id))
    assert caught.value.code == "unknown-snapshot"
    assert await listed(wire_client) == []
    # The manager goes on serving.
    good = make_backup("good")
    await wire_client.backup(good)
    assert await listed(wire_client) == [good.snapshot_id]


@pytest_twisted.ensureDeferred
async def test_a_snapshot_stored_without_a_commit_is_indexed_from_the_notices(cluster, wire_client):
    # The index lists what the servers hold, whoever stored it: a backup whose commit was
    # lost is listed once the servers have told the manager of its snapshot object.
    backup = make_backup("uncommitted")
    for kind, pieces in ((Kind.DATA, backup.data), (Kind.LIST, backup.lists),
                         (Kind.TREE, backup.trees),
                         (Kind.SNAPSHOT, [(backup.snapshot_id, backup.snapshot)])):
        await wire_client.store(kind, pieces)

    async def indexed():
        return await listed(wire_client) == [backup.snapshot_id]

    await cluster.until(indexed, what="the snapshot being indexed")


# --- a lost catalog --------------------------------------------------------------------------------


async def backups_then_lost_catalog(cluster, wire_client, tmp_path, count: int = 3) -> list:
    summaries = [await wire_client.backup(make_backup(f"b{i}", time_s=1_700_000_000 + i))
                 for i in range(count)]
    await cluster.restart_manager(str(tmp_path / "new-manager"))
    return summaries


@pytest.mark.parametrize("page", [server_module.INVENTORY_PAGE, 2, 1])
@pytest_twisted.ensureDeferred
async def test_a_lost_catalog_is_rebuilt_from_the_servers(cluster, wire_client, tmp_path,
                                                          monkeypatch, page):
    """Also with each server's inventory in pages of one or two chunks: every page counts,
    and only the last ends the report."""
    monkeypatch.setattr(server_module, "INVENTORY_PAGE", page)
    summaries = await backups_then_lost_catalog(cluster, wire_client, tmp_path)
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        # Right after its start, the manager says it is starting (servers reconnect by themselves).
        reason = await starting_reason(fresh, ListSnapshots())
        assert reason.startswith("the manager is starting: ")
        status = await fresh.ask(StatusRequest())
        assert status.state == "starting"
        for msg in (Locate(chunk_ids=[summaries[0].tree]), PlacementRequest(),
                    CommitSnapshot(snapshot_id=summaries[0].snapshot_id), CheckRequest()):
            await starting_reason(fresh, msg)
        await cluster.until_ready()
        assert (await fresh.ask(ListSnapshots())).snapshots == summaries
        located = (await fresh.ask(Locate(chunk_ids=[s.tree for s in summaries]))).holders
        assert all(len(located[s.tree]) == 2 for s in summaries)
        status = await fresh.ask(StatusRequest())
        assert (status.state, status.snapshots) == ("ready", 3)
        assert (status.under_replicated, status.missing) == (0, 0)
        # Backups go on as before.
        backup = make_backup("after", time_s=1_700_000_100)
        await fresh.backup(backup)
        assert await listed(fresh) == [s.snapshot_id for s in summaries] + [backup.snapshot_id]
    finally:
        await fresh.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_catalog_is_rebuilt_with_a_server_lost_too(cluster, wire_client, tmp_path):
    summaries = [await wire_client.backup(make_backup(f"b{i}", time_s=1_700_000_000 + i))
                 for i in range(4)]
    lost = cluster.servers[0]
    await cluster.stop_server(lost)
    shutil.rmtree(lost.store.root)
    await cluster.restart_manager(str(tmp_path / "new-manager"))
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        await cluster.until_ready()
        assert (await fresh.ask(ListSnapshots())).snapshots == summaries
        # Every root tree is still readable from a live server.
        for summary in summaries:
            holders = (await fresh.ask(Locate(chunk_ids=[summary.tree]))).holders[summary.tree]
            assert lost.server.address not in holders
            reply = await fresh.servers.request(holders[0], FetchChunk(chunk_id=summary.tree))
            assert hashing.object_id(reply.kind, reply.payload) == summary.tree
        report = await fresh.ask(CheckRequest())
        assert (report.snapshots, report.missing, report.damaged) == (4, 0, [])
        assert report.trees == 4 * 4  # three trees and a chunk list each
    finally:
        await fresh.close()


@pytest_twisted.ensureDeferred
async def test_a_restart_waits_for_known_servers_until_the_timeout(cluster, wire_client):
    summaries = [await wire_client.backup(make_backup(f"b{i}")) for i in range(2)]
    await cluster.stop_server(cluster.servers[2])
    cluster.options["safe_mode_timeout"] = 1.5
    await cluster.restart_manager()  # the same catalog: it knows three servers
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        manager = cluster.manager.manager
        await cluster.until(lambda: len(manager.safe_mode.reported) == 2, what="two reports")
        reason = await starting_reason(fresh, ListSnapshots())
        assert reason == "the manager is starting: 2 of 3 known servers have reported"
        await cluster.until_ready()
        assert sorted(await listed(fresh)) == sorted(s.snapshot_id for s in summaries)
    finally:
        await fresh.close()


@pytest_twisted.ensureDeferred
async def test_a_restart_with_every_known_server_is_ready_without_waiting(cluster, wire_client):
    summary = await wire_client.backup(make_backup("kept"))
    cluster.options["safe_mode_timeout"] = 60.0
    cluster.options["safe_mode_settle"] = 60.0
    await cluster.restart_manager()
    await cluster.until_ready(timeout=10)
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        assert await listed(fresh) == [summary.snapshot_id]
    finally:
        await fresh.close()


# --- check -------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_check_walks_every_snapshot(cluster, wire_client):
    first, second = make_backup("one"), make_backup("two")
    await wire_client.backup(first)
    await wire_client.backup(second)
    report = await wire_client.ask(CheckRequest())
    assert sorted(report.servers_checked) == sorted(s.server.address for s in cluster.servers)
    assert (report.snapshots, report.trees, report.missing, report.damaged) == (2, 8, 0, [])
    assert report.chunks == 2 * (3 + 1 + 3 + 1)


@pytest_twisted.ensureDeferred
async def test_check_reports_data_deleted_from_every_server(cluster, wire_client):
    shared = os.urandom(2000)
    hit, spared = make_backup("hit", shared=shared), make_backup("spared")
    await wire_client.backup(hit)
    await wire_client.backup(spared)
    victim = hit.data[0][0]
    for server in holding(cluster, victim):
        os.remove(server.store.path_for(victim))
    report = await wire_client.ask(CheckRequest())
    assert (report.missing, report.damaged) == (1, [hit.snapshot_id])
    status = await wire_client.ask(StatusRequest())
    assert status.missing == 1


@pytest_twisted.ensureDeferred
async def test_check_reports_a_tree_deleted_from_every_server(cluster, wire_client):
    one, two = make_backup("one"), make_backup("two")
    await wire_client.backup(one)
    await wire_client.backup(two)
    me_id = one.trees[0][0]
    for server in holding(cluster, me_id):
        os.remove(server.store.path_for(me_id))
    report = await wire_client.ask(CheckRequest())
    assert (report.missing, report.damaged) == (1, [one.snapshot_id])
    assert report.trees == 8 - 2  # the tree, and the chunk list only it leads to


@pytest_twisted.ensureDeferred
async def test_repair_copies_objects_as_their_kind(cluster, wire_client):
    backup = make_backup("repaired")
    await wire_client.backup(backup)
    victim = holding(cluster, backup.snapshot_id)[0]
    await cluster.stop_server(victim)

    def copies():
        everything = [*backup.data, *backup.lists, *backup.trees, (backup.snapshot_id, b"")]
        return all(len(holding(cluster, i)) == 2 for i, _ in everything)

    await cluster.until(copies, what="re-replication")
    for server in holding(cluster, backup.snapshot_id):
        assert server.store.get(backup.snapshot_id)[0] == "snapshot"
        assert server.store.snapshot_ids() == [backup.snapshot_id]
    for tree_id, _ in backup.trees:
        assert {s.store.get(tree_id)[0] for s in holding(cluster, tree_id)} == {"tree"}


@pytest_twisted.ensureDeferred
async def test_a_fresh_cluster_is_ready_as_soon_as_a_server_reports(make_cluster):
    cluster = await make_cluster(servers=0, safe_mode_settle=60, safe_mode_timeout=60)
    assert not cluster.manager.manager.ready
    await cluster.add_server()
    await cluster.until_ready(timeout=5)
