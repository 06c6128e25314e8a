"""A client's connections: one to the manager, a pool to storage servers.

With a ``Transport`` holding a TLS identity both are mutual TLS against the
cluster CA; without, only loopback addresses are reached (unless ``insecure``).
"""

import sys

from twisted.internet import defer, error, task
from twisted.internet.endpoints import connectProtocol

from sdbackup.protocols.messages import Message
from sdbackup.protocols.peer import IDLE, ConnectionRefusedByPeer, MessageProtocol, PeerPool, RemoteError
from sdbackup.sealing import PlainSealer
from sdbackup.tlsconfig import AddressRefused, Transport

#: Seconds to wait for a storage server's answer (a primary waits 60 s for its replica).
SERVER_TIMEOUT = 90.0
#: Seconds to wait for the manager's answer.
MANAGER_TIMEOUT = 300.0
#: Seconds a command waits for a manager that is starting (servers still reporting), and
#: between its tries.
STARTING_WAIT = 120.0
STARTING_RETRY = 0.5
#: Seconds to wait for a TCP connection to the manager.
CONNECT_TIMEOUT = 10.0


class ClientError(Exception):
    """A failure to report to the user as one clear line."""


class Session:
    def __init__(self, reactor, manager: str, notice=None, transport: Transport | None = None):
        self.reactor = reactor
        #: Where a line for the user goes (the manager is starting, ...): stderr by default.
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self.manager_address = manager
        self.manager: MessageProtocol | None = None
        self.transport = transport or Transport()
        self.servers = PeerPool(reactor, None, "client", request_timeout=SERVER_TIMEOUT,
                                transport=self.transport)
        #: Seals what is stored and opens what is read: the repository's key once it is
        #: opened (``sdbackup.client.keys``), else nothing (a plaintext repository).
        self.sealer = PlainSealer()

    async def connect(self):
        try:
            endpoint = self.transport.client_endpoint(self.reactor, self.manager_address,
                                                      CONNECT_TIMEOUT, "reach the manager at")
        except AddressRefused as e:
            raise ClientError(str(e)) from None
        # An admin's certificate says "admin"; its Hello says "client" (it may do all a client does).
        # Any role is let through the handshake so that a wrong address gets a message naming
        # what answered there; anything but a manager is closed at once below.
        proto = MessageProtocol(None, "client", tls=self.transport.tls is not None,
                                expect=None, clock=self.reactor,
                                handshake_timeout=self.transport.handshake_timeout)
        try:
            await connectProtocol(endpoint, proto)
            self.manager = await proto.ready
        except ConnectionRefusedByPeer as e:
            raise ClientError(f"cannot reach the manager at {self.manager_address}: {e}") from None
        except (error.ConnectionDone, error.ConnectionLost) as e:
            hint = "" if self.transport.tls else (
                " (closed before the handshake: if the cluster uses TLS, give --tls-ca, --tls-cert "
                "and --tls-key)")
            raise ClientError(f"cannot reach the manager at {self.manager_address}: {e}{hint}") from None
        except Exception as e:
            raise ClientError(f"cannot reach the manager at {self.manager_address}: {e}") from e
        if proto.peer_role != "manager":
            self.manager = None
            proto.transport.loseConnection()
            what = "a storage server" if proto.peer_role == "server" else f"a {proto.peer_role}"
            raise ClientError(f"{self.manager_address} is {what}, not the manager: give the manager's "
                              f"address (--manager or $SDBACKUP_MANAGER)")
        return self

    async def ask(self, msg: Message) -> Message:
        """Send a request to the manager and wait for its answer.

        A manager that has just started answers "starting" until its servers
        have reported what they hold; the request is then tried again, for at
        most ``STARTING_WAIT`` seconds, with one line telling the user why.
        """
        deadline = self.reactor.seconds() + STARTING_WAIT
        told = False
        while True:
            if self.manager.closed and getattr(self.manager.refusal, "code", None) == IDLE:
                await self.connect()  # closed by the manager while idle (a long restore)
            try:
                return await self.manager.request(msg, MANAGER_TIMEOUT, self.reactor)
            except RemoteError as e:
                if e.code == IDLE:
                    continue  # asked just as it closed the idle link: connect again
                if e.code != "starting" or self.reactor.seconds() > deadline:
                    raise
                if not told:
                    self.notice(f"{e.reason}; waiting")
                    told = True
            except (TimeoutError, ConnectionError, error.ConnectionLost,
                    error.ConnectionDone) as e:
                raise ClientError(f"lost the manager at {self.manager_address}: {e}") from e
            await task.deferLater(self.reactor, STARTING_RETRY)

    async def close(self):
        await self.servers.close()
        if self.manager is not None and self.manager.connected:
            self.manager.transport.loseConnection()


def first_error(failure):
    """Unwrap ``gatherResults``' FirstError so the user sees the real reason."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure
