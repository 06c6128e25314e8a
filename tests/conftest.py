"""Shared test fixtures.

* ``logged_errors`` (autouse) fails a test when anything logs a failure or an
  unhandled error in a Deferred — the check trial did and pytest-twisted does not.
* ``cluster`` starts a manager and three storage servers inside the test
  process, on loopback ports chosen by the kernel (``tcp:0``), with real
  sockets, real SQLite and real chunk files under ``tmp_path``, and waits
  until the manager is ready (out of its safe mode); ``make_cluster`` starts
  clusters with other options.
* ``wire_client`` talks to that cluster with protocol messages alone (place,
  store, commit), for tests of the services that use no client code.
"""

import gc
import os
import sqlite3
import sys

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.logger import globalLogPublisher, textFileLogObserver

from sdbackup import hashing
from sdbackup.client.session import Session
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ChunkNeed, ChunkRef, CommitSnapshot, PlacementRequest, StoreChunks
from sdbackup.protocols.peer import MessageProtocol, PeerPool
from sdbackup.services.catalog import SCHEMA_VERSION, Catalog
from sdbackup.services.manager import ManagerService
from sdbackup.services.server import StorageService


class LoggedErrors:
    """Collects logged failures; a test that expects some calls ``flush``."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def flush(self, *types) -> list:
        """Remove and return the logged failures of ``types`` (all when none given)."""
        taken = [e for e in self.events if not types or (
            e.get("log_failure") is not None and e["log_failure"].check(*types))]
        self.events = [e for e in self.events if e not in taken]
        return taken


@pytest.fixture(autouse=True)
def logged_errors():
    errors = LoggedErrors()
    # The services' log goes to the test's captured output: pytest shows it when a test fails.
    echo = textFileLogObserver(sys.stdout)
    globalLogPublisher.addObserver(errors)
    globalLogPublisher.addObserver(echo)
    try:
        yield errors
        gc.collect()  # a lost Deferred logs its unhandled error when collected
    finally:
        globalLogPublisher.removeObserver(errors)
        globalLogPublisher.removeObserver(echo)
    if errors.events:
        lines = []
        for event in errors.events:
            failure = event.get("log_failure")
            lines.append(failure.getTraceback() if failure else repr(event))
        pytest.fail("errors were logged during the test:\n" + "\n".join(lines))


@attrs.define
class Cluster:
    """A manager and storage servers in this process."""

    root: str
    manager: ManagerService
    manager_address: str
    servers: list = attrs.Factory(list)
    options: dict = attrs.Factory(dict)

    @classmethod
    async def start(cls, root, servers: int = 3, replicas: int = 2, dead_after: float = 2.0,
                    repair_interval: float = 0.2, safe_mode_timeout: float = 10.0,
                    safe_mode_settle: float = 0.5) -> "Cluster":
        """A manager and ``servers`` fresh servers; returns once the manager is ready (a fresh
        cluster is ready as soon as its first, empty, server reports)."""
        options = dict(replicas=replicas, dead_after=dead_after, repair_interval=repair_interval,
                       repair_rate=1024**3, safe_mode_timeout=safe_mode_timeout,
                       safe_mode_settle=safe_mode_settle,
                       read_data_interval=0.0)  # tests re-read the data more often than users
        cluster = cls(str(root), None, "", options=options)
        port = await cluster.start_manager("tcp:0", os.path.join(root, "manager"))
        cluster.manager_address = f"tcp:127.0.0.1:{port}"
        for _ in range(servers):
            await cluster.add_server()
        if servers:
            await cluster.until_ready()
        return cluster

    async def start_manager(self, listen: str, data: str) -> int:
        """Start a manager (again: give the ``listen`` port it had); its port."""
        self.manager = ManagerService(f"{listen}:interface=127.0.0.1", data, reactor=reactor,
                                      **self.options)
        self.manager.startService()
        port = await self.manager.when_listening()
        return port.getHost().port

    async def restart_manager(self, data: str | None = None):
        """Stop the manager and start it again on its port, with its data folder or ``data``
        (a new folder: a lost catalog). The servers reconnect by themselves."""
        old = self.manager
        await old.stopService()
        await self.start_manager(f"tcp:{self.manager_address.rsplit(':', 1)[1]}",
                                 data or old.data)

    async def until_ready(self, timeout: float = 20.0):
        await self.until(lambda: self.manager.manager.ready, timeout, "the manager being ready")

    async def add_server(self, index: int | None = None, listen: str = "tcp:0") -> StorageService:
        """Start a server (again, with ``index`` and the ``listen`` port it had: a restart)."""
        if index is None:
            index = len(self.servers)
            self.servers.append(None)
        server = StorageService(f"{listen}:interface=127.0.0.1",
                                os.path.join(self.root, f"server{index}"),
                                self.manager_address, heartbeat=0.2, reconnect_delay=0.2,
                                reactor=reactor)
        self.servers[index] = server
        server.startService()
        await server.when_registered()
        return server

    async def until(self, condition, timeout: float = 20.0, what: str = "the condition"):
        """Poll ``condition`` (maybe async) on the reactor until it holds."""
        deadline = reactor.seconds() + timeout
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            if reactor.seconds() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout} s")
            await task.deferLater(reactor, 0.05)

    async def stop_server(self, server: StorageService):
        """Stop a server and wait until the manager counts it dead."""
        await server.stopService()
        await self.until(lambda: server.server.address not in self.manager.manager.live,
                         what="the manager seeing the death")

    async def chunk_health(self) -> tuple[int, int, int]:
        """``(chunks known, under-replicated, missing)`` as the manager counts them now."""
        manager = self.manager.manager
        return await manager.db(manager.catalog.chunk_stats, set(manager.live), manager.replicas)

    def server(self, address: str) -> StorageService:
        return next(s for s in self.servers if s.server.address == address)

    def ticket(self, chunk_ids: list[str], chain: list[str]):
        """A ticket the manager signs for storing ``chunk_ids`` along ``chain`` (what its
        placement would give), for tests that store without asking for a placement."""
        manager = self.manager.manager
        return manager.tickets.issue(chunk_ids, chain, manager.clock.seconds())

    async def session(self) -> Session:
        return await Session(reactor, self.manager_address).connect()

    async def wire_client(self) -> "WireClient":
        return await WireClient.connect(self)

    async def stop(self):
        try:
            for server in self.servers:
                if server.running:
                    await server.stopService()
        finally:
            if self.manager.running:
                await self.manager.stopService()


class WireClient:
    """A client made of protocol messages: a connection to the manager and a pool of
    connections to the servers (tests of the services use no client code)."""

    def __init__(self, manager: MessageProtocol, servers: PeerPool):
        self.manager = manager
        self.servers = servers

    @classmethod
    async def connect(cls, cluster) -> "WireClient":
        endpoint = clientFromString(reactor, cluster.manager_address)
        proto = await connectProtocol(endpoint, MessageProtocol(None, "client"))
        await proto.ready
        return cls(proto, PeerPool(reactor, None, "client", request_timeout=30))

    async def ask(self, msg):
        return await self.manager.request(msg, 30, reactor)

    async def store(self, kind: str, pieces: list[tuple[str, bytes]]):
        """Place and store ``(id, bytes)`` of one kind, each on its servers, chained."""
        sizes = {chunk_id: len(data) for chunk_id, data in pieces}
        placement = await self.ask(PlacementRequest(
            chunks=[ChunkNeed(chunk_id, size) for chunk_id, size in sizes.items()]))
        chains: dict[tuple, list[tuple[str, bytes]]] = {}
        for chunk_id, data in pieces:
            if chunk_id in placement.assignments:
                chains.setdefault(tuple(placement.assignments[chunk_id]), []).append(
                    (chunk_id, data))
        tickets = {tuple(ticket.chain): ticket for ticket in placement.tickets}
        for chain, pack in chains.items():
            reply = await self.servers.request(chain[0], StoreChunks(
                chunks=[ChunkRef(c, len(d), hashing.checksum(d)) for c, d in pack],
                forward_to=list(chain[1:]), kind=kind, ticket=tickets[chain],
                payload=b"".join(d for _, d in pack)))
            assert reply.holders == list(chain)
        return placement

    async def backup(self, backup):
        """Store everything of ``backup``, bottom up, then commit its snapshot."""
        await self.store(Kind.DATA, backup.data)
        await self.store(Kind.LIST, backup.lists)
        await self.store(Kind.TREE, backup.trees)
        await self.store(Kind.SNAPSHOT, [(backup.snapshot_id, backup.snapshot)])
        return (await self.ask(CommitSnapshot(snapshot_id=backup.snapshot_id))).snapshot

    async def close(self):
        await self.servers.close()
        self.manager.transport.loseConnection()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path):
    started = await Cluster.start(tmp_path / "cluster")
    try:
        yield started
    finally:
        await started.stop()


@pytest_twisted.async_yield_fixture
async def make_cluster(tmp_path):
    """Start clusters with other options (``Cluster.start``'s); each is stopped after the test."""
    started = []

    async def make(servers: int = 3, **options) -> Cluster:
        cluster = await Cluster.start(tmp_path / f"cluster{len(started)}", servers, **options)
        started.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            await cluster.stop()


@pytest_twisted.async_yield_fixture
async def wire_client(cluster):
    """A ``WireClient`` of the ``cluster``."""
    connected = await cluster.wire_client()
    try:
        yield connected
    finally:
        await connected.close()


@pytest.fixture
def older_catalog():
    """Open the catalog at ``path`` after making it look as an older sdbackup left it: each
    statement (SQL, or SQL and its values) run on it, ``PRAGMA user_version = version``. The
    catalog returned was migrated in place (not moved aside); the test closes it."""

    def make(path: str, version: int, *statements) -> Catalog:
        Catalog(path).close()
        old = sqlite3.connect(path)
        for statement in statements:
            old.execute(*((statement,) if isinstance(statement, str) else statement))
        old.execute(f"PRAGMA user_version = {version}")
        old.commit()
        old.close()
        catalog = Catalog(path)
        assert catalog.moved_aside is None
        assert catalog.db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        return catalog

    return make
