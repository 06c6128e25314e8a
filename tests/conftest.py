"""Shared test fixtures.

* ``logged_errors`` (autouse) fails a test when anything logs a failure or an
  unhandled error in a Deferred — the check trial did and pytest-twisted does not.
* ``cluster`` starts a manager and three storage servers inside the test
  process, on loopback ports chosen by the kernel (``tcp:0``), with real
  sockets, real SQLite and real chunk files under ``tmp_path``.
"""

import gc
import os
import sys

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher, textFileLogObserver

from sdbackup.client.session import Session
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

    @classmethod
    async def start(cls, root, servers: int = 3, replicas: int = 2, dead_after: float = 2.0,
                    repair_interval: float = 0.2) -> "Cluster":
        manager = ManagerService("tcp:0:interface=127.0.0.1", os.path.join(root, "manager"),
                                 replicas=replicas, dead_after=dead_after,
                                 repair_interval=repair_interval, repair_rate=1024**3,
                                 reactor=reactor)
        manager.startService()
        port = await manager.when_listening()
        cluster = cls(str(root), manager, f"tcp:127.0.0.1:{port.getHost().port}")
        for _ in range(servers):
            await cluster.add_server()
        return cluster

    async def add_server(self, index: int | None = None, listen: str = "tcp:0") -> StorageService:
        """Start a server (again, with ``index`` and the ``listen`` port it had: a restart)."""
        if index is None:
            index = len(self.servers)
            self.servers.append(None)
        server = StorageService(f"{listen}:interface=127.0.0.1",
                                os.path.join(self.root, f"server{index}"),
                                self.manager_address, heartbeat=0.2, reactor=reactor)
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
        """``(chunks in use, under-replicated, missing)`` as the manager counts them now."""
        manager = self.manager.manager
        return await manager.db(manager.catalog.chunk_stats, set(manager.live), manager.replicas)

    def server(self, address: str) -> StorageService:
        return next(s for s in self.servers if s.server.address == address)

    async def session(self) -> Session:
        return await Session(reactor, self.manager_address).connect()

    async def stop(self):
        try:
            for server in self.servers:
                if server.running:
                    await server.stopService()
        finally:
            await self.manager.stopService()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path):
    started = await Cluster.start(tmp_path / "cluster")
    try:
        yield started
    finally:
        await started.stop()
