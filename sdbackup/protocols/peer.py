"""One connection that speaks sdbackup messages, and a pool of them.

``MessageProtocol`` turns frames into messages and back. It does the version
handshake, matches answers to the requests that asked for them (a request
returns a Deferred) and hands every incoming request to its handler, a
service object with ``handle_<MessageName>(message, connection)`` methods,
once ``authority`` allows the peer's role to send it. Under TLS the peer's role
is the one its certificate carries (the Hello must agree). Until the Hello is
accepted only small frames are read, and it must come within the handshake
timeout; a connection with nothing in flight for the idle timeout is closed.
It never touches the disk, the catalog or placement.
"""

import itertools

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup import pki
from sdbackup.protocols import authority, messages
from sdbackup.protocols.framing import FrameReceiver
from sdbackup.protocols.messages import (
    HELLO_FRAME,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    DecodeError,
    ErrorReply,
    Hello,
    Message,
    decode,
    encode,
    frame_limit,
    payload_offset,
)
from sdbackup.tlsconfig import (
    AddressRefused,
    Transport,
    describe_tls_failure,
    peer_certificate,
)

#: The largest frame read before the peer's Hello is accepted (a Hello is about 40 bytes).
HANDSHAKE_FRAME_SIZE = HELLO_FRAME
#: Characters of a peer-supplied text kept in a log line.
LOGGED_TEXT = 200
#: The code of the notice an idle connection gets before it is closed (connect again).
IDLE = "idle"


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


class ConnectionRefusedByPeer(ConnectionError):
    """The TLS handshake failed: the peer's certificate, or ours, was not accepted."""


def _hello_matches(certified: str, announced: str) -> bool:
    """An admin may announce itself as a client (it may do all a client does)."""
    return announced == certified or (certified == "admin" and announced == "client")


def _clip(text: str, limit: int = LOGGED_TEXT) -> str:
    """A peer-supplied text cut for a log line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MessageProtocol(FrameReceiver):
    """Frames in, messages out; requests get Deferreds, answers resolve them.

    ``tls``: the peer's role comes from its certificate. ``expect``: the roles this end
    accepts at the other end (None: any; what it may send is ``authority``'s business).
    ``clock`` runs the handshake and idle timeouts (none when None; the nodes, the pool and
    the client set them; only accepted connections have an idle timeout).
    """

    log = Logger()
    MAX_LENGTH = MAX_FRAME_SIZE
    HEAD_SIZE = messages.HEAD_SIZE

    def __init__(self, handler, role: str, *, tls: bool = False, expect=None, clock=None,
                 handshake_timeout: float | None = None, idle_timeout: float | None = None):
        self.handler = handler
        self.role = role
        self.tls = tls
        self.expect = frozenset(expect) if expect is not None else None
        self.peer_role: str | None = None
        #: Under TLS: the peer certificate's name and SHA-256 fingerprint.
        self.peer_name: str | None = None
        self.peer_identity: str | None = None
        #: Why the peer refused this connection (it said so before closing it).
        self.refusal: RemoteError | None = None
        self.ready: defer.Deferred = defer.Deferred()
        self.MAX_LENGTH = HANDSHAKE_FRAME_SIZE  # until the Hello is accepted
        self._pending: dict[int, defer.Deferred] = {}
        self._abandoned: set[int] = set()  # requests given up on: a late answer is dropped
        self._ids = itertools.count(1)
        self._closed = False
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._timer = None
        self._serving = 0  # requests of the peer being handled
        self._speaks_tls = False  # a plaintext end got a TLS record instead of a Hello
        self._last_active = 0.0

    def frame_limit(self, head: bytes) -> int:
        return frame_limit(head)

    def payload_offset(self, head: bytes) -> int:
        return payload_offset(head)

    def lengthLimitExceeded(self, length: int):
        # A TLS record (alert 0x15 or handshake 0x16, version 3.x) read as a frame's length.
        if self.peer_role is None and not self.tls and length >> 16 in (0x1503, 0x1603):
            self._speaks_tls = True
        super().lengthLimitExceeded(length)

    # --- connection life -------------------------------------------------

    def _reactor(self):
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def connectionMade(self):
        super().connectionMade()
        # Frames go out at once: with Nagle's algorithm a small request written while the
        # last one is unacknowledged waits for the peer's delayed ACK (up to 40 ms).
        no_delay = getattr(self.transport, "setTcpNoDelay", None)  # (TLS passes it down)
        if no_delay is not None:
            no_delay(True)
        made = getattr(self.handler, "connection_made", None)
        if made is not None:
            made(self)
        if self._handshake_timeout is not None:
            self._timer = self._reactor().callLater(self._handshake_timeout, self._handshake_late)
        self.send(Hello(version=PROTOCOL_VERSION, role=self.role))

    def connectionLost(self, reason=None):
        self._closed = True
        self._stop_timer()
        self.send_gate.stopProducing()  # whoever waits to send finds the connection closed
        pending, self._pending = self._pending, {}
        failure = reason if reason is not None else Failure(ConnectionLost())
        if self.refusal is not None:
            failure = Failure(self.refusal)
        elif self._speaks_tls:
            failure = Failure(ConnectionRefusedByPeer(
                "the peer speaks TLS: this cluster needs --tls-ca, --tls-cert and --tls-key"))
        elif self.peer_role is None and reason is not None:
            why = describe_tls_failure(reason.value)
            if why is not None:
                self.log.warn("connection with {peer} refused: {why}", peer=self.describe_peer(),
                              why=why)
                failure = Failure(ConnectionRefusedByPeer(why))
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
        where = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        return f"{self.peer_name} ({where})" if self.peer_name else where

    def abort(self, why: str):
        """Close the connection because the peer broke the protocol."""
        if self._closed:
            return
        self._closed = True
        self._stop_timer()
        self.log.warn("closing connection with {peer}: {why}", peer=self.describe_peer(),
                      why=_clip(why))
        self.transport.abortConnection()

    def refuse(self, why: str):
        """Tell the peer why it is not accepted (an ErrorReply answering no request), then close."""
        if self._closed:
            return
        self.log.warn("refused connection from {peer}: {why}", peer=self.describe_peer(),
                      why=_clip(why))
        self.send(ErrorReply(request_id=0, code="forbidden",
                             reason=f"the {self.role} refused this connection: {why}"))
        self._closed = True
        self._stop_timer()
        self._lose_connection()

    def _lose_connection(self):
        """Close once what was written is sent. A producer still registered (a server's fetch
        gate) is let go first: under TLS it would hold the connection open for good."""
        try:
            self.transport.unregisterProducer()
        except RuntimeError:  # none was (a test's StringTransport says so; sockets do not)
            pass
        self.transport.loseConnection()

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _handshake_late(self):
        self._timer = None
        self.abort(f"no handshake within {self._handshake_timeout:g} s")

    def _idle_check(self):
        """Close a connection with nothing in flight and nothing received for the idle timeout."""
        self._timer = None
        if self._closed:
            return
        now = self._reactor().seconds()
        quiet = now - self._last_active
        if self._pending or self._serving or quiet < self._idle_timeout:
            wait = self._idle_timeout - quiet if quiet < self._idle_timeout else self._idle_timeout
            self._timer = self._reactor().callLater(wait, self._idle_check)
            return
        self.log.info("closing connection with {peer}: idle for {seconds:g} s",
                      peer=self.describe_peer(), seconds=quiet)
        # Said, so the peer knows it may simply connect again.
        self.send(ErrorReply(request_id=0, code=IDLE, reason=f"closed after {quiet:g} s idle"))
        self._closed = True
        self._lose_connection()

    # --- receiving ---------------------------------------------------------

    def stringReceived(self, frame: bytes):
        self.partsReceived(frame, None)

    def partsReceived(self, frame: bytes, payload: bytes | None):
        if self._closed:
            return
        if self._idle_timeout is not None:
            self._last_active = self._reactor().seconds()
        try:
            msg = decode(frame, payload)
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
            return
        if msg.version != PROTOCOL_VERSION:
            self.abort(f"protocol version {msg.version} is not {PROTOCOL_VERSION}")
            return
        role = msg.role
        if self.tls:
            try:
                peer = peer_certificate(self.transport)
            except pki.CertificateError as e:
                self.refuse(str(e))
                return
            self.peer_name, self.peer_identity = peer.name, peer.fingerprint
            if not _hello_matches(peer.role, msg.role):
                self.refuse(f"its certificate is a {peer.role}'s, but it said it is a {msg.role}")
                return
            role = peer.role
        if self.expect is not None and role not in self.expect:
            self.refuse(f"a {' or '.join(sorted(self.expect))} was expected here, not a {role}")
            return
        self._stop_timer()
        self.peer_role = role
        self.MAX_LENGTH = MAX_FRAME_SIZE
        if self._idle_timeout is not None:
            self._last_active = self._reactor().seconds()
            self._timer = self._reactor().callLater(self._idle_timeout, self._idle_check)
        self.ready.callback(self)

    def _answer(self, msg: Message):
        d = self._pending.pop(msg.request_id, None)
        if d is None and msg.request_id in self._abandoned:
            self._abandoned.discard(msg.request_id)
        elif d is None and isinstance(msg, ErrorReply) and msg.request_id == 0:
            self._peer_refused(msg)
        elif d is None:
            self.abort(f"{type(msg).__name__} answers no request ({msg.request_id})")
        elif isinstance(msg, ErrorReply):
            d.errback(RemoteError(msg.reason, msg.code, msg.culprit))
        else:
            d.callback(msg)

    def _peer_refused(self, msg: ErrorReply):
        """The peer refused this connection (or closes it, idle): every request on it fails
        with its reason."""
        if msg.code == IDLE:
            self.log.info("{peer} closed this idle connection", peer=self.describe_peer())
        else:
            self.log.warn("{peer} refused this connection: {why}", peer=self.describe_peer(),
                          why=_clip(msg.reason))
        self.refusal = RemoteError(msg.reason, msg.code)
        self._closed = True
        self._lose_connection()

    def _dispatch(self, msg: Message):
        name = type(msg).__name__
        method = getattr(self.handler, f"handle_{name}", None)
        if method is None:  # not a message for this end at all: the peer is broken
            self.abort(f"{name} is not handled by a {self.role}")
            return
        why = authority.refusal(self.peer_role, msg, authenticated=self.tls)
        if why is not None:  # one this end handles, but not from this peer's role
            self.log.warn("forbidden: {message} from {peer}: {why}", message=name,
                          peer=self.describe_peer(), why=why)
            if getattr(msg, "request_id", 0):
                self.send(ErrorReply(request_id=msg.request_id, code="forbidden", reason=why))
            return
        self._serving += 1
        d = defer.maybeDeferred(method, msg, self)
        d.addBoth(self._served)
        if hasattr(msg, "request_id") and msg.request_id:
            d.addCallbacks(self._reply, self._reply_error, callbackArgs=(msg,), errbackArgs=(msg,))
        else:
            d.addErrback(self._log_failure, msg)

    def _served(self, result):
        self._serving -= 1
        if self._idle_timeout is not None:
            self._last_active = self._reactor().seconds()
        return result

    def _reply(self, answer: Message | None, msg: Message):
        if self._closed:
            return
        if answer is None:  # a handler's bug: unanswered, the requester would wait for good
            name = type(msg).__name__
            self._log_failure(Failure(AssertionError(f"handle_{name} returned no answer")), msg)
            self._send_error(msg.request_id, "internal", f"the {self.role} had no answer to {name}")
            return
        try:
            self.send(answer)
        except Exception:  # (nothing was written: the requester still waits for an answer)
            failure = Failure()
            self._log_failure(failure, msg)
            self._send_error(msg.request_id, "internal",
                             f"the {self.role} could not send its {type(answer).__name__}: "
                             f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def _reply_error(self, failure: Failure, msg: Message):
        code = getattr(failure.value, "code", None)
        if self._closed and failure.check(ConnectionLost, ConnectionDone):
            # The peer went away while we worked for it (a server frozen past --dead-after,
            # then resumed): nobody is left to answer, and nothing is wrong here.
            self.log.info("{message} from {peer} abandoned: the connection closed",
                          message=type(msg).__name__, peer=self.describe_peer())
            return
        if isinstance(code, str):
            # An expected refusal (bad checksum, unknown snapshot, ...): its text is for the user.
            reason = str(failure.value)
        else:
            self._log_failure(failure, msg)
            code, reason = "internal", f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if not self._closed:
            culprit = getattr(failure.value, "culprit", "")
            self._send_error(msg.request_id, code, reason,
                             culprit if isinstance(culprit, str) else "")

    def _send_error(self, request_id: int, code: str, reason: str, culprit: str = ""):
        """Answer a request with an error. One that cannot go as it is (a handler's code or
        culprit no ErrorReply can carry) goes as "internal", saying why: unanswered, the
        requester would wait for good."""
        try:
            self.send(ErrorReply(request_id=request_id, code=code, reason=reason, culprit=culprit))
        except Exception:
            failure = Failure()
            self.log.failure("cannot send the {code!r} error to {peer}", failure, code=_clip(code),
                             peer=self.describe_peer())
            self.send(ErrorReply(request_id=request_id, code="internal", reason=(
                f"the {self.role} could not send its error ({failure.getErrorMessage()}): "
                f"{reason}")))

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
            return defer.fail(self.refusal or ConnectionLost("connection already closed"))
        request_id = next(self._ids)

        def abandon(d):
            if self._pending.pop(request_id, None) is not None:
                self._abandoned.add(request_id)

        d = defer.Deferred(abandon)
        self._pending[request_id] = d
        try:
            self.send(attrs.evolve(msg, request_id=request_id))
        except Exception:
            # A message that cannot be encoded (an integer past 64 bits, a string that is not
            # Unicode) fails its request like any other failure, as a Deferred. Nothing was
            # written: no answer will come, and the connection serves on.
            del self._pending[request_id]
            return defer.fail()
        if timeout is not None:
            if clock is None:
                from twisted.internet import reactor as clock
            d.addTimeout(timeout, clock, onTimeoutCancel=_timed_out(msg, timeout))
        return d

    @property
    def closed(self) -> bool:
        """Closed, or closing: nothing more is sent or handled."""
        return self._closed

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
                 request_timeout: float | None = None, transport: Transport | None = None):
        self._reactor = reactor
        self._handler = handler
        self._role = role
        self._transport = transport or Transport()
        self._timeout = connect_timeout
        self._request_timeout = request_timeout
        self._dials: dict[str, _Dial] = {}

    def connection(self, address: str) -> defer.Deferred:
        """A Deferred firing with a ready ``MessageProtocol`` to ``address``."""
        dial = self._dials.get(address)
        if dial is None:
            try:
                endpoint = self._transport.client_endpoint(self._reactor, address, self._timeout)
            except AddressRefused as e:
                return defer.fail(e)
            dial = self._dials[address] = _Dial()
            proto = MessageProtocol(_PoolHandler(self, address, self._handler), self._role,
                                    tls=self._transport.tls is not None, expect=("server",),
                                    clock=self._reactor,
                                    handshake_timeout=self._transport.handshake_timeout)
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
        await proto.send_gate.wait()
        try:
            return await proto.request(msg, self._request_timeout, self._reactor)
        except RemoteError as e:
            if e.code != IDLE:
                raise
        # Sent just as the peer closed the link for idleness: once more, on a new one.
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
