"""``forget`` on the wire: ForgetSnapshots unlists snapshots, every server deletes their objects,
and neither a lost catalog nor a server that was down brings them back. Nothing they
reference is deleted: that is prune's work (test_prune.py)."""

import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import connectProtocol

from sdbackup.localcluster import make_certificates, tls_transport
from sdbackup.protocols.messages import (
    CheckRequest,
    ForgetSnapshots,
    StatusRequest,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.services.manager import ManagerService

from .backups import make_backup
from .test_manager_index import listed


async def listed_after_manager_restart(cluster, wire_client, data: str | None = None) -> list:
    """The snapshots a restarted manager lists (``data``: a new folder, a lost catalog)."""
    await cluster.restart_manager(data)
    await wire_client.close()
    fresh = await cluster.wire_client()
    try:
        await cluster.until_ready()
        return await listed(fresh)
    finally:
        await fresh.close()


def snapshot_files(cluster) -> set[str]:
    """The snapshot objects in every running server's data folder."""
    return {name for server in cluster.servers
            for name in os.listdir(os.path.join(server.store.root, "snapshots"))}


async def three_backups(wire_client) -> list:
    return [await wire_client.backup(make_backup(f"b{i}", time_s=1_700_000_000 + i))
            for i in range(3)]


@pytest_twisted.ensureDeferred
async def test_forget_unlists_and_deletes_the_snapshot_objects_only(cluster, wire_client):
    backups = [make_backup(f"b{i}", time_s=1_700_000_000 + i) for i in range(3)]
    for backup in backups:
        await wire_client.backup(backup)
    gone, kept = [b.snapshot_id for b in backups[:2]], backups[2].snapshot_id
    chunks_before = sum(s.store.count() for s in cluster.servers)

    reply = await wire_client.ask(ForgetSnapshots(snapshot_ids=gone))
    assert sorted(reply.snapshot_ids) == sorted(gone)
    assert await listed(wire_client) == [kept]
    # Each snapshot object was on two servers: those copies are gone from the disks, durably.
    assert snapshot_files(cluster) == {kept}
    assert sum(s.store.count() for s in cluster.servers) == chunks_before - 2 * len(gone)
    # The data they reference stays until a prune: every other chunk is still held.
    for backup in backups:
        for chunk_id, _ in backup.data + backup.lists + backup.trees:
            assert any(s.store.has(chunk_id) for s in cluster.servers)
    status = await wire_client.ask(StatusRequest())
    assert (status.snapshots, status.missing, status.under_replicated) == (1, 0, 0)
    report = await wire_client.ask(CheckRequest())
    assert (report.snapshots, report.missing, report.damaged) == (1, 0, [])
    # Forgotten already, or never listed: nothing to do, no error.
    assert (await wire_client.ask(ForgetSnapshots(snapshot_ids=gone))).snapshot_ids == []


@pytest_twisted.ensureDeferred
async def test_a_lost_catalog_does_not_bring_forgotten_snapshots_back(cluster, wire_client,
                                                                      tmp_path):
    summaries = await three_backups(wire_client)
    await wire_client.ask(ForgetSnapshots(snapshot_ids=[summaries[0].snapshot_id]))
    assert (await listed_after_manager_restart(cluster, wire_client, str(tmp_path / "new-manager"))
            == [s.snapshot_id for s in summaries[1:]])


@pytest_twisted.ensureDeferred
async def test_a_server_down_during_forget_deletes_the_object_when_it_returns(cluster,
                                                                             wire_client):
    summaries = await three_backups(wire_client)
    doomed = summaries[0].snapshot_id
    index = next(i for i, s in enumerate(cluster.servers) if s.store.has(doomed))
    victim = cluster.servers[index]
    port = victim.port.getHost().port
    await cluster.stop_server(victim)

    assert (await wire_client.ask(ForgetSnapshots(snapshot_ids=[doomed]))).snapshot_ids == [doomed]
    assert doomed in os.listdir(os.path.join(victim.store.root, "snapshots"))  # it was down

    returned = await cluster.add_server(index, f"tcp:{port}")
    await cluster.until(lambda: not returned.store.has(doomed),
                        what="the returning server deleting the forgotten snapshot")
    assert doomed not in snapshot_files(cluster)
    assert await listed(wire_client) == [s.snapshot_id for s in summaries[1:]]
    status = await wire_client.ask(StatusRequest())
    assert (status.snapshots, status.missing) == (2, 0)
    # A restart with the same catalog lists it no more either.
    assert (await listed_after_manager_restart(cluster, wire_client)
            == [s.snapshot_id for s in summaries[1:]])


@pytest_twisted.ensureDeferred
async def test_only_an_admin_may_forget(tmp_path):
    """Under TLS a client's certificate may not forget; an admin's passes the check (and hears
    that the manager, with no server yet, is starting)."""
    make_certificates(str(tmp_path))

    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=tls_transport(str(tmp_path), "manager"))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        forget = ForgetSnapshots(snapshot_ids=["ab" * 32])
        codes = {}
        for name in ("client", "admin"):
            proto = MessageProtocol(None, "client", tls=True, expect=("manager",), clock=reactor)
            endpoint = tls_transport(str(tmp_path), name).client_endpoint(
                reactor, f"tcp:127.0.0.1:{port}", 5)
            await connectProtocol(endpoint, proto)
            await proto.ready
            with pytest.raises(RemoteError) as caught:
                await proto.request(forget, 5, reactor)
            codes[name] = caught.value.code
            proto.transport.loseConnection()
            await task.deferLater(reactor, 0.1)
        assert codes == {"client": "forbidden", "admin": "starting"}
    finally:
        await manager.stopService()
