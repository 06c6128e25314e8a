"""The manager's side of ``sdbackup server list|drain|retire``.

A draining server gets no new chunks, and its copies stop counting toward the
replication factor: the repairer (``repair``) copies each of its chunks to
other live servers that are not draining, from whichever live holder it
likes, until each has its full copies elsewhere. The flag is kept in the
catalog, so a restarted manager goes on draining. A retired server is
forgotten: its copies leave the index, it leaves ``status``, and its disk (by
its identity) is refused if it registers again. Retiring is refused while
any chunk it holds lacks its full copies on the other live servers, and says
how many would lose their last copy.
"""

from twisted.logger import Logger

from sdbackup.limits import MAX_SERVERS, shorten
from sdbackup.protocols.messages import ServerInfo, ServerList
from sdbackup.protocols.peer import RemoteError


class ServerAdmin:
    """``manager`` gives ``live``, ``draining``, ``db``, ``catalog``, ``replicas``, ``repair``."""

    log = Logger()

    def __init__(self, manager):
        self.manager = manager

    def counting(self) -> set[str]:
        """Live servers whose copies count toward the factor (those not draining)."""
        return {a for a in self.manager.live if a not in self.manager.draining}

    async def infos(self, only: str | None = None) -> list[ServerInfo]:
        """Every server the catalog knows (or just ``only``), live figures where it is live.

        ``short`` and ``only_here`` are worked out for draining and dead servers only: they
        cost a look at every copy the server holds."""
        manager = self.manager
        records = await manager.db(manager.catalog.server_records)
        usage = await manager.db(manager.catalog.usage_by_server, only)
        found = []
        for address, disk_id, last_seen, free_bytes, retired in records:
            if only is not None and address != only:
                continue
            live = manager.live.get(address)
            short = only_here = 0
            if not retired and (live is None or address in manager.draining):
                short, only_here = await self.shortfall(address)
            copies, size = usage.get(address, (0, 0))
            found.append(ServerInfo(
                address=address, disk_id=(live.disk_id if live else disk_id) or "",
                alive=live is not None, last_seen=live.last_seen if live else last_seen,
                chunks=copies, bytes=size, free_bytes=live.free_bytes if live else free_bytes,
                total_bytes=live.total_bytes if live else 0, full=bool(live and live.full),
                draining=address in manager.draining, retired=bool(retired),
                short=short, only_here=only_here))
        if len(found) > MAX_SERVERS:  # more than a reply may carry: keep the live ones
            found.sort(key=lambda info: (not info.alive, info.retired))
        return found[:MAX_SERVERS]

    async def shortfall(self, address: str) -> tuple[int, int]:
        """Of ``address``'s chunks: those with fewer than the factor on the counting servers
        but it, and those with no copy on any other live server."""
        manager = self.manager
        return await manager.db(manager.catalog.shortfall, address, self.counting() - {address},
                                set(manager.live) - {address}, manager.replicas)

    # --- registering: one live address per disk ------------------------------------

    async def check_registration(self, msg, old, connection):
        """Refuse a registration that would count one disk twice, or bring back a retired one.

        ``old`` is the live server at ``msg.address``, if any."""
        manager, disk = self.manager, msg.disk_id
        if (old is not None and old.connection is not connection and old.disk_id and disk
                and old.disk_id != disk):
            self._refused(msg, connection, f"{old.address} is held by a live server with another "
                                            f"data folder (identity {old.disk_id})")
            raise RemoteError(f"{msg.address} is held by a live server with another data folder",
                              "forbidden")
        if not disk:
            return
        twin = next((s for s in manager.live.values() if s.disk_id == disk
                     and s.address != msg.address and s.connection is not connection), None)
        if twin is not None:
            self._refused(msg, connection, f"its data folder (identity {disk}) is served by "
                                            f"{twin.address} already")
            raise RemoteError(
                f"the data folder of {msg.address} has identity {disk}, which the live server "
                f"{twin.address} serves: a copy of a data folder is not a second copy. Stop "
                f"{twin.address} (a moved folder), or remove the copy's identity file to make "
                f"it a new, empty-counting disk", "disk-in-use")
        if any(retired for _, retired in await manager.db(manager.catalog.server_of_disk, disk)):
            self._refused(msg, connection, f"its data folder (identity {disk}) was retired")
            raise RemoteError(
                f"the data folder of {msg.address} (identity {disk}) belongs to a retired "
                f"server: start it with a new, empty data folder to add it again", "retired")

    def _refused(self, msg, connection, why: str):
        self.log.warn("refused registration of {address} by {peer}: {why}",
                      address=msg.address, peer=connection.describe_peer(), why=why)

    async def adopt_disk(self, msg):
        """A disk known at another address (dead: see ``check_registration``) is served at
        ``msg.address`` now: its copies and its draining flag move with it, the old address
        is forgotten."""
        manager, disk = self.manager, msg.disk_id
        if not disk:
            return
        records = await manager.db(manager.catalog.server_of_disk, disk)
        for address, retired in records:
            if address == msg.address or retired or address in manager.live:
                continue
            await manager.db(manager.catalog.move_server, address, msg.address)
            if address in manager.draining:
                manager.draining.discard(address)
                manager.draining.add(msg.address)
            manager.safe_mode.server_lost(address)
            self.log.info("disk {disk} moved from {old} to {address}: its copies are the same "
                          "copies", disk=disk, old=address, address=msg.address)
        # (another disk at a draining address is not draining: the catalog said so)
        manager.draining = await manager.db(manager.catalog.draining_servers)

    # --- list, drain, retire ---------------------------------------------------------

    async def _known(self, address: str) -> ServerInfo:
        infos = await self.infos(address)
        if not infos or infos[0].retired:
            raise RemoteError(f"no server {shorten(address)} is known to the manager (see "
                              f"sdbackup server list)", "unknown-server")
        return infos[0]

    async def list(self, msg) -> ServerList:
        return ServerList(request_id=msg.request_id, servers=await self.infos(),
                          replicas=self.manager.replicas)

    async def drain(self, msg, peer: str) -> ServerList:
        manager = self.manager
        await self._known(msg.address)
        others = self.counting() - {msg.address}
        if msg.address not in manager.draining and len(others) < manager.replicas:
            raise RemoteError(
                f"draining {msg.address} would leave {len(others)} live servers that are not "
                f"draining for {manager.replicas} copies of each chunk: add a server first",
                "not-enough-servers")
        if msg.address not in manager.draining:
            await manager.db(manager.catalog.set_draining, msg.address)
            manager.draining.add(msg.address)
            self.log.info("server {address} is draining (asked by {peer}): nothing more is "
                          "placed on it, and its chunks are copied to the others",
                          address=msg.address, peer=peer)
            manager.repair.soon()
        return ServerList(request_id=msg.request_id, servers=[await self._known(msg.address)],
                          replicas=manager.replicas)

    async def retire(self, msg, peer: str) -> ServerList:
        manager = self.manager
        info = await self._known(msg.address)
        if info.alive and not info.draining:
            raise RemoteError(
                f"{msg.address} is alive and not drained: drain it first (sdbackup server drain "
                f"{msg.address}), or stop it", "server-alive")
        short, only_here = await self.shortfall(msg.address)
        if short:
            lost = (f", and {only_here} of them would lose their last copy" if only_here
                    else "")
            raise RemoteError(
                f"retiring {msg.address} would leave {short} of its {info.chunks} chunks with "
                f"fewer than {manager.replicas} copies on the live servers that are not "
                f"draining{lost}: wait for its drain (or the repair of a dead server) to copy "
                f"them, or bring a server back", "would-lose-copies")
        await manager.db(manager.catalog.retire_server, msg.address, manager.clock.seconds())
        manager.draining.discard(msg.address)
        live = manager.live.pop(msg.address, None)
        manager.safe_mode.server_lost(msg.address)
        if live is not None:
            live.connection.transport.loseConnection()
        self.log.info("server {address} retired by {peer}: {chunks} copies forgotten, all of "
                      "them held elsewhere", address=msg.address, peer=peer, chunks=info.chunks)
        retired = await self.infos(msg.address)
        return ServerList(request_id=msg.request_id, servers=retired, replicas=manager.replicas)
