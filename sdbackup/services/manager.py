"""The manager: places chunks, keeps the catalog, knows which servers are alive.

``Manager`` holds the logic and answers messages; ``ManagerService`` wires it
to a listening endpoint, the catalog file and the catalog's thread.
"""

import os

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from sdbackup.paths import check_snapshot_path
from sdbackup.placement import ServerLoad, place_chunks
from sdbackup.protocols.messages import (
    Ack,
    CheckReport,
    ChunkList,
    ChunksHeld,
    ClusterStatus,
    FileList,
    Placement,
    ReplicateChunk,
    ServerState,
    SnapshotBegun,
    SnapshotFinished,
    SnapshotList,
    VerifyChunks,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.services.catalog import Catalog
from sdbackup.services.node import NodeService, close_all

#: Free space is compared in steps of this many bytes when placing chunks.
PLACEMENT_GRANULARITY = 1024**3
MiB = 1024 * 1024
#: Under-replicated chunks fetched from the catalog at a time, and copies under way at once.
REPAIR_BATCH = 256
REPAIR_COPIES_AT_ONCE = 4
#: Seconds the manager waits for one repair copy.
REPAIR_TIMEOUT = 120.0


@attrs.define
class LiveServer:
    """A storage server connected to the manager now."""

    address: str
    connection: MessageProtocol
    free_bytes: int
    chunk_count: int
    last_seen: float
    inventory: set = attrs.Factory(set)
    #: Bytes placed on it since it connected: evens out servers with equal free space.
    assigned: int = 0


class Manager:
    """Answers servers and clients. Every catalog call goes through ``self.db``."""

    log = Logger()

    def __init__(self, catalog: Catalog, run_in_db, clock, replicas: int = 2,
                 dead_after: float = 15.0, repair_rate: float = 50 * MiB):
        self.catalog = catalog
        self.db = run_in_db
        self.replicas = replicas
        self.clock = clock
        self.dead_after = dead_after
        self.live: dict[str, LiveServer] = {}
        self.repair = Repairer(self, repair_rate)
        self.connections: set[MessageProtocol] = set()  # closed when the service stops

    def _now(self) -> float:
        return self.clock.seconds()

    def _server_of(self, connection) -> LiveServer:
        for server in self.live.values():
            if server.connection is connection:
                return server
        raise RemoteError("this connection has not registered as a server", "not-registered")

    # --- storage servers ---------------------------------------------------

    async def handle_RegisterServer(self, msg, connection):
        if not msg.address:
            raise RemoteError("a server must give the address clients reach it at", "bad-request")
        old = self.live.get(msg.address)
        if old is not None and old.connection is not connection:
            self.log.warn("server {address} registered again; dropping its old link",
                          address=msg.address)
            old.connection.transport.loseConnection()
        self.live[msg.address] = LiveServer(
            msg.address, connection, msg.free_bytes, msg.chunk_count, self._now()
        )
        await self.db(self.catalog.record_server, msg.address, msg.free_bytes, msg.chunk_count,
                      self._now())
        self.log.info("server {address} registered: {chunks} chunks, {free} bytes free",
                      address=msg.address, chunks=msg.chunk_count, free=msg.free_bytes)
        return Ack(request_id=msg.request_id)

    async def handle_ChunkInventory(self, msg, connection):
        server = self._server_of(connection)
        server.inventory.update(msg.chunk_ids)
        if msg.final:
            reported, server.inventory = server.inventory, set()
            await self.db(self.catalog.replace_locations, server.address, reported)
            self.log.info("server {address} reported {count} chunks",
                          address=server.address, count=len(reported))
        return Ack(request_id=msg.request_id)

    async def handle_ChunksAdded(self, msg, connection):
        server = self._server_of(connection)
        await self.db(self.catalog.add_locations, server.address, msg.chunk_ids)

    async def handle_ChunksCorrupt(self, msg, connection):
        server = self._server_of(connection)
        self.log.warn("server {address} quarantined {count} corrupt copies; repairing them",
                      address=server.address, count=len(msg.chunk_ids))
        await self.db(self.catalog.remove_locations, server.address, msg.chunk_ids)
        self.repair.soon()

    def handle_Heartbeat(self, msg, connection):
        server = self._server_of(connection)
        server.free_bytes = msg.free_bytes
        server.chunk_count = msg.chunk_count
        server.last_seen = self._now()
        return self.db(self.catalog.record_server, server.address, msg.free_bytes,
                       msg.chunk_count, server.last_seen)

    def connection_made(self, connection):
        self.connections.add(connection)

    def connection_lost(self, connection):
        self.connections.discard(connection)
        for server in list(self.live.values()):
            if server.connection is connection:
                self._declare_dead(server, "its connection closed")

    def _declare_dead(self, server: LiveServer, why: str):
        if self.live.get(server.address) is not server:
            return
        del self.live[server.address]
        self.log.warn("server {address} declared dead: {why}", address=server.address, why=why)
        server.connection.transport.abortConnection()
        self.repair.soon()

    def loads(self, excluding=()) -> list[ServerLoad]:
        """What placement needs to know of the live servers, but those in ``excluding``."""
        return [ServerLoad(s.address, s.free_bytes, s.assigned) for s in self.live.values()
                if s.address not in excluding]

    def check_liveness(self):
        """Declare dead every server silent for longer than ``dead_after`` seconds."""
        now = self._now()
        for server in list(self.live.values()):
            if now - server.last_seen > self.dead_after:
                self._declare_dead(server, f"no heartbeat for {now - server.last_seen:.1f} s")

    # --- backups -------------------------------------------------------------

    async def handle_PlacementRequest(self, msg, connection):
        ids = [c.chunk_id for c in msg.chunks]
        known = await self._held(ids)
        known_set = set(known)
        wanted = {c.chunk_id: c.size for c in msg.chunks if c.chunk_id not in known_set}
        if wanted and not self.live:
            raise RemoteError("no storage server is alive", "not-enough-servers")
        loads = self.loads(excluding=msg.exclude)
        if wanted and not loads:
            raise RemoteError("no usable storage server is alive", "not-enough-servers")
        count = min(self.replicas, len(loads))
        assignments = {}
        if wanted:
            assignments = place_chunks(loads, list(wanted.items()), count, PLACEMENT_GRANULARITY)
            for chunk_id, servers in assignments.items():
                for address in servers:
                    self.live[address].assigned += wanted[chunk_id]
        return Placement(request_id=msg.request_id, known=known, assignments=assignments,
                         replicas=self.replicas)

    async def handle_HasChunks(self, msg, connection):
        return ChunksHeld(request_id=msg.request_id, chunk_ids=await self._held(msg.chunk_ids))

    async def _held(self, chunk_ids: list[str]) -> list[str]:
        """The chunks among ``chunk_ids`` with a copy on a live server, in the same order."""
        holders = await self.db(self.catalog.holders, chunk_ids)
        return [c for c in chunk_ids if any(h in self.live for h in holders.get(c, ()))]

    async def handle_BeginSnapshot(self, msg, connection):
        snapshot_id = await self.db(self.catalog.begin_snapshot, msg.host, msg.paths, self._now())
        self.log.info("snapshot {snapshot} begun by {host}", snapshot=snapshot_id, host=msg.host)
        return SnapshotBegun(request_id=msg.request_id, snapshot_id=snapshot_id)

    async def handle_CommitFiles(self, msg, connection):
        for entry in msg.files:
            check_snapshot_path(entry.path)
        await self.db(self.catalog.commit_files, msg.snapshot_id, msg.chunks, msg.files)
        return Ack(request_id=msg.request_id)

    async def handle_StageChunks(self, msg, connection):
        check_snapshot_path(msg.path)
        await self.db(self.catalog.stage_chunks, msg.snapshot_id, msg.path, msg.first_chunk,
                      msg.chunks)
        return Ack(request_id=msg.request_id)

    async def handle_FinishSnapshot(self, msg, connection):
        summary = await self.db(self.catalog.finish_snapshot, msg.snapshot_id)
        self.log.info("snapshot {snapshot} finished: {files} files, {size} bytes",
                      snapshot=summary.snapshot_id, files=summary.files, size=summary.bytes)
        return SnapshotFinished(request_id=msg.request_id, snapshot=summary)

    # --- reading ---------------------------------------------------------------

    async def handle_ListSnapshots(self, msg, connection):
        snapshots = await self.db(self.catalog.snapshots)
        return SnapshotList(request_id=msg.request_id, snapshots=snapshots)

    async def handle_ListFiles(self, msg, connection):
        def page():
            snapshot_id = self.catalog.resolve_snapshot(msg.snapshot)
            files, more = self.catalog.list_files(snapshot_id, msg.after, msg.limit)
            holders = self.catalog.holders({c.chunk_id for f in files for c in f.chunks})
            return snapshot_id, files, more, holders

        snapshot_id, files, more, holders = await self.db(page)
        return FileList(request_id=msg.request_id, snapshot_id=snapshot_id, files=files,
                        holders=self._live_holders(holders), more=more)

    async def handle_ListChunks(self, msg, connection):
        def page():
            chunks, more = self.catalog.list_chunks(msg.snapshot_id, msg.path, msg.first_chunk,
                                                    msg.limit)
            return chunks, more, self.catalog.holders({c.chunk_id for c in chunks})

        chunks, more, holders = await self.db(page)
        return ChunkList(request_id=msg.request_id, chunks=chunks,
                         holders=self._live_holders(holders), more=more)

    def _live_holders(self, holders: dict[str, list[str]]) -> dict[str, list[str]]:
        """The live holders of each chunk; all of them when none is live (one may be back)."""
        return {
            chunk_id: [s for s in servers if s in self.live] or servers
            for chunk_id, servers in holders.items()
        }

    async def handle_StatusRequest(self, msg, connection):
        alive = set(self.live)
        known = await self.db(self.catalog.servers)
        chunks, under, missing = await self.db(self.catalog.chunk_stats, alive, self.replicas)
        states = []
        for address, last_seen, free_bytes, chunk_count in known:
            live = self.live.get(address)
            if live is not None:
                free_bytes, chunk_count, last_seen = (live.free_bytes, live.chunk_count,
                                                      live.last_seen)
            states.append(ServerState(address, live is not None, free_bytes, chunk_count,
                                      last_seen))
        return ClusterStatus(request_id=msg.request_id, replicas=self.replicas, servers=states,
                             chunks=chunks, under_replicated=under, missing=missing)

    async def handle_CheckRequest(self, msg, connection):
        """Have every live server verify (and with ``read_data`` re-hash) what it holds and
        report it again, then count the chunks in use that lack copies."""
        servers = list(self.live.values())
        replies = await defer.DeferredList(
            [defer.ensureDeferred(s.connection.request(VerifyChunks(read_data=msg.read_data)))
             for s in servers], consumeErrors=True)
        checked, unreachable, corrupt = [], [], 0
        for server, (ok, result) in zip(servers, replies, strict=True):
            if ok:
                checked.append(server.address)
                corrupt += len(result.corrupt)
            else:
                unreachable.append(server.address)
        chunks, under, missing = await self.db(self.catalog.chunk_stats, set(self.live),
                                               self.replicas)
        self.repair.soon()
        return CheckReport(request_id=msg.request_id, servers_checked=checked,
                           servers_unreachable=unreachable, chunks=chunks, missing=missing,
                           under_replicated=under, corrupt=corrupt)


class Repairer:
    """Brings chunks back to the replication factor: copies from a live holder to other servers.

    A pass runs when a server is declared dead, a copy is reported corrupt, a
    check ends, and every ``repair_interval`` seconds. Copies are paced to
    ``rate`` bytes a second, with a few under way at once, so repairs never
    starve client traffic.
    """

    log = Logger()

    def __init__(self, manager: Manager, rate: float):
        self.manager = manager
        self.rate = rate
        self.running: defer.Deferred | None = None
        self._next_start = 0.0

    def soon(self):
        """Start a pass unless one is under way (it goes on until nothing is left to do)."""
        if self.running is None:
            self.running = defer.ensureDeferred(self._pass())
            self.running.addErrback(lambda f: self.log.failure("repair pass failed", f))
            self.running.addBoth(self._done)
        return self.running

    def _done(self, result):
        self.running = None
        return result

    async def _pass(self):
        manager = self.manager
        repaired = 0
        while manager.live:
            wanted = min(manager.replicas, len(manager.live))
            work = await manager.db(manager.catalog.under_replicated, set(manager.live), wanted,
                                    REPAIR_BATCH)
            if not work:
                break
            # A few workers share the batch (a semaphore would nest a callback per chunk).
            pending = iter(work)

            async def worker(wanted=wanted, pending=pending):
                return sum([await self._copy(*w, wanted) for w in pending])

            results = await defer.gatherResults(
                [defer.ensureDeferred(worker()) for _ in range(REPAIR_COPIES_AT_ONCE)])
            done = sum(results)
            repaired += done
            if not done:
                break  # nothing could be copied now; the next pass tries again
        if repaired:
            self.log.info("repair: copied {count} chunks", count=repaired)

    async def _copy(self, chunk_id: str, size: int, holders: list[str], wanted: int) -> bool:
        manager = self.manager
        loads = manager.loads(excluding=holders)
        need = min(wanted - len(holders), len(loads))
        if need < 1:
            return False
        targets = place_chunks(loads, [(chunk_id, size)], need, PLACEMENT_GRANULARITY)[chunk_id]
        await self._pace(size)
        for source in holders:
            server = manager.live.get(source)
            if server is None:
                continue
            try:
                reply = await server.connection.request(
                    ReplicateChunk(chunk_id=chunk_id, forward_to=targets), REPAIR_TIMEOUT,
                    manager.clock)
            except RemoteError as e:
                if e.code in ("chunk-corrupt", "chunk-missing"):
                    await manager.db(manager.catalog.remove_locations, source, [chunk_id])
                    continue  # try the next holder
                self.log.warn("repair of {chunk} from {source} failed: {why}",
                              chunk=chunk_id[:16], source=source, why=e.reason)
                return False
            except Exception as e:
                self.log.warn("repair of {chunk} from {source} failed: {why}",
                              chunk=chunk_id[:16], source=source, why=str(e))
                continue
            for address in reply.holders:
                if address in manager.live:
                    manager.live[address].assigned += size
                await manager.db(manager.catalog.add_locations, address, [chunk_id])
            return True
        return False

    async def _pace(self, size: int):
        """Reserve ``size`` bytes of the repair rate; wait for the reservation's turn."""
        now = self.manager.clock.seconds()
        start = max(now, self._next_start)
        self._next_start = start + size / self.rate
        if start > now:
            await task.deferLater(self.manager.clock, start - now)


class ManagerService(NodeService):
    """The manager process: a listener, the catalog and its thread, liveness and repair."""

    name_for_logs = "sdbackup-manager"

    def __init__(self, listen: str, data: str, replicas: int = 2, dead_after: float = 15.0,
                 repair_interval: float = 5.0, repair_rate: float = 50 * MiB, reactor=None):
        # One catalog thread: SQLite calls are serialised, never on the reactor.
        super().__init__(listen, "sdbackup-catalog", 1, reactor)
        self.data = data
        self.replicas = replicas
        self.dead_after = dead_after
        self.repair_interval = repair_interval
        self.repair_rate = repair_rate
        self.manager: Manager | None = None

    def startService(self):
        super().startService()
        catalog = Catalog(os.path.join(self.data, "catalog.sqlite"))
        self.manager = Manager(catalog, self.run_in_pool, self.reactor, self.replicas,
                               self.dead_after, self.repair_rate)
        self.every(max(self.dead_after / 4, 0.05), self.manager.check_liveness, "liveness")
        self.every(self.repair_interval, self.manager.repair.soon, "repair")
        self.listen(self.manager, "manager")

    def listened(self, port):
        self.log.info("sdbackup-manager listening on port {port}, catalog in {data}, "
                      "replication factor {replicas}",
                      port=port.getHost().port, data=self.data, replicas=self.replicas)

    async def stopping(self):
        close_all(self.manager.connections)

    def stopped(self):
        self.manager.catalog.close()
