"""One connection that speaks sdbackup messages, and a pool of them.

``MessageProtocol`` turns frames into messages and back. It does the version
handshake, matches answers to the requests that asked for them (a request
returns a Deferred) and hands every incoming request to its handler, a
service object with ``handle_<MessageName>(message, connection)`` methods.
It never touches the disk, the catalog or placement.
"""

import itertools

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup.protocols.framing import FrameReceiver
from sdbackup.protocols.messages import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    DecodeError,
    ErrorReply,
    Hello,
    Message,
    decode,
    encode,
)


class RemoteError(Exception):
    """A request the peer answered with an error. ``code`` is machine-readable."""

    code = "error"

    def __init__(self, reason: str, code: str | None = None, culprit: str = ""):
        super().__init__(reason)
        if code is not None:
            self.code = code
        #: The server at fault, when the answering peer names another (a replica).
        self.culprit = culprit

    @property
    def reason(self) -> str:
        return self.args[0]


class MessageProtocol(FrameReceiver):
    """Frames in, messages out; requests get Deferreds, answers resolve them."""

    log = Logger()
    MAX_LENGTH = MAX_FRAME_SIZE

    def __init__(self, handler, role: str):
        self.handler = handler
        self.role = role
        self.peer_role: str | None = None
        self.ready: defer.Deferred = defer.Deferred()
        self._pending: dict[int, defer.Deferred] = {}
        self._abandoned: set[int] = set()  # requests given up on: a late answer is dropped
        self._ids = itertools.count(1)
        self._closed = False

    # --- connection life -------------------------------------------------

    def connectionMade(self):
        super().connectionMade()
        made = getattr(self.handler, "connection_made", None)
        if made is not None:
            made(self)
        self.send(Hello(version=PROTOCOL_VERSION, role=self.role))

    def connectionLost(self, reason=None):
        self._closed = True
        pending, self._pending = self._pending, {}
        failure = reason if reason is not None else Failure(ConnectionLost())
        for d in pending.values():
            d.errback(failure)
        if not self.ready.called:
            self.ready.errback(failure)
            # Those waiting got the failure; a server-side connection has no one waiting.
            self.ready.addErrback(lambda _: None)
        lost = getattr(self.handler, "connection_lost", None)
        if lost is not None:
            lost(self)

    def describe_peer(self) -> str:
        peer = self.transport.getPeer() if self.transport else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def abort(self, why: str):
        """Close the connection because the peer broke the protocol."""
        if self._closed:
            return
        self._closed = True
        self.log.warn("closing connection with {peer}: {why}", peer=self.describe_peer(), why=why)
        self.transport.abortConnection()

    # --- receiving ---------------------------------------------------------

    def stringReceived(self, frame: bytes):
        if self._closed:
            return
        try:
            msg = decode(frame)
        except DecodeError as e:
            self.abort(f"bad frame: {e}")
            return
        if self.peer_role is None:
            self._handshake(msg)
        elif msg.IS_REPLY:
            self._answer(msg)
        else:
            self._dispatch(msg)

    def _handshake(self, msg: Message):
        if not isinstance(msg, Hello):
            self.abort(f"expected Hello first, got {type(msg).__name__}")
        elif msg.version != PROTOCOL_VERSION:
            self.abort(f"protocol version {msg.version} is not {PROTOCOL_VERSION}")
        else:
            self.peer_role = msg.role
            self.ready.callback(self)

    def _answer(self, msg: Message):
        d = self._pending.pop(msg.request_id, None)
        if d is None and msg.request_id in self._abandoned:
            self._abandoned.discard(msg.request_id)
        elif d is None:
            self.abort(f"{type(msg).__name__} answers no request ({msg.request_id})")
        elif isinstance(msg, ErrorReply):
            d.errback(RemoteError(msg.reason, msg.code, msg.culprit))
        else:
            d.callback(msg)

    def _dispatch(self, msg: Message):
        name = type(msg).__name__
        method = getattr(self.handler, f"handle_{name}", None)
        if method is None:
            self.abort(f"{name} is not handled by a {self.role}")
            return
        d = defer.maybeDeferred(method, msg, self)
        if hasattr(msg, "request_id") and msg.request_id:
            d.addCallbacks(self._reply, self._reply_error, callbackArgs=(msg,), errbackArgs=(msg,))
        else:
            d.addErrback(self._log_failure, msg)

    def _reply(self, answer: Message | None, msg: Message):
        if answer is None or self._closed:
            return
        try:
            self.send(answer)
        except Exception:
            self._reply_error(Failure(), msg)

    def _reply_error(self, failure: Failure, msg: Message):
        code = getattr(failure.value, "code", None)
        if isinstance(code, str):
            # An expected refusal (bad checksum, unknown snapshot, ...): its text is for the user.
            reason = str(failure.value)
        else:
            self._log_failure(failure, msg)
            code, reason = "internal", f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if not self._closed:
            culprit = getattr(failure.value, "culprit", "")
            self.send(ErrorReply(request_id=msg.request_id, code=code, reason=reason,
                                 culprit=culprit if isinstance(culprit, str) else ""))

    def _log_failure(self, failure: Failure, msg: Message):
        if isinstance(getattr(failure.value, "code", None), str):
            self.log.warn("refused {message} from {peer}: {reason}", message=type(msg).__name__,
                          peer=self.describe_peer(), reason=str(failure.value))
            return
        self.log.failure(
            "handling {message} from {peer}", failure, message=type(msg).__name__,
            peer=self.describe_peer(),
        )

    # --- sending -----------------------------------------------------------

    def send(self, msg: Message):
        self.sendFrame(*encode(msg))

    def request(self, msg: Message, timeout: float | None = None, clock=None) -> defer.Deferred:
        """Send ``msg`` with a fresh request id; the Deferred fires with the answer.

        With ``timeout``, the request fails with ``TimeoutError`` after that
        many seconds on ``clock`` (a hung peer must not hang its caller).
        """
        if self._closed:
            return defer.fail(ConnectionLost("connection already closed"))
        request_id = next(self._ids)

        def abandon(d):
            if self._pending.pop(request_id, None) is not None:
                self._abandoned.add(request_id)

        d = defer.Deferred(abandon)
        self._pending[request_id] = d
        self.send(attrs.evolve(msg, request_id=request_id))
        if timeout is not None:
            if clock is None:
                from twisted.internet import reactor as clock
            d.addTimeout(timeout, clock, onTimeoutCancel=_timed_out(msg, timeout))
        return d

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class PeerPool:
    """Long-lived connections to peers by endpoint address, opened on demand.

    Used by the client to reach servers and by a primary to reach its replicas.
    A lost connection is forgotten and reopened on the next request.
    """

    log = Logger()

    def __init__(self, reactor, handler, role: str, connect_timeout: float = 10.0,
                 request_timeout: float | None = None):
        self._reactor = reactor
        self._handler = handler
        self._role = role
        self._timeout = connect_timeout
        self._request_timeout = request_timeout
        self._dials: dict[str, _Dial] = {}

    def connection(self, address: str) -> defer.Deferred:
        """A Deferred firing with a ready ``MessageProtocol`` to ``address``."""
        dial = self._dials.get(address)
        if dial is None:
            dial = self._dials[address] = _Dial()
            endpoint = clientFromString(self._reactor, _with_timeout(address, self._timeout))
            proto = MessageProtocol(_PoolHandler(self, address, self._handler), self._role)
            d = connectProtocol(endpoint, proto)
            d.addCallback(lambda p: p.ready)
            d.addCallbacks(self._connected, self._failed, (dial,), None, (address, dial))
        if dial.proto is not None:
            return defer.succeed(dial.proto)
        waiter = defer.Deferred()
        dial.waiters.append(waiter)
        return waiter

    def _connected(self, proto, dial):
        dial.proto = proto
        waiters, dial.waiters = dial.waiters, []
        for w in waiters:
            w.callback(proto)

    def _failed(self, failure, address, dial):
        if self._dials.get(address) is dial:
            del self._dials[address]
        waiters, dial.waiters = dial.waiters, []
        for w in waiters:
            w.errback(failure)

    def lost(self, address: str, proto):
        dial = self._dials.get(address)
        if dial is not None and dial.proto is proto:
            del self._dials[address]

    async def request(self, address: str, msg: Message) -> Message:
        proto = await self.connection(address)
        return await proto.request(msg, self._request_timeout, self._reactor)

    def close(self) -> defer.Deferred:
        """Close every connection; fires when they are all gone."""
        waits = []
        for dial in list(self._dials.values()):
            if dial.proto is not None and not dial.proto._closed:
                closed = defer.Deferred()
                dial.proto.handler.closed.append(closed)
                dial.proto.transport.loseConnection()
                waits.append(closed)
        self._dials.clear()
        return defer.DeferredList(waits)


@attrs.define
class _Dial:
    proto: MessageProtocol | None = None
    waiters: list = attrs.Factory(list)


class _PoolHandler:
    """Passes requests to the pool's handler and tells the pool of lost connections."""

    def __init__(self, pool, address, handler):
        self._pool = pool
        self._address = address
        self._handler = handler
        self.closed: list[defer.Deferred] = []

    def __getattr__(self, name):
        if name.startswith("handle_") and self._handler is not None:
            return getattr(self._handler, name)
        raise AttributeError(name)

    def connection_lost(self, proto):
        self._pool.lost(self._address, proto)
        closed, self.closed = self.closed, []
        for d in closed:
            d.callback(None)


def _timed_out(msg: Message, timeout: float):
    def raise_timeout(result, seconds):
        raise TimeoutError(f"no answer to {type(msg).__name__} within {timeout:g} s")

    return raise_timeout


def _with_timeout(address: str, timeout: float) -> str:
    if address.startswith("tcp:") and "timeout=" not in address:
        return f"{address}:timeout={int(timeout)}"
    return address
