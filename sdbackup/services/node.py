"""What the manager and storage server processes share: a listener (TLS or loopback, with
connection limits), a thread pool, periodic calls, and a stop that leaves nothing running
or waiting."""

from collections import Counter

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadpool import ThreadPool

from sdbackup.protocols.peer import MessageProtocol
from sdbackup.tlsconfig import Transport


class NodeService(service.MultiService):
    """A process that answers sdbackup messages on ``listen`` with ``handler``.

    Subclasses build their handler in ``startService`` and call ``listen``;
    ``listened`` runs once the port is bound.
    """

    log = Logger()
    name_for_logs = "sdbackup"

    def __init__(self, listen: str, pool_name: str, pool_threads: int, reactor=None,
                 transport: Transport | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.transport = transport or Transport()
        # Refused here, at start: no plaintext beyond loopback unless --insecure.
        self.listen_description = self.transport.listen_description(listen)
        self.port = None
        self._pool = ThreadPool(minthreads=1, maxthreads=pool_threads, name=pool_name)
        self._loops: list[task.LoopingCall] = []
        self._listening: defer.Deferred | None = None

    def run_in_pool(self, f, *args, **kwargs) -> defer.Deferred:
        """Blocking work (disk, fsync, SQLite, hashing) off the reactor."""
        return deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    def listen(self, handler, role: str):
        self._pool.start()
        for warning in self.transport.warnings():
            self.log.warn("{node}: {warning}", node=self.name_for_logs, warning=warning)
        factory = Factory.forProtocol(lambda: self.protocol(handler, role))
        factory = ConnectionLimits(self.transport.server_factory(factory),
                                   self.transport.max_connections,
                                   self.transport.max_connections_per_host)
        self._listening = serverFromString(self.reactor, self.listen_description).listen(factory)
        self._listening.addCallback(self._bound)
        self._listening.addErrback(self.fail, f"cannot listen on {self.listen_description}")

    def protocol(self, handler, role: str, expect=None, accepting: bool = True) -> MessageProtocol:
        """A connection of this node: accepted ones (``accepting``) also time out when idle."""
        return MessageProtocol(handler, role, tls=self.transport.tls is not None, expect=expect,
                               clock=self.reactor, handshake_timeout=self.transport.handshake_timeout,
                               idle_timeout=self.transport.idle_timeout if accepting else None)

    def _bound(self, port):
        self.port = port
        self.listened(port)
        return port

    def listened(self, port):
        """Override: the port is bound."""

    def when_listening(self) -> defer.Deferred:
        """Fires with the listening port (tests read the ephemeral port number from it)."""
        d = defer.Deferred()
        self._listening.addCallback(lambda port: (d.callback(port), port)[1])
        return d

    def every(self, seconds: float, f, what: str):
        """Call ``f`` every ``seconds``; a failure is logged and stops the process."""
        loop = task.LoopingCall(f)
        loop.clock = self.reactor
        loop.start(seconds, now=False).addErrback(self.fail, f"{what} stopped")
        self._loops.append(loop)

    def fail(self, failure, what: str):
        self.log.failure("{node}: {what}", failure, node=self.name_for_logs, what=what)
        # Under twistd this runs before the reactor starts: stop it once it has.
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        stopped = super().stopService()

        async def stop_all():
            await stopped
            try:
                for loop in self._loops:
                    if loop.running:
                        loop.stop()
                if self.port is not None:
                    await defer.maybeDeferred(self.port.stopListening)
                await self.stopping()
            finally:
                self._pool.stop()  # waits for the work under way; its threads would keep
                self.stopped()  # the process alive

        return defer.ensureDeferred(stop_all())

    async def stopping(self):
        """Override: close what the node opened (before its thread pool stops)."""

    def stopped(self):
        """Override: release what needed the thread pool (after it stopped)."""


def close_all(connections):
    """Nobody may wait on a node that no longer works: drop every connection it has."""
    for connection in list(connections):
        connection.transport.abortConnection()


class ConnectionLimits(WrappingFactory):
    """At most ``total`` connections at once, and ``per_host`` from one peer address; one
    more is closed at once, before TLS or any frame costs anything."""

    log = Logger()

    def __init__(self, wrapped, total: int, per_host: int):
        super().__init__(wrapped)
        self.total = total
        self.per_host = per_host
        self.hosts: Counter = Counter()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "?")
        if len(self.protocols) >= self.total:
            self.log.warn("refused connection from {host}: {count} connections open already",
                          host=host, count=len(self.protocols))
            return None
        if self.hosts[host] >= self.per_host:
            self.log.warn("refused connection from {host}: {count} connections from it already",
                          host=host, count=self.hosts[host])
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.hosts[host] += 1
            protocol._limits_host = host
        return protocol

    def unregisterProtocol(self, p):
        host = getattr(p, "_limits_host", None)
        if host is not None and p in self.protocols:
            self.hosts[host] -= 1
            if self.hosts[host] <= 0:
                del self.hosts[host]
        super().unregisterProtocol(p)
