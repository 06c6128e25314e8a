"""A storage server: verified chunk files, replication, scrubbing, and its link to the manager.

``StorageServer`` answers StoreChunk(s) and FetchChunk from clients and other
servers, and ReplicateChunk, VerifyChunks, SyncNotices, DeleteSnapshots, DeleteChunks
(a prune) and FetchChunk from the manager. A chunk (file data, or a tree, chunk list or snapshot object: its
``kind`` travels with it) is stored and verified on this server's disk, then
forwarded to the next server the manager named, only under the placement's
ticket the manager signed (``sdbackup.tickets``); the client hears
``ChunkStored`` only once every server in the chain confirmed the same
checksum. The manager hears of every chunk stored here (``ChunksAdded``, with
sizes and which are snapshots), from the server itself, never from a client.
A bad copy, found by a read or by the background scrub, is quarantined and
reported, so the manager repairs it from a good copy. ``StorageService`` wires
it to a listening endpoint, the manager link (``ClientService``, reconnecting
with backoff), the heartbeat, the scrub and the disk thread pool.
"""

import errno
import random

from twisted.application import internet
from twisted.internet import defer, error, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from sdbackup.memory import limit_arenas
from sdbackup.metrics import ServerMetrics
from sdbackup.protocols.messages import (
    FETCH_REPLY_BYTES,
    MAX_CHUNK_SIZE,
    Ack,
    ChunkData,
    ChunkInventory,
    ChunkRef,
    ChunksAdded,
    ChunksCorrupt,
    ChunksData,
    ChunksDeleted,
    ChunksStored,
    ChunkStored,
    Heartbeat,
    HeldChunk,
    Message,
    RegisterServer,
    StoreChunk,
    StoreChunks,
    VerifyReport,
)
from sdbackup.protocols.peer import ConnectionRefusedByPeer, MessageProtocol, PeerPool, RemoteError
from sdbackup.services.chunkstore import ROOT_KINDS, ChunkCorrupt, ChunkMissing, ChunkStore, DiskFull
from sdbackup.services.node import NodeService, close_all
from sdbackup.tickets import refusal
from sdbackup.tlsconfig import Transport

#: Stores one connection may have under way before the server stops reading from it.
MAX_STORES_PER_CONNECTION = 8
#: Fetches one connection may have under way before the server stops reading from it.
MAX_FETCHES_PER_CONNECTION = 4
#: Seconds a primary waits for its replica's confirmation.
FORWARD_TIMEOUT = 60.0
#: Chunks per inventory or notice page: about 160 KB of JSON for ``[id, size]`` pairs, plus
#: as much again at most for the snapshot ids among them. The whole listing in memory and
#: pages of 40,000 took a server re-registering 60,000 chunks to 111 MiB; read and sent a
#: page at a time, pages of 10,000 to 102 MiB, and of 2,000 to 98 MiB (95 MiB serving).
INVENTORY_PAGE = 2_000
#: Seconds new chunk ids are gathered before the manager is told of them, unless a page of
#: them gathers sooner. Each notice is a catalog transaction, and its cost is the B-tree pages
#: it rewrites: ids are random, so a notice of a few hundred chunks rewrites a page for nearly
#: every one. With notices every 0.2 s, a first backup of 50,000 files (575 MiB) had the
#: manager write 1.6 GB to its catalog, in 3.7 s of CPU; with notices of a page, 0.8 GB in
#: 2.8 s.
NOTIFY_DELAY = 1.0
MiB = 1024 * 1024
#: ``--reserve`` when not given: room for the stores already under way (a few packs of up to
#: 8 MiB per connection), and for the logs and whatever else shares the file system.
DEFAULT_RESERVE = 1024 * MiB
#: After a write ran out of space, free bytes beyond the reserve before stores are taken again.
FULL_MARGIN = 64 * MiB


class StorageServer:
    """Handles the messages of one chunk store. ``tell_manager`` sends one-way notices."""

    log = Logger()

    def __init__(self, store: ChunkStore, run_on_disk, peers: PeerPool, clock, address: str = ""):
        self.store = store
        self.disk = run_on_disk
        self.peers = peers
        self.clock = clock
        self.address = address
        self.manager: MessageProtocol | None = None
        #: The keys the manager signs placement tickets with (given when this server registers).
        self.ticket_keys: dict = {}
        self._stores_in_flight: dict[MessageProtocol, int] = {}
        self._fetch_gates: dict[MessageProtocol, _FetchGate] = {}
        #: Chunk bytes read for fetches since the start (what the disks served to readers).
        self.bytes_served = 0
        #: Bytes re-read and re-hashed by scrubs since the start, and the pass under way:
        #: chunks checked out of the chunks listed when it began (0 of 0 between passes).
        self.scrubbed_bytes = 0
        self.scrub_done = self.scrub_total = 0
        self.connections: set[MessageProtocol] = set()  # closed when the service stops
        # News for the manager not sent yet, in order: id -> (size, is a snapshot) for added
        # chunks, id -> None for corrupt ones.
        self._added: dict[str, tuple[int, bool]] = {}
        self._corrupt: dict[str, None] = {}
        self._flush_call = None
        #: Free bytes to keep (``--reserve``): below it the server is full and refuses stores.
        self.reserve = 0
        #: A write ran out of space: full until ``FULL_MARGIN`` more than the reserve is free.
        self._ran_out = False
        self._full = False

    # --- storing ---------------------------------------------------------------

    async def handle_StoreChunk(self, msg, connection):
        self._check_ticket(msg.ticket, [msg.chunk_id], msg.forward_to)
        self._started(connection)
        try:
            chunks = [(msg.chunk_id, msg.checksum, msg.payload)]
            holders = [self.address]
            if msg.forward_to:
                holders += await self._write_and_forward(msg.kind, chunks, lambda: self._forward(
                    msg.kind, msg.chunk_id, msg.checksum, msg.payload, msg.forward_to, msg.ticket))
            else:
                await self._write(msg.kind, chunks)
            return ChunkStored(request_id=msg.request_id, chunk_id=msg.chunk_id,
                               checksum=msg.checksum, holders=holders)
        finally:
            self._finished(connection)

    async def handle_StoreChunks(self, msg, connection):
        self._check_ticket(msg.ticket, [ref.chunk_id for ref in msg.chunks], msg.forward_to)
        self._started(connection)
        try:
            chunks = [(ref.chunk_id, ref.checksum, piece) for ref, piece in msg.pieces()]
            holders = [self.address]
            if msg.forward_to:
                following = msg.forward_to[0]
                reply = await self._write_and_forward(msg.kind, chunks, lambda: self._ask_next(
                    following, StoreChunks(chunks=msg.chunks, forward_to=msg.forward_to[1:],
                                           kind=msg.kind, ticket=msg.ticket, payload=msg.payload)))
                if reply.chunk_ids != [ref.chunk_id for ref in msg.chunks]:
                    raise RemoteError(f"replica {following} confirmed other chunks",
                                      "replication-failed", following)
                holders += reply.holders
            else:
                await self._write(msg.kind, chunks)
            return ChunksStored(request_id=msg.request_id,
                                chunk_ids=[ref.chunk_id for ref in msg.chunks], holders=holders)
        finally:
            self._finished(connection)

    def _check_ticket(self, ticket, chunk_ids: list[str], forward_to: list[str]):
        """Refuse a store (or a copy) that no valid ticket of the manager allows here, before
        anything is written or any connection made: ``forward_to`` must be the ticket's chain
        after this server, so bytes go only where the manager placed them."""
        refused = refusal(ticket, self.ticket_keys, self.clock.seconds(), chunk_ids,
                          self.address, forward_to)
        if refused is not None:
            code, reason = refused
            raise RemoteError(f"{self.address} refused the store: {reason}", code)

    def _started(self, connection):
        count = self._stores_in_flight.get(connection, 0) + 1
        self._stores_in_flight[connection] = count
        if count == MAX_STORES_PER_CONNECTION:
            # Backpressure: a slow disk or replica stops us reading from the sender.
            connection.pauseProducing()

    def _finished(self, connection):
        count = self._stores_in_flight.pop(connection, 0) - 1
        if count > 0:
            self._stores_in_flight[connection] = count
        if count == MAX_STORES_PER_CONNECTION - 1 and connection.connected:
            connection.resumeProducing()

    async def _write_and_forward(self, kind: str, chunks: list[tuple[str, str, bytes]], forward):
        """Verify ``chunks``, then store them here while ``forward()`` sends them on along the
        chain; what ``forward`` gave, once both are done. Nothing unverified goes on, and the
        chain's copies are made durable side by side, not one after the other (each waits on
        its disk's sync)."""
        await self.disk(self.store.verify_many, kind, chunks)
        outcomes = await defer.DeferredList(
            [defer.ensureDeferred(self._write(kind, chunks, verified=True)),
             defer.ensureDeferred(forward())], consumeErrors=True)
        for succeeded, outcome in outcomes:
            if not succeeded:
                outcome.raiseException()  # this server's failure first, then the chain's
        return outcomes[1][1]

    async def _write(self, kind: str, chunks: list[tuple[str, str, bytes]], verified=False):
        """Verify (unless ``verified``) and store chunks in the disk pool; tell the manager of
        the new ones."""
        try:
            added = await self.disk(self.store.put_verified if verified else self.store.put_many,
                                    kind, chunks)
        except DiskFull as e:
            self._now_full(str(e))
            raise RemoteError(f"{self.address} refused chunks: {e}", e.code) from e
        except OSError as e:
            if e.errno != errno.ENOSPC:
                self.log.error("cannot store chunks: {error}", error=e)
                raise RemoteError(f"{self.address} cannot store chunks: {e.strerror}",
                                  "io-error") from e
            # The store removed what it had begun to write; what it held is untouched.
            self._ran_out = True
            self._now_full(f"the disk ran out of space ({e.strerror})")
            raise RemoteError(f"{self.address} cannot store chunks: the disk is full",
                              "disk-full") from e
        for chunk_id, size in added:
            self._notify(self._added, chunk_id, (size, kind in ROOT_KINDS))

    async def _forward(self, kind: str, chunk_id: str, checksum: str, payload: bytes,
                       forward_to: list[str], ticket) -> list[str]:
        """Send a chunk along the chain, under its ticket; the servers that confirmed it."""
        following = forward_to[0]
        reply = await self._ask_next(following, StoreChunk(
            chunk_id=chunk_id, checksum=checksum, forward_to=forward_to[1:], kind=kind,
            ticket=ticket, payload=payload))
        if reply.checksum != checksum or reply.chunk_id != chunk_id:
            raise RemoteError(f"replica {following} confirmed a different chunk",
                              "replication-failed", following)
        return reply.holders

    async def _ask_next(self, following: str, msg: Message) -> Message:
        """A request to the next server of a chain; its failure names the server at fault."""
        try:
            return await self.peers.request(following, msg)
        except RemoteError as e:
            raise RemoteError(f"replica {following} refused the chunk: {e.reason}",
                              "replication-failed", e.culprit or following) from e
        except Exception as e:
            raise RemoteError(f"replica {following} unreachable: {e}", "replication-failed",
                              following) from e

    # --- a full disk -------------------------------------------------------------------

    def disk_state(self) -> dict:
        """Free and total bytes of the data folder's file system, and whether it is full."""
        free, total = self.store.disk_space()
        if self._ran_out and free >= self.reserve + FULL_MARGIN:
            self._ran_out = False
        full = free < self.reserve or self._ran_out
        if full != self._full:
            self._full = full
            if full:
                self.log.warn("the disk is full: {free} bytes free, {reserve} kept in reserve; "
                              "refusing stores until there is room", free=free,
                              reserve=self.reserve)
            else:
                self.log.info("the disk has room again: {free} bytes free", free=free)
        return {"free_bytes": free, "total_bytes": total, "full": full}

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(chunk_count=self.store.count(), scrub_done=self.scrub_done,
                         scrub_total=self.scrub_total, **self.disk_state())

    def _now_full(self, why: str):
        """A store was refused for want of space: the manager hears it now, not at the next
        heartbeat, and places the rest elsewhere."""
        self.log.warn("refused a store: {why}", why=why)
        self.tell_manager(self.heartbeat())

    # --- reading -----------------------------------------------------------------

    async def _read(self, chunk_id: str) -> tuple[str, str, bytes]:
        """A verified copy: kind, checksum, payload. A bad one is quarantined by the store and
        reported here."""
        try:
            return await self.disk(self.store.get, chunk_id)
        except ChunkCorrupt:
            self.log.warn("chunk {chunk} is corrupt: quarantined", chunk=chunk_id)
            self._notify(self._corrupt, chunk_id, None)
            raise

    async def handle_FetchChunk(self, msg, connection):
        gate = self._fetch_gate(connection)
        gate.started()
        try:
            kind, checksum, payload = await self._read(msg.chunk_id)
        finally:
            gate.finished()
        self.bytes_served += len(payload)
        return ChunkData(request_id=msg.request_id, chunk_id=msg.chunk_id, checksum=checksum,
                         kind=kind, payload=payload)

    async def handle_FetchChunks(self, msg, connection):
        """Many chunks read in one disk thread hop, as many as fit in one reply; each one
        missing or corrupt here is named, so the client asks another holder for just those."""
        gate = self._fetch_gate(connection)
        gate.started()
        try:
            found = await self.disk(self.store.get_many, msg.chunk_ids, FETCH_REPLY_BYTES)
        finally:
            gate.finished()
        chunks, payloads, missing, corrupt = [], [], [], []
        for chunk_id, outcome in found:
            if isinstance(outcome, ChunkCorrupt):
                self.log.warn("chunk {chunk} is corrupt: quarantined", chunk=chunk_id)
                self._notify(self._corrupt, chunk_id, None)
                corrupt.append(chunk_id)
            elif isinstance(outcome, ChunkMissing):
                missing.append(chunk_id)
            else:
                _, checksum, payload = outcome
                chunks.append(ChunkRef(chunk_id, len(payload), checksum))
                payloads.append(payload)
        payload = b"".join(payloads)
        self.bytes_served += len(payload)
        return ChunksData(request_id=msg.request_id, chunks=chunks, missing=missing, corrupt=corrupt,
                          payload=payload)

    def _fetch_gate(self, connection) -> "_FetchGate":
        gate = self._fetch_gates.get(connection)
        if gate is None:
            gate = self._fetch_gates[connection] = _FetchGate(connection)
        return gate

    async def handle_ReplicateChunk(self, msg, connection):
        """Re-replication: copy a chunk held here, as the kind it is, to the servers the
        manager named in the order's ticket."""
        self._check_ticket(msg.ticket, [msg.chunk_id], msg.forward_to)
        if not msg.forward_to:
            raise RemoteError("a copy needs a server to go to", "bad-request")
        kind, checksum, payload = await self._read(msg.chunk_id)
        holders = await self._forward(kind, msg.chunk_id, checksum, payload, msg.forward_to,
                                      msg.ticket)
        return ChunkStored(request_id=msg.request_id, chunk_id=msg.chunk_id, checksum=checksum,
                           holders=holders)

    # --- scrubbing -------------------------------------------------------------

    async def scrub(self, rate: float | None = None) -> list[str]:
        """Re-read and re-hash every chunk, at most ``rate`` bytes a second; the bad ones."""
        corrupt = []
        chunk_ids = await self.disk(lambda: list(self.store.chunk_ids()))
        self.scrub_done, self.scrub_total = 0, len(chunk_ids)
        try:
            for chunk_id in chunk_ids:
                self.scrub_done += 1
                try:
                    _, _, payload = await self._read(chunk_id)
                except ChunkCorrupt:
                    corrupt.append(chunk_id)
                    continue
                except ChunkMissing:
                    continue  # deleted or quarantined since the listing
                self.scrubbed_bytes += len(payload)
                if rate:
                    await task.deferLater(self.clock, len(payload) / rate)
        finally:
            self.scrub_done = self.scrub_total = 0
        if corrupt:
            self.log.warn("scrub found {count} corrupt chunks", count=len(corrupt))
        return corrupt

    async def handle_VerifyChunks(self, msg, connection):
        corrupt = await self.scrub() if msg.read_data else []
        await self.send_inventory(connection)
        return VerifyReport(request_id=msg.request_id, held=self.store.count(), corrupt=corrupt)

    # --- forgetting ------------------------------------------------------------------

    async def handle_DeleteSnapshots(self, msg, connection):
        """``forget``: the manager has unlisted these snapshots; their objects go too, or the
        next index rebuild would list them again."""
        deleted = await self.disk(self.store.delete_snapshots, msg.snapshot_ids)
        for snapshot_id in deleted:
            self._added.pop(snapshot_id, None)  # (a notice not sent yet would list it again)
        if deleted:
            self.log.info("deleted {count} forgotten snapshot objects", count=len(deleted))
        return Ack(request_id=msg.request_id)

    async def handle_DeleteChunks(self, msg, connection):
        """A prune: delete chunks no snapshot reaches (or copies above the replication
        factor), on the disk pool; say what went, so the manager's records stay true."""
        deleted, kept = await self.disk(self.store.delete_chunks, msg.chunk_ids, msg.min_age)
        for chunk_id, _ in deleted:
            self._added.pop(chunk_id, None)  # (a notice not sent yet would record it again)
        freed = sum(size for _, size in deleted)
        if deleted:
            self.log.info("prune: deleted {count} chunks, {bytes} bytes", count=len(deleted),
                          bytes=freed)
        return ChunksDeleted(request_id=msg.request_id, chunk_ids=[c for c, _ in deleted],
                             freed_bytes=freed, kept=kept)

    # --- telling the manager -------------------------------------------------------

    async def send_inventory(self, connection: MessageProtocol):
        """Every chunk held here, with sizes, in pages: the manager makes its records match,
        and indexes the snapshot objects among them that it does not know."""
        # The listing below covers the chunks added and quarantined so far; a notice about
        # them sent later could only undo what the manager learns from it.
        self._added.clear()
        self._corrupt.clear()
        pages = self.store.listing_pages(INVENTORY_PAGE)
        page = await self.disk(next, pages, [])
        while True:
            following = await self.disk(next, pages, None)  # is this page the last?
            await connection.request(ChunkInventory(
                chunks=[_held(chunk_id, size) for chunk_id, size, _ in page],
                snapshots=[chunk_id for chunk_id, _, is_snapshot in page if is_snapshot],
                final=following is None))
            if following is None:
                return
            page = following

    def _notify(self, pending: dict, chunk_id: str, news):
        """Tell the manager soon; the latest news of a chunk replaces any not yet sent."""
        self._added.pop(chunk_id, None)
        self._corrupt.pop(chunk_id, None)
        pending[chunk_id] = news
        if len(pending) >= INVENTORY_PAGE:
            self.flush()
        elif self._flush_call is None or not self._flush_call.active():
            self._flush_call = self.clock.callLater(NOTIFY_DELAY, self.flush)

    def flush(self, connection: MessageProtocol | None = None):
        """Send the news gathered so far on ``connection`` (the manager link by default).

        Without a link the news waits: the inventory sent on registering tells the
        manager all of it.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        manager = connection or self.manager
        if manager is None or not manager.connected:
            return
        added, self._added = list(self._added.items()), {}
        corrupt, self._corrupt = list(self._corrupt), {}
        for start in range(0, len(corrupt), INVENTORY_PAGE):
            manager.send(ChunksCorrupt(chunk_ids=corrupt[start : start + INVENTORY_PAGE]))
        for start in range(0, len(added), INVENTORY_PAGE):
            page = added[start : start + INVENTORY_PAGE]
            manager.send(ChunksAdded(
                chunks=[_held(chunk_id, size) for chunk_id, (size, _) in page],
                snapshots=[chunk_id for chunk_id, (_, is_snapshot) in page if is_snapshot]))

    def handle_TicketKeys(self, msg, connection):
        """The manager signs with a new key: these are the keys valid now."""
        self.ticket_keys = {key.key_id: key for key in msg.ticket_keys}
        return Ack(request_id=msg.request_id)

    def handle_SyncNotices(self, msg, connection):
        """Send every notice not sent yet, then answer: the manager reads them first, as they
        travel ahead of the answer on the same link."""
        self.flush(connection)
        return Ack(request_id=msg.request_id)

    def tell_manager(self, msg: Message):
        if self.manager is not None and self.manager.connected:
            self.manager.send(msg)

    def connection_made(self, connection):
        self.connections.add(connection)

    def connection_lost(self, connection):
        self.connections.discard(connection)
        self._stores_in_flight.pop(connection, None)
        self._fetch_gates.pop(connection, None)


class StorageService(NodeService):
    """The storage server process."""

    name_for_logs = "sdbackup-server"

    def __init__(self, listen: str, data: str, manager: str, advertise: str | None = None,
                 heartbeat: float = 5.0, scrub_interval: float = 86400.0,
                 scrub_rate: float = 20 * MiB, reconnect_delay: float = 5.0, reactor=None,
                 metrics: str | None = None, transport: Transport | None = None,
                 reserve: int = DEFAULT_RESERVE):
        super().__init__(listen, "sdbackup-disk", 4, reactor, transport)
        #: ``--reserve``: free bytes no store may take.
        self.reserve = reserve
        self.data = data
        self.manager_description = manager
        self.advertise = advertise
        self.heartbeat_interval = heartbeat
        self.scrub_interval = scrub_interval
        self.scrub_rate = scrub_rate
        #: The longest wait between tries to reach the manager again.
        self.reconnect_delay = reconnect_delay
        self.server: StorageServer | None = None
        self.manager_link: internet.ClientService | None = None
        self._registered = defer.Deferred()
        self._scrubbing: defer.Deferred | None = None
        #: ``--metrics``: Prometheus text on its own listener (None: off).
        self.metrics = None if metrics is None else ServerMetrics(self, metrics)

    def startService(self):
        limit_arenas()  # before the disk threads: two arenas for them all, not one each
        super().startService()
        store = ChunkStore(self.data)
        # Shorter than the client's wait, so the client hears why a replica failed.
        self.peers = PeerPool(self.reactor, None, "server", request_timeout=FORWARD_TIMEOUT,
                              transport=self.transport)
        store.reserve = self.reserve
        self.server = StorageServer(store, self.run_in_pool, self.peers, self.reactor)
        self.server.reserve = self.reserve
        self.listen(self.server, "server")
        if self.metrics is not None:
            self.metrics.start()

    def listened(self, port):
        bound = port.getHost().port
        self.server.address = self.advertise or f"tcp:localhost:{bound}"
        self.log.info("sdbackup-server listening on port {port} as {address}, data in {data}",
                      port=bound, address=self.server.address, data=self.store.root)
        self.manager_link = internet.ClientService(
            self.transport.client_endpoint(self.reactor, self.manager_description,
                                           what="reach the manager at"),
            # The manager asks this server to replicate and to verify: same handler as peers.
            Factory.forProtocol(lambda: self.protocol(self.server, "server", expect=("manager",),
                                                      accepting=False)),
            retryPolicy=internet.backoffPolicy(
                initialDelay=min(1.0, self.reconnect_delay), maxDelay=self.reconnect_delay,
                jitter=lambda: random.random() * min(1.0, self.reconnect_delay)),
            prepareConnection=self._register,
        )
        self.manager_link.setServiceParent(self)
        self.every(self.heartbeat_interval, self._send_heartbeat, "heartbeat")
        self._scrubbing = defer.ensureDeferred(self._scrub_forever())
        self._scrubbing.addErrback(lambda f: f.trap(defer.CancelledError))

    @property
    def store(self) -> ChunkStore:
        return self.server.store

    async def _register_async(self, connection):
        await connection.ready
        registered = await connection.request(RegisterServer(
            address=self.server.address, chunk_count=self.store.count(),
            disk_id=self.store.identity, **self.server.disk_state()))
        self.server.ticket_keys = {key.key_id: key for key in registered.ticket_keys}
        await self.server.send_inventory(connection)
        self.server.manager = connection
        self.server.flush()  # what was stored while the inventory was under way
        self.log.info("sdbackup-server registered with the manager at {manager}",
                      manager=self.manager_description)
        if not self._registered.called:
            self._registered.callback(self.server.address)

    def _register(self, connection):
        """Register on every new link, without holding the ClientService up.

        (Stopping a ClientService while its prepareConnection is still under
        way makes the link's later close an error inside Twisted's state
        machine; the registration runs beside it instead.)
        """
        d = defer.ensureDeferred(self._register_async(connection))
        d.addErrback(self._registration_failed, connection)

    def _registration_failed(self, failure, connection):
        if failure.check(error.ConnectionLost, error.ConnectionDone, TimeoutError):
            self.log.info("lost the manager while registering; will register again")
        elif failure.check(RemoteError, ConnectionRefusedByPeer):
            if getattr(failure.value, "code", "") in ("disk-in-use", "retired"):
                # This disk is counted at another address, or retired: expected, not broken.
                self.log.warn("the manager refused this server: {why}", why=str(failure.value))
                connection.transport.loseConnection()
                return
            # Wrong certificate, CA or role: said once per try, without a traceback.
            self.log.error("the manager refused this server: {why}", why=str(failure.value))
            connection.transport.loseConnection()
        else:
            self.log.failure("registering with the manager", failure)
            connection.transport.loseConnection()

    def when_registered(self) -> defer.Deferred:
        """Fires with this server's address once it first registered with the manager."""
        d = defer.Deferred()
        self._registered.addCallback(lambda address: (d.callback(address), address)[1])
        return d

    def _send_heartbeat(self):
        self.server.tell_manager(self.server.heartbeat())

    async def _scrub_forever(self):
        """Paced scrub passes with ``scrub_interval`` seconds of rest between them."""
        while True:
            await task.deferLater(self.reactor, self.scrub_interval)
            try:
                await self.server.scrub(self.scrub_rate)
            except defer.CancelledError:
                raise
            except Exception:
                self.log.failure("scrub pass failed")

    async def stopping(self):
        if self.metrics is not None:
            await self.metrics.stop()
        if self._scrubbing is not None:
            self._scrubbing.cancel()
        close_all(self.server.connections)
        await self.peers.close()

    def stopped(self):
        self.server.store.close()  # no disk work is left: the thread pool has stopped


class _FetchGate:
    """Stops reading a connection's requests while it has ``MAX_FETCHES_PER_CONNECTION``
    fetches under way, or while the replies already sent are not being read (its transport's
    write buffer is full): a reader that does not read costs the server a bounded amount of
    memory, not a copy of every chunk it asks for.

    It is the transport's (streaming) producer: the transport pauses it when its
    write buffer fills and resumes it once drained.
    """

    def __init__(self, connection: MessageProtocol):
        self.connection = connection
        self.fetching = 0
        self.replies_waiting = False
        self.paused = False
        try:
            connection.transport.registerProducer(self, True)
        except RuntimeError:  # another producer is registered: the count alone bounds fetches
            pass

    def started(self):
        self.fetching += 1
        self._update()

    def finished(self):
        self.fetching -= 1
        self._update()

    # IPushProducer, called by the transport about its write buffer.
    def pauseProducing(self):
        self.replies_waiting = True
        self._update()

    def resumeProducing(self):
        self.replies_waiting = False
        self._update()

    def stopProducing(self):
        self.replies_waiting = False

    def _update(self):
        if not self.connection.connected:
            return
        if self.fetching >= MAX_FETCHES_PER_CONNECTION or self.replies_waiting:
            # Even when paused already: another path may have resumed reading since.
            self.connection.pauseProducing()
            self.paused = True
        elif self.paused:
            self.paused = False
            self.connection.resumeProducing()


def _held(chunk_id: str, size: int) -> HeldChunk:
    # A file larger than any chunk can only be a damaged one: the scrub will find it.
    return HeldChunk(chunk_id, min(size, MAX_CHUNK_SIZE))
