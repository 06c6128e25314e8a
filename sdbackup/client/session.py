"""A client's connections: one to the manager, a pool to storage servers."""

import sys

from twisted.internet import error, task
from twisted.internet.endpoints import clientFromString, connectProtocol

from sdbackup.protocols.messages import Message
from sdbackup.protocols.peer import MessageProtocol, PeerPool, RemoteError

#: Seconds to wait for a storage server's answer (a primary waits 60 s for its replica).
SERVER_TIMEOUT = 90.0
#: Seconds to wait for the manager's answer.
MANAGER_TIMEOUT = 300.0
#: Seconds a command waits for a manager that is starting (servers still reporting), and
#: between its tries.
STARTING_WAIT = 120.0
STARTING_RETRY = 0.5


class ClientError(Exception):
    """A failure to report to the user as one clear line."""


class Session:
    def __init__(self, reactor, manager: str, notice=None):
        self.reactor = reactor
        #: Where a line for the user goes (the manager is starting, ...): stderr by default.
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self.manager_address = manager
        self.manager: MessageProtocol | None = None
        self.servers = PeerPool(reactor, None, "client", request_timeout=SERVER_TIMEOUT)

    async def connect(self):
        endpoint = clientFromString(self.reactor, manager_endpoint(self.manager_address))
        try:
            proto = await connectProtocol(endpoint, MessageProtocol(None, "client"))
            self.manager = await proto.ready
        except Exception as e:
            raise ClientError(f"cannot reach the manager at {self.manager_address}: {e}") from e
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
            try:
                return await self.manager.request(msg, MANAGER_TIMEOUT, self.reactor)
            except RemoteError as e:
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


def manager_endpoint(address: str) -> str:
    if address.startswith("tcp:") and "timeout=" not in address:
        return f"{address}:timeout=10"
    return address
