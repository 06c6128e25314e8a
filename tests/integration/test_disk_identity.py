"""One disk, one live address: registrations that would count a disk twice, or take a live
server's address with another disk, are refused, and the live server keeps its copies."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, connectProtocol

from sdbackup.protocols.messages import RegisterServer, StatusRequest
from sdbackup.protocols.peer import MessageProtocol, RemoteError

from .backups import make_backup


async def as_server(cluster) -> MessageProtocol:
    endpoint = clientFromString(reactor, cluster.manager_address)
    proto = await connectProtocol(endpoint, MessageProtocol(None, "server"))
    await proto.ready
    return proto


@pytest_twisted.ensureDeferred
async def test_a_live_disk_or_address_cannot_be_registered_twice(cluster, wire_client):
    await wire_client.backup(make_backup("one"))
    victim = cluster.servers[0]
    manager = cluster.manager.manager
    before = await manager.db(manager.catalog.usage_by_server)
    rogue = await as_server(cluster)
    try:
        # Its address, with another disk: refused while it is alive.
        with pytest.raises(RemoteError, match="held by a live server with another data folder"
                           ) as refused:
            await rogue.request(RegisterServer(address=victim.server.address,
                                               disk_id="f" * 32), 10, reactor)
        assert refused.value.code == "forbidden"
        # Its disk (a copy of its folder), at another address: refused, never a second copy.
        with pytest.raises(RemoteError, match="a copy of a data folder is not a second copy"
                           ) as refused:
            await rogue.request(RegisterServer(address="tcp:127.0.0.1:9",
                                               disk_id=victim.store.identity), 10, reactor)
        assert refused.value.code == "disk-in-use"
    finally:
        rogue.transport.loseConnection()
    status = await wire_client.ask(StatusRequest())
    assert sorted(s.address for s in status.servers) == sorted(
        s.server.address for s in cluster.servers)
    assert all(s.alive for s in status.servers)
    assert manager.live[victim.server.address].connection.connected
    assert await manager.db(manager.catalog.usage_by_server) == before
