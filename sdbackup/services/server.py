"""A storage server: verified chunk files, replication, and its link to the manager.

``StorageServer`` answers StoreChunk and FetchChunk. A chunk is stored and
verified on this server's disk, then forwarded to the next server the manager
named; the client hears ``ChunkStored`` only once every server in the chain
confirmed the same checksum. ``StorageService`` wires it to a listening
endpoint, the manager link (``ClientService``, reconnecting with backoff), the
heartbeat and the disk thread pool.
"""

import errno

from twisted.application import internet, service
from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from sdbackup.protocols.messages import (
    ChunkData,
    ChunkInventory,
    ChunkStored,
    Heartbeat,
    RegisterServer,
    StoreChunk,
)
from sdbackup.protocols.peer import MessageProtocol, PeerPool, RemoteError
from sdbackup.services.chunkstore import ChunkStore

#: Stores one connection may have under way before the server stops reading from it.
MAX_STORES_PER_CONNECTION = 8
#: Seconds a primary waits for its replica's confirmation.
FORWARD_TIMEOUT = 60.0
#: Chunk ids per inventory page (about 3.3 MB of JSON).
INVENTORY_PAGE = 50_000


class StorageServer:
    """Handles StoreChunk and FetchChunk for one chunk store."""

    log = Logger()

    def __init__(self, store: ChunkStore, run_on_disk, peers: PeerPool, address: str = ""):
        self.store = store
        self.disk = run_on_disk
        self.peers = peers
        self.address = address
        self._stores_in_flight: dict[MessageProtocol, int] = {}

    async def handle_StoreChunk(self, msg, connection):
        self._started(connection)
        try:
            return await self._store_then_forward(msg)
        finally:
            self._finished(connection)

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

    async def _store_then_forward(self, msg):
        try:
            await self.disk(self.store.put, msg.chunk_id, msg.checksum, msg.payload)
        except OSError as e:
            code = "disk-full" if e.errno == errno.ENOSPC else "io-error"
            self.log.error("cannot store chunk {chunk}: {error}", chunk=msg.chunk_id, error=e)
            raise RemoteError(f"{self.address} cannot store chunk: {e.strerror}", code) from e
        holders = [self.address]
        if msg.forward_to:
            following, rest = msg.forward_to[0], msg.forward_to[1:]
            forward = StoreChunk(chunk_id=msg.chunk_id, checksum=msg.checksum, forward_to=rest,
                                 payload=msg.payload)
            try:
                reply = await self.peers.request(following, forward)
            except RemoteError as e:
                raise RemoteError(f"replica {following} refused the chunk: {e.reason}",
                                  "replication-failed") from e
            except Exception as e:
                raise RemoteError(f"replica {following} unreachable: {e}",
                                  "replication-failed") from e
            if reply.checksum != msg.checksum or reply.chunk_id != msg.chunk_id:
                raise RemoteError(f"replica {following} confirmed a different chunk",
                                  "replication-failed")
            holders += reply.holders
        return ChunkStored(request_id=msg.request_id, chunk_id=msg.chunk_id,
                           checksum=msg.checksum, holders=holders)

    async def handle_FetchChunk(self, msg, connection):
        checksum, payload = await self.disk(self.store.get, msg.chunk_id)
        return ChunkData(request_id=msg.request_id, chunk_id=msg.chunk_id, checksum=checksum,
                         payload=payload)

    def connection_lost(self, connection):
        self._stores_in_flight.pop(connection, None)


class _ManagerLink:
    """The server's side of its link to the manager: it asks, the manager answers."""


class StorageService(service.MultiService):
    """The storage server process."""

    log = Logger()

    def __init__(self, listen: str, data: str, manager: str, advertise: str | None = None,
                 heartbeat: float = 5.0, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.listen_description = listen
        self.data = data
        self.manager_description = manager
        self.advertise = advertise
        self.heartbeat_interval = heartbeat
        self.port = None
        self.server: StorageServer | None = None
        self.manager_link: internet.ClientService | None = None
        self._disk_pool = ThreadPool(minthreads=1, maxthreads=4, name="sdbackup-disk")
        self._registered = defer.Deferred()
        self._manager_connection: MessageProtocol | None = None

    def run_on_disk(self, f, *args, **kwargs) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self._disk_pool, f, *args, **kwargs)

    def startService(self):
        super().startService()
        store = ChunkStore(self.data)
        self._disk_pool.start()
        # Shorter than the client's wait, so the client hears why a replica failed.
        self.peers = PeerPool(self.reactor, None, "server", request_timeout=FORWARD_TIMEOUT)
        self.server = StorageServer(store, self.run_on_disk, self.peers)
        factory = Factory.forProtocol(lambda: MessageProtocol(self.server, "server"))
        d = serverFromString(self.reactor, self.listen_description).listen(factory)
        d.addCallback(self._listened)
        d.addErrback(self._failed, "cannot listen on " + self.listen_description)

    def _listened(self, port):
        self.port = port
        bound = port.getHost().port
        self.server.address = self.advertise or f"tcp:localhost:{bound}"
        self.log.info("sdbackup-server listening on port {port} as {address}, data in {data}",
                      port=bound, address=self.server.address, data=self.store.root)
        self.manager_link = internet.ClientService(
            clientFromString(self.reactor, self.manager_description),
            Factory.forProtocol(lambda: MessageProtocol(_ManagerLink(), "server")),
            retryPolicy=internet.backoffPolicy(maxDelay=5.0),
            prepareConnection=self._register,
        )
        self.manager_link.setServiceParent(self)
        self._heartbeat = task.LoopingCall(self._send_heartbeat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.heartbeat_interval, now=False).addErrback(
            self._failed, "heartbeat stopped")

    @property
    def store(self) -> ChunkStore:
        return self.server.store

    async def _register_async(self, connection):
        await connection.ready
        await connection.request(RegisterServer(
            address=self.server.address, free_bytes=self.store.free_bytes(),
            chunk_count=self.store.count()))
        chunk_ids = await self.run_on_disk(lambda: list(self.store.chunk_ids()))
        for start in range(0, max(len(chunk_ids), 1), INVENTORY_PAGE):
            page = chunk_ids[start : start + INVENTORY_PAGE]
            final = start + INVENTORY_PAGE >= len(chunk_ids)
            await connection.request(ChunkInventory(chunk_ids=page, final=final))
        self._manager_connection = connection
        self.log.info("sdbackup-server registered with the manager at {manager}",
                      manager=self.manager_description)
        if not self._registered.called:
            self._registered.callback(self.server.address)

    def _register(self, connection):
        return defer.ensureDeferred(self._register_async(connection))

    def when_registered(self) -> defer.Deferred:
        """Fires with this server's address once it first registered with the manager."""
        d = defer.Deferred()
        self._registered.addCallback(lambda address: (d.callback(address), address)[1])
        return d

    def _send_heartbeat(self):
        connection = self._manager_connection
        if connection is not None and connection.connected:
            connection.send(Heartbeat(free_bytes=self.store.free_bytes(),
                                      chunk_count=self.store.count()))

    def _failed(self, failure, what):
        self.log.failure("sdbackup-server: {what}", failure, what=what)
        # Under twistd this runs before the reactor starts: stop it once it has.
        self.reactor.callWhenRunning(self.reactor.stop)

    async def _stop(self):
        try:
            if getattr(self, "_heartbeat", None) is not None and self._heartbeat.running:
                self._heartbeat.stop()
            if self.port is not None:
                await defer.maybeDeferred(self.port.stopListening)
            await self.peers.close()
        finally:
            self._disk_pool.stop()  # its threads would keep the process alive

    def stopService(self):
        stopped = super().stopService()

        async def stop_all():
            await stopped
            await self._stop()

        return defer.ensureDeferred(stop_all())
