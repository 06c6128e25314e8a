"""The manager: places chunks, keeps the index of what the servers hold, knows which are alive.

``Manager`` answers messages and hands the work to one module per capability:

* ``safemode``: when a starting manager may serve clients;
* ``indexer``: the list of snapshots, read from the snapshot objects the servers hold;
* ``dagcheck``: ``check``'s walk from every snapshot through the objects it references;
* ``repair``: copies of chunks left with too few live copies;
* ``prune``: deleting what no snapshot reaches any more, trimming copies above the factor.

``forget`` unlists snapshots and has the servers delete their objects.

Each placement comes with tickets the manager signs (``sdbackup.tickets``,
HDFS block tokens as the model): servers store and forward only under them,
with the key each got when it registered.

Its catalog is an index: locations come from the servers' own reports, never
from a client's word, and everything in it can be rebuilt from what the
servers hold. ``ManagerService`` wires it to a listening endpoint, the catalog
file and the catalog's thread.
"""

import functools
import os

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from sdbackup.limits import DEFAULT_REPLICAS, MAX_REPLICAS, MAX_SERVERS, shorten
from sdbackup.placement import ServerLoad, place_chunks
from sdbackup.protocols.messages import (
    MAX_KEYS,
    Ack,
    CheckReport,
    ChunksHeld,
    ClusterStatus,
    DeleteSnapshots,
    KeyCommitted,
    KeyList,
    Locations,
    Placement,
    Registered,
    ServerState,
    SnapshotCommitted,
    SnapshotList,
    SnapshotsForgotten,
    SyncNotices,
    TicketKeys,
    VerifyChunks,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.services.catalog import Catalog
from sdbackup.services.dagcheck import DagCheck
from sdbackup.services.drain import ServerAdmin
from sdbackup.services.indexer import DELETE_TIMEOUT, SnapshotIndexer, same_content
from sdbackup.services.node import NodeService, close_all
from sdbackup.services.prune import DEFAULT_GRACE, DEFAULT_RATE, Pruner
from sdbackup.services.repair import PLACEMENT_GRANULARITY, Repairer
from sdbackup.services.safemode import SafeMode
from sdbackup.tickets import DEFAULT_KEY_INTERVAL, DEFAULT_LIFETIME, Keyring
from sdbackup.tlsconfig import Transport
from sdbackup.web.monitor import ManagerMonitor

MiB = 1024 * 1024
#: Chunks placed together at most (their bytes, and how many): a client's pack.
RUN_BYTES = MiB
RUN_CHUNKS = 128
#: Seconds the manager waits for a server to send its pending notices before a commit.
SYNC_TIMEOUT = 30.0
#: Seconds between the end of a ``check --read-data`` and the start of the next, by default.
READ_DATA_INTERVAL = 600.0
#: Seconds a chunk's touch may be old before a lookup writes it again, at most.
MAX_TOUCH_SLACK = 600.0
#: Seconds the news that comes all the time (copies noticed, lookups' touches, heartbeats)
#: is gathered in one catalog transaction before it is committed (the catalog says why).
NOTICE_COMMIT_DELAY = 2.0


class KeyRefused(Exception):
    """A key object that cannot be removed: unknown, or its repository's last."""

    code = "key-refused"


@attrs.define
class LiveServer:
    """A storage server connected to the manager now."""

    address: str
    connection: MessageProtocol
    free_bytes: int
    chunk_count: int
    last_seen: float
    #: Bytes placed on it since it connected: evens out servers with equal free space.
    assigned: int = 0
    #: An inventory of it is under way: chunks it adds meanwhile count as reported in it.
    reporting: bool = True
    #: Chunks and snapshots in the inventory under way so far.
    reported_chunks: int = 0
    reported_snapshots: int = 0
    #: Its disk's size, and its scrub pass under way (chunks checked of how many), for the
    #: dashboard.
    total_bytes: int = 0
    scrub_done: int = 0
    scrub_total: int = 0
    #: Its data folder's identity ("": not told), and whether it has less free space than
    #: its reserve (nothing is placed on a full server).
    disk_id: str = ""
    full: bool = False


def when_ready(handler):
    """A client request: refused with code "starting" while the manager is in safe mode."""

    @functools.wraps(handler)
    def gated(self, msg, connection):
        if not self.ready:
            raise RemoteError(self.starting_reason(), "starting")
        return handler(self, msg, connection)

    return gated


def place_runs(loads: list[ServerLoad], wanted: list[tuple[str, int]], count: int
               ) -> dict[str, list[str]]:
    """Servers for each ``(chunk_id, size)``: consecutive chunks go together in runs of up to
    ``RUN_BYTES`` and ``RUN_CHUNKS``, each run placed (and balanced) as one.

    A client sends the chunks that share servers in one pack, and a server makes each pack
    durable with a sync of its own: placed one by one, a batch of small chunks was spread
    over every pair of servers, in packs of a few dozen chunks, and the servers spent most
    of a first backup of 50,000 files syncing."""
    runs, run, size = [], [], 0
    for chunk_id, chunk_size in wanted:
        if run and (size + chunk_size > RUN_BYTES or len(run) == RUN_CHUNKS):
            runs.append((run, size))
            run, size = [], 0
        run.append(chunk_id)
        size += chunk_size
    if run:
        runs.append((run, size))
    placed = place_chunks(loads, [(ids[0], size) for ids, size in runs], count,
                          PLACEMENT_GRANULARITY)
    return {chunk_id: placed[ids[0]] for ids, _ in runs for chunk_id in ids}


class Manager:
    """Answers servers and clients. Every catalog call goes through ``self.db``."""

    log = Logger()

    def __init__(self, catalog: Catalog, run_in_db, clock, replicas: int = DEFAULT_REPLICAS,
                 dead_after: float = 15.0, repair_rate: float = 50 * MiB,
                 expected_servers=(), safe_mode_timeout: float = 30.0,
                 safe_mode_settle: float = 3.0, ticket_lifetime: float = DEFAULT_LIFETIME,
                 ticket_key_interval: float = DEFAULT_KEY_INTERVAL,
                 prune_grace: float = DEFAULT_GRACE, prune_rate: float = DEFAULT_RATE,
                 read_data_interval: float = READ_DATA_INTERVAL):
        self.catalog = catalog
        self.db = run_in_db
        self.replicas = replicas
        self.clock = clock
        self.dead_after = dead_after
        self.live: dict[str, LiveServer] = {}
        self.connections: set[MessageProtocol] = set()  # closed when the service stops
        self.safe_mode = SafeMode(frozenset(expected_servers), clock.seconds(),
                                  safe_mode_timeout, safe_mode_settle)
        #: False while starting (safe mode): client requests are answered "starting".
        self.ready = False
        self._leaving: defer.Deferred | None = None
        self._safe_mode_call = None
        self._commit_call = None
        self.indexer = SnapshotIndexer(self)
        self.repair = Repairer(self, repair_rate)
        self.pruner = Pruner(self, prune_grace, prune_rate)
        #: ``check --read-data`` re-reads every disk whole: one at a time, and the next no
        #: sooner than this many seconds after the last one ended.
        self.read_data_interval = read_data_interval
        self._read_data_running = False
        self._read_data_ended: float | None = None
        #: Servers being drained (kept in the catalog): no chunk is placed on them, and their
        #: copies do not count toward the factor.
        self.draining: set[str] = set()
        self.server_admin = ServerAdmin(self)
        #: Signs placement tickets; its secrets go to each server as it registers.
        self.tickets = Keyring(ticket_lifetime, ticket_key_interval)

    def _touch_slack(self) -> float:
        """How old a chunk's touch may be before a lookup writes it again: an eighth of the
        prune grace, at most 10 minutes (a backup is then sure to commit if it runs no
        longer than the grace less this; the commit's own check guards the rest)."""
        return min(self.pruner.grace / 8, MAX_TOUCH_SLACK)

    def _now(self) -> float:
        return self.clock.seconds()

    def _server_of(self, connection) -> LiveServer:
        for server in self.live.values():
            if server.connection is connection:
                return server
        raise RemoteError("this connection has not registered as a server", "not-registered")

    # --- safe mode ---------------------------------------------------------------

    @property
    def state(self) -> str:
        return "ready" if self.ready else "starting"

    def start(self):
        """Begin the safe mode: wait for the servers (or the time) to allow serving clients."""
        if self.safe_mode.expected:
            self.log.info("sdbackup-manager starting: waiting for {servers} known servers to "
                          "report", servers=len(self.safe_mode.expected))
        else:
            self.log.info("sdbackup-manager starting with a new catalog: waiting for storage "
                          "servers to report")
        self.check_ready()

    def stop(self):
        for call in (self._safe_mode_call, self._commit_call):
            if call is not None and call.active():
                call.cancel()

    def _db_pending(self, f, *args, **kwargs) -> defer.Deferred:
        """``self.db`` for a catalog write left pending (``commit=False``, a lookup's
        touches): it is committed ``NOTICE_COMMIT_DELAY`` seconds after the first of them."""
        if self._commit_call is None or not self._commit_call.active():
            self._commit_call = self.clock.callLater(NOTICE_COMMIT_DELAY, self._commit_pending)
        return self.db(f, *args, **kwargs)

    def _commit_pending(self):
        d = self.db(self.catalog.commit_pending)
        d.addErrback(lambda f: self.log.failure("committing the pending catalog writes", f))

    def starting_reason(self) -> str:
        if self._leaving is not None:
            return f"the manager is starting: indexing {self.indexer.pending} snapshots"
        return f"the manager is starting: {self.safe_mode.waiting_for()}"

    def check_ready(self):
        """Leave safe mode if the policy allows it now; else look again when time may allow it."""
        if self.ready or self._leaving is not None:
            return
        now = self._now()
        why = self.safe_mode.ready_reason(now)
        if why is None:
            later = self.safe_mode.next_check(now)
            if self._safe_mode_call is not None and self._safe_mode_call.active():
                self._safe_mode_call.cancel()
            if later is not None:
                # (A millisecond more: a call on time must not find the time a hair short.)
                self._safe_mode_call = self.clock.callLater(later - now + 0.001, self.check_ready)
            return
        self._leaving = defer.ensureDeferred(self._leave_safe_mode(why))
        self._leaving.addErrback(lambda f: self.log.failure("leaving safe mode", f))

    async def _leave_safe_mode(self, why: str):
        # Every snapshot the servers reported is listed before the first client asks.
        await self.indexer.idle()
        count = await self.db(self.catalog.snapshot_count)
        self.ready = True
        self.stop()
        self.log.info("sdbackup-manager ready: {servers} servers reported, {snapshots} snapshots "
                      "indexed ({why})", servers=len(self.safe_mode.reported), snapshots=count,
                      why=why)
        self.repair.soon()

    # --- storage servers ---------------------------------------------------

    async def handle_RegisterServer(self, msg, connection):
        if not msg.address:
            raise RemoteError("a server must give the address clients reach it at", "bad-request")
        old = self.live.get(msg.address)
        if (old is not None and old.connection is not connection
                and old.connection.peer_identity != connection.peer_identity):
            # Under TLS: a live server's address is its certificate's until it is gone.
            self.log.warn("refused registration of {address} by {peer}: a live server holds it "
                          "under another certificate", address=msg.address,
                          peer=connection.describe_peer())
            raise RemoteError(f"{msg.address} is held by a live server with another certificate",
                              "forbidden")
        await self.server_admin.check_registration(msg, old, connection)
        if old is not None and old.connection is not connection:
            self.log.warn("server {address} registered again; dropping its old link",
                          address=msg.address)
            old.connection.transport.loseConnection()
        self.live[msg.address] = LiveServer(
            msg.address, connection, msg.free_bytes, msg.chunk_count, self._now(),
            total_bytes=msg.total_bytes, disk_id=msg.disk_id, full=msg.full,
        )
        self.safe_mode.server_registered(msg.address, self._now())
        await self.db(self.catalog.begin_report, msg.address)
        await self.db(self.catalog.record_server, msg.address, msg.free_bytes, msg.chunk_count,
                      self._now(), msg.disk_id)
        await self.server_admin.adopt_disk(msg)
        self.log.info("server {address} registered: {chunks} chunks, {free} bytes free",
                      address=msg.address, chunks=msg.chunk_count, free=msg.free_bytes)
        return Registered(request_id=msg.request_id, ticket_keys=self.tickets.valid(self._now()))

    def rotate_ticket_keys(self):
        """Sign with a new key when the current one has signed long enough, and tell every live
        server the keys valid now (the older ones until the tickets they signed expire)."""
        if not self.tickets.rotate(self._now()):
            return
        keys = TicketKeys(ticket_keys=[key for key, _ in self.tickets.keys])
        for server in list(self.live.values()):
            d = server.connection.request(keys, SYNC_TIMEOUT, self.clock)
            d.addErrback(lambda f, address=server.address: self.log.warn(
                "server {address} did not take the new ticket keys: {why}", address=address,
                why=shorten(f.getErrorMessage())))

    async def handle_ChunkInventory(self, msg, connection):
        server = self._server_of(connection)
        server.reporting = True
        server.reported_chunks += len(msg.chunks)
        server.reported_snapshots += len(msg.snapshots)
        await self.db(self.catalog.report_page, server.address,
                      [(c.chunk_id, c.size) for c in msg.chunks], msg.final, self._now())
        await self.indexer.learn(msg.snapshots, server)
        if msg.final:
            self.log.info("server {address} reported {count} chunks, {snapshots} of them "
                          "snapshots", address=server.address, count=server.reported_chunks,
                          snapshots=server.reported_snapshots)
            self.safe_mode.server_reported(server.address, server.reported_chunks)
            server.reporting = False
            server.reported_chunks = server.reported_snapshots = 0
            self.repair.soon()
            self.check_ready()
        return Ack(request_id=msg.request_id)

    async def handle_ChunksAdded(self, msg, connection):
        server = self._server_of(connection)
        # The write is queued on the catalog thread before anything else happens here: a
        # commit that asked SyncNotices reads the catalog after it (one thread, in order).
        await self._db_pending(self.catalog.add_locations, server.address,
                               [(c.chunk_id, c.size) for c in msg.chunks], server.reporting,
                               self._now(), commit=False)
        self.repair.chunks_added()  # maybe stored with fewer copies than wanted
        await self.indexer.learn(msg.snapshots, server, stored_now=True)

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
        server.total_bytes = msg.total_bytes
        server.scrub_done, server.scrub_total = msg.scrub_done, msg.scrub_total
        if msg.full != server.full:
            server.full = msg.full
            self.log.warn("server {address} is {state}: {free} bytes free", address=server.address,
                          state="full: nothing more is placed on it" if msg.full else "no longer full",
                          free=msg.free_bytes)
        server.last_seen = self._now()
        return self._db_pending(self.catalog.record_server, server.address, msg.free_bytes,
                                msg.chunk_count, server.last_seen, commit=False)

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
        self.safe_mode.server_lost(server.address)
        self.log.warn("server {address} declared dead: {why}", address=server.address, why=why)
        server.connection.transport.abortConnection()
        self.repair.soon()
        self.check_ready()

    def loads(self, excluding=()) -> list[ServerLoad]:
        """What placement needs to know of the live servers that may take chunks (neither full
        nor draining), but those in ``excluding``."""
        return [ServerLoad(s.address, s.free_bytes, s.assigned) for s in self.live.values()
                if s.address not in excluding and not s.full and s.address not in self.draining]

    def check_liveness(self):
        """Declare dead every server silent for longer than ``dead_after`` seconds."""
        now = self._now()
        for server in list(self.live.values()):
            if now - server.last_seen > self.dead_after:
                self._declare_dead(server, f"no heartbeat for {now - server.last_seen:.1f} s")

    # --- backups -------------------------------------------------------------

    @when_ready
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
        assignments, chains = {}, {}
        if wanted:
            assignments = place_runs(loads, list(wanted.items()), count)
            for chunk_id, servers in assignments.items():
                for address in servers:
                    self.live[address].assigned += wanted[chunk_id]
                chains.setdefault(tuple(servers), []).append(chunk_id)
        now = self._now()
        return Placement(request_id=msg.request_id, known=known, assignments=assignments,
                         replicas=self.replicas,
                         tickets=[self.tickets.issue(ids, list(chain), now)
                                  for chain, ids in chains.items()])

    @when_ready
    async def handle_HasChunks(self, msg, connection):
        return ChunksHeld(request_id=msg.request_id, chunk_ids=await self._held(msg.chunk_ids))

    async def _held(self, chunk_ids: list[str]) -> list[str]:
        """The chunks among ``chunk_ids`` with a copy on a live server, in the same order;
        touched, since the client counts on them now (a prune spares them)."""
        holders = await self._db_pending(self.catalog.held_touching, chunk_ids, self._now(),
                                         self._touch_slack())
        return [c for c in chunk_ids if any(h in self.live for h in holders.get(c, ()))]

    @when_ready
    async def handle_CommitSnapshot(self, msg, connection):
        """List a stored snapshot: every server first tells what it stored (so the index has
        every copy from the servers themselves), then the object is read, verified, indexed."""
        await self._sync_notices()
        summary = await self.indexer.ensure(msg.snapshot_id)
        await self.pruner.verify_commit(summary)  # refused if a prune took what it counted on
        await self.db(self.catalog.commit_pending)  # the copies its backup stored, durable
        self.log.info("snapshot {snapshot} committed: {host}, {files} files, {size} bytes",
                      snapshot=summary.snapshot_id[:16], host=summary.host, files=summary.files,
                      size=summary.bytes)
        return SnapshotCommitted(request_id=msg.request_id, snapshot=summary)

    @when_ready
    async def handle_ReplaceSnapshot(self, msg, connection):
        """A client's ``tag``: list the stored snapshot instead of the one it replaces, in one
        catalog transaction, if both hold the same content (root tree, host, paths); the old
        object is deleted on every server and remembered as forgotten."""
        await self._sync_notices()
        old = await self.db(self.catalog.snapshot, msg.replaces)
        if old is None:
            listed = await self.db(self.catalog.snapshot, msg.snapshot_id)
            if listed is not None:  # replaced already: the indexer read the new one first
                return SnapshotCommitted(request_id=msg.request_id, snapshot=listed)
            raise RemoteError(f"snapshot {msg.replaces[:16]} is not listed", "unknown-snapshot")
        read = await self.indexer.read(msg.snapshot_id)
        if not isinstance(read, tuple):  # a key object's id, not a snapshot's
            raise RemoteError(f"{msg.snapshot_id[:16]} is not a snapshot", "bad-request")
        summary, _ = read
        if not same_content(old, summary):
            raise RemoteError(f"snapshot {msg.snapshot_id[:16]} does not hold what "
                              f"{msg.replaces[:16]} holds (root tree, host and paths): a tag "
                              "change cannot replace it", "bad-request")
        await self.indexer.replace(summary, msg.replaces)
        self.log.info("snapshot {snapshot} retagged as {replacement} by {peer}",
                      snapshot=msg.replaces[:16], replacement=msg.snapshot_id[:16],
                      peer=connection.describe_peer())
        return SnapshotCommitted(request_id=msg.request_id, snapshot=summary)

    async def _sync_notices(self):
        """Ask every live server to send its pending ChunksAdded; a failing one is skipped."""
        servers = list(self.live.values())
        replies = await defer.DeferredList(
            [s.connection.request(SyncNotices(), SYNC_TIMEOUT, self.clock) for s in servers],
            consumeErrors=True)
        for server, (ok, result) in zip(servers, replies, strict=True):
            if not ok:
                self.log.warn("server {address} did not sync its notices: {why}",
                              address=server.address, why=shorten(result.getErrorMessage()))

    # --- forgetting ---------------------------------------------------------------

    @when_ready
    async def handle_ForgetSnapshots(self, msg, connection):
        """Unlist snapshots (an admin's ``forget``) and have every live server delete their
        objects, so no index rebuild lists them again; a server down now deletes them when it
        reports them (the catalog remembers them as forgotten). What they reference stays
        until a prune."""
        forgotten = await self.db(self.catalog.forget_snapshots, msg.snapshot_ids, self._now())
        if forgotten:
            servers = list(self.live.values())
            replies = await defer.DeferredList(
                [s.connection.request(DeleteSnapshots(snapshot_ids=forgotten), DELETE_TIMEOUT,
                                      self.clock) for s in servers], consumeErrors=True)
            for server, (ok, result) in zip(servers, replies, strict=True):
                if not ok:
                    self.log.warn("server {address} did not delete forgotten snapshots ({why}): "
                                  "it is told again when it reports them",
                                  address=server.address, why=shorten(result.getErrorMessage()))
            self.log.info("{count} snapshots forgotten by {peer}", count=len(forgotten),
                          peer=connection.describe_peer())
        return SnapshotsForgotten(request_id=msg.request_id, snapshot_ids=forgotten)

    # --- servers: list, drain, retire (``drain``) ---------------------------------------

    async def handle_ListServers(self, msg, connection):
        return await self.server_admin.list(msg)

    @when_ready
    async def handle_DrainServer(self, msg, connection):
        return await self.server_admin.drain(msg, connection.describe_peer())

    @when_ready
    async def handle_RetireServer(self, msg, connection):
        return await self.server_admin.retire(msg, connection.describe_peer())

    # --- encrypted repositories' key objects (``sdbackup.sealing``) -----------------------

    @when_ready
    async def handle_ListKeys(self, msg, connection):
        keys = sorted(k for k, repo in self.indexer.keys.items()
                      if repo == msg.repo and k not in self.indexer.uncommitted_keys)
        return KeyList(request_id=msg.request_id, key_ids=keys[:MAX_KEYS])

    @when_ready
    async def handle_CommitKey(self, msg, connection):
        """List a key object a client stored: read from a server and checked, as a snapshot.
        A repository's ``first`` key is refused, and removed, when the repository has another
        committed key already: of two clients that ran ``init`` at once, the first to commit
        gets the repository, the other an error; never two master keys."""
        await self._sync_notices()
        repo = await self.indexer.ensure_key(msg.key_id)
        uncommitted = self.indexer.uncommitted_keys
        others = [k for k, r in self.indexer.keys.items()
                  if r == repo and k != msg.key_id and k not in uncommitted]
        if msg.first and others:
            await self._remove_key(msg.key_id)
            raise KeyRefused(f"repository {repo} was initialised meanwhile by another client "
                             f"(key {others[0][:16]})")
        uncommitted.discard(msg.key_id)
        self.log.info("key {key} of repository {repo} committed by {peer}", key=msg.key_id[:16],
                      repo=repo, peer=connection.describe_peer())
        return KeyCommitted(request_id=msg.request_id, key_id=msg.key_id, repo=repo)

    @when_ready
    async def handle_RemoveKey(self, msg, connection):
        """Unlist a key object and delete it on every live server (one down now is told when
        it reports it); never a repository's last key."""
        keys = self.indexer.keys
        repo = keys.get(msg.key_id)
        if repo is None:
            raise KeyRefused(f"no key {msg.key_id[:16]}")
        if sum(1 for r in keys.values() if r == repo) < 2:
            raise KeyRefused(f"key {msg.key_id[:16]} is the last key of repository {repo}")
        await self._remove_key(msg.key_id)
        self.log.info("key {key} of repository {repo} removed by {peer}", key=msg.key_id[:16],
                      repo=repo, peer=connection.describe_peer())
        return Ack(request_id=msg.request_id)

    async def _remove_key(self, key_id: str):
        """Unlist a key object, remember it as forgotten (a server down now deletes it when it
        reports it, across restarts), and have every live server delete it."""
        self.indexer.keys.pop(key_id, None)
        self.indexer.uncommitted_keys.discard(key_id)
        await self.db(self.catalog.forget_key, key_id, self._now())
        servers = list(self.live.values())
        replies = await defer.DeferredList(
            [s.connection.request(DeleteSnapshots(snapshot_ids=[key_id]), DELETE_TIMEOUT,
                                  self.clock) for s in servers], consumeErrors=True)
        for server, (ok, result) in zip(servers, replies, strict=True):
            if not ok:
                self.log.warn("server {address} did not delete a removed key ({why})",
                              address=server.address, why=shorten(result.getErrorMessage()))

    # --- pruning ---------------------------------------------------------------------

    @when_ready
    def handle_PruneRequest(self, msg, connection):
        """An admin's ``prune``: started here, followed with PruneStatusRequest."""
        run = self.pruner.start(msg.dry_run, connection.describe_peer())
        return run.status(msg.request_id, self._now())

    @when_ready
    def handle_PruneStatusRequest(self, msg, connection):
        if self.pruner.current is None:
            raise RemoteError("no prune has run since the manager started", "no-prune")
        return self.pruner.current.status(msg.request_id, self._now())

    # --- reading ---------------------------------------------------------------

    @when_ready
    async def handle_ListSnapshots(self, msg, connection):
        """A page of snapshots (one more is read than fits, to know whether more follow)."""
        after = (msg.after_time, msg.after_id) if msg.after_id else None
        found = await self.db(self.catalog.snapshot_page, after, msg.limit + 1, msg.repo)
        return SnapshotList.filled(msg.request_id, found, msg.limit)

    @when_ready
    async def handle_Locate(self, msg, connection):
        # (Touched: a backup reads its parent's trees, and counts on those unchanged.)
        holders = await self._db_pending(self.catalog.held_touching, msg.chunk_ids, self._now(),
                                         self._touch_slack())
        return Locations(request_id=msg.request_id, holders=self._live_holders(holders))

    def _live_holders(self, holders: dict[str, list[str]]) -> dict[str, list[str]]:
        """The live holders of each chunk; all of them when none is live (one may be back)."""
        return {
            chunk_id: ([s for s in servers if s in self.live] or servers)[:MAX_REPLICAS]
            for chunk_id, servers in holders.items()
        }

    async def handle_StatusRequest(self, msg, connection):
        alive = set(self.live)
        known = await self.db(self.catalog.servers)
        chunks, under, missing = await self.db(self.catalog.chunk_stats, alive, self.replicas)
        snapshots = await self.db(self.catalog.snapshot_count)
        states = []
        for address, last_seen, free_bytes, chunk_count in known:
            live = self.live.get(address)
            if live is not None:
                free_bytes, chunk_count, last_seen = (live.free_bytes, live.chunk_count,
                                                      live.last_seen)
            states.append(ServerState(address, live is not None, free_bytes, chunk_count,
                                      last_seen))
        if len(states) > MAX_SERVERS:  # more than a reply may carry: keep the live ones
            states.sort(key=lambda state: not state.alive)
        return ClusterStatus(request_id=msg.request_id, state=self.state, replicas=self.replicas,
                             servers=states[:MAX_SERVERS], snapshots=snapshots, chunks=chunks,
                             under_replicated=under, missing=missing)

    @when_ready
    async def handle_CheckRequest(self, msg, connection):
        """Have every live server verify (and with ``read_data`` re-hash) what it holds and
        report it again, then walk every snapshot's objects for what has no live copy."""
        if not msg.read_data:
            return await self._check(msg)
        self._may_read_data()
        self._read_data_running = True
        try:
            return await self._check(msg)
        finally:
            self._read_data_running = False
            self._read_data_ended = self._now()

    def _may_read_data(self):
        """Refuse a ``check --read-data`` while one runs, or too soon after the last."""
        if self._read_data_running:
            raise RemoteError("a check --read-data is under way: wait for it to end", "busy")
        if self._read_data_ended is not None:
            wait = self._read_data_ended + self.read_data_interval - self._now()
            if wait > 0:
                raise RemoteError(
                    f"the last check --read-data ended {self._now() - self._read_data_ended:.0f} s "
                    f"ago: the next may start in {wait:.0f} s (the manager's "
                    f"--read-data-interval)", "too-soon")

    async def _check(self, msg):
        servers = list(self.live.values())
        begun = []
        for server in servers:
            if not server.reporting:  # (one reporting already finishes before it reports again)
                await self.db(self.catalog.begin_report, server.address)
                server.reporting = True
                begun.append(server)
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
                if server in begun:
                    server.reporting = False
        walk = await DagCheck(self).run(await self.db(self.catalog.snapshots))
        chunks, under, _ = await self.db(self.catalog.chunk_stats, set(self.live), self.replicas)
        self.repair.soon()
        return CheckReport(request_id=msg.request_id, servers_checked=checked,
                           servers_unreachable=unreachable, chunks=chunks,
                           missing=len(walk.missing), under_replicated=under, corrupt=corrupt,
                           snapshots=walk.snapshots, trees=walk.trees, damaged=walk.damaged)


class ManagerService(NodeService):
    """The manager process: a listener, the catalog and its thread, liveness and repair."""

    name_for_logs = "sdbackup-manager"

    def __init__(self, listen: str, data: str, replicas: int = DEFAULT_REPLICAS,
                 dead_after: float = 15.0,
                 repair_interval: float = 5.0, repair_rate: float = 50 * MiB,
                 safe_mode_timeout: float = 30.0, safe_mode_settle: float = 3.0, reactor=None,
                 metrics: str | None = None, web: str | None = None,
                 web_password_file: str | None = None, history_interval: float = 30.0,
                 transport: Transport | None = None, ticket_lifetime: float = DEFAULT_LIFETIME,
                 ticket_key_interval: float = DEFAULT_KEY_INTERVAL,
                 prune_grace: float = DEFAULT_GRACE, prune_rate: float = DEFAULT_RATE,
                 read_data_interval: float = READ_DATA_INTERVAL):
        # One catalog thread: SQLite calls are serialised, never on the reactor.
        super().__init__(listen, "sdbackup-catalog", 1, reactor, transport)
        self.data = data
        self.replicas = replicas
        self.dead_after = dead_after
        self.repair_interval = repair_interval
        self.repair_rate = repair_rate
        self.safe_mode_timeout = safe_mode_timeout
        self.safe_mode_settle = safe_mode_settle
        self.ticket_lifetime = ticket_lifetime
        self.ticket_key_interval = ticket_key_interval
        self.prune_grace = prune_grace
        self.prune_rate = prune_rate
        self.read_data_interval = read_data_interval
        self.manager: Manager | None = None
        #: ``--metrics`` and ``--web``: refuses a forbidden address here, before starting.
        self.monitor = ManagerMonitor(self, metrics, web, web_password_file, history_interval)

    def startService(self):
        super().startService()
        # Opening is quick (a schema check, a rename at most) and must precede everything.
        catalog = Catalog(os.path.join(self.data, "catalog.sqlite"))
        self.manager = Manager(catalog, self.run_in_pool, self.reactor, self.replicas,
                               self.dead_after, self.repair_rate,
                               expected_servers=catalog.server_addresses(),
                               safe_mode_timeout=self.safe_mode_timeout,
                               safe_mode_settle=self.safe_mode_settle,
                               ticket_lifetime=self.ticket_lifetime,
                               ticket_key_interval=self.ticket_key_interval,
                               prune_grace=self.prune_grace, prune_rate=self.prune_rate,
                               read_data_interval=self.read_data_interval)
        self.manager.draining = catalog.draining_servers()
        self.every(max(self.dead_after / 4, 0.05), self.manager.check_liveness, "liveness")
        self.every(min(self.ticket_key_interval / 10, 60.0), self.manager.rotate_ticket_keys,
                   "ticket keys")
        self.every(self.repair_interval, self.manager.repair.tick, "repair")
        self.listen(self.manager, "manager")
        self.monitor.start()

    def listened(self, port):
        self.log.info("sdbackup-manager listening on port {port}, catalog in {data}, "
                      "replication factor {replicas}",
                      port=port.getHost().port, data=self.data, replicas=self.replicas)
        self.manager.start()

    async def stopping(self):
        await self.monitor.stop()
        self.manager.stop()
        close_all(self.manager.connections)

    def stopped(self):
        self.manager.catalog.close()
