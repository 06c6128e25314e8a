"""Length-prefixed framing with a linear-time receive buffer.

Twisted's stock ``Int32StringReceiver`` concatenates its whole unprocessed
buffer with every read, so a 1 MiB frame arriving in 64 KiB reads is copied
about sixteen times. This subclass keeps the received pieces in a list and
joins them once, when a frame is complete, while keeping the same contract:
``stringReceived``, ``sendString``, ``MAX_LENGTH``, ``lengthLimitExceeded``
and pause/resume.

A peer's announced length is checked before anything of its frame is kept:
against ``MAX_LENGTH``, which a connection may change at run time (small
before the peer is known, larger after), and, once the frame's first
``HEAD_SIZE`` bytes are in, against ``frame_limit(head)`` (a limit per message
type). A frame over its limit closes the connection at once.

A frame with a payload (bulk bytes after a small header) may be delivered in
two parts: when ``payload_offset(head)`` names where its payload starts,
``partsReceived(front, payload)`` gets the two, each joined once from the
pieces read, so the payload is never copied out of a joined frame.

Sending, a large frame goes through a ``SendGate``: the next one waits until the
transport has handed it to the kernel, so at most one is copied at a time.
"""

from collections import deque
from struct import Struct

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

_PREFIX = Struct("!I")


class FrameReceiver(Int32StringReceiver):
    """An ``Int32StringReceiver`` whose buffering is linear in the bytes received."""

    log = Logger()

    #: Subclasses set the largest legal frame; a connection may change it (``self.MAX_LENGTH``).
    MAX_LENGTH = 1024 * 1024
    #: Bytes of a frame's start that ``frame_limit`` and ``payload_offset`` need (0: they
    #: are not asked).
    HEAD_SIZE = 0

    def frame_limit(self, head: bytes) -> int:
        """The largest legal length of a frame that starts with ``head`` (``HEAD_SIZE`` bytes);
        ``MAX_LENGTH`` bounds every frame anyway."""
        return self.MAX_LENGTH

    def payload_offset(self, head: bytes) -> int | None:
        """Where the payload of a frame that starts with ``head`` begins, to have the frame
        delivered in two parts (``partsReceived``); None (the default) delivers it whole.
        A subclass that says where implements ``partsReceived``."""
        return None

    def connectionMade(self):
        self._pieces: deque[bytes] = deque()
        self._head_offset = 0
        self._buffered = 0
        self._frame_length: int | None = None
        self._head_checked = False
        self._payload_offset: int | None = None
        self._refused = False
        self.send_gate = SendGate(self.transport)
        self._refused_limit: int | None = None

    def _take(self, count: int) -> bytes:
        """Remove and return the next ``count`` buffered bytes."""
        parts = []
        needed = count
        while needed:
            head = self._pieces[0]
            available = len(head) - self._head_offset
            if available <= needed:
                if self._head_offset:
                    parts.append(memoryview(head)[self._head_offset :])
                else:
                    parts.append(head)
                self._pieces.popleft()
                self._head_offset = 0
                needed -= available
            else:
                end = self._head_offset + needed
                parts.append(memoryview(head)[self._head_offset : end])
                self._head_offset = end
                needed = 0
        self._buffered -= count
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _peek(self, count: int) -> bytes:
        """The next ``count`` buffered bytes, left in the buffer."""
        found, offset = b"", self._head_offset
        for piece in self._pieces:
            found += piece[offset : offset + count - len(found)]
            offset = 0
            if len(found) == count:
                break
        return found

    def dataReceived(self, data: bytes):
        if self._refused:
            return  # (bytes that were on their way when the connection was aborted)
        if data:
            self._pieces.append(data)
            self._buffered += len(data)
        while not self.paused and self.transport is not None and not self._refused:
            if self._frame_length is None:
                if self._buffered < _PREFIX.size:
                    return
                (length,) = _PREFIX.unpack(self._take(_PREFIX.size))
                if length > self.MAX_LENGTH:
                    self._refuse(length, self.MAX_LENGTH)
                    return
                self._frame_length = length
                self._head_checked = not self.HEAD_SIZE or length < self.HEAD_SIZE
            if not self._head_checked:
                if self._buffered < self.HEAD_SIZE:
                    return
                head = self._peek(self.HEAD_SIZE)
                limit = self.frame_limit(head)
                if self._frame_length > limit:
                    self._refuse(self._frame_length, limit)
                    return
                self._head_checked = True
                self._payload_offset = self.payload_offset(head)
            if self._buffered < self._frame_length:
                return
            length, split = self._frame_length, self._payload_offset
            self._frame_length = self._payload_offset = None
            if split is not None and 0 < split < length:
                front = self._take(split)
                self.partsReceived(front, self._take(length - split))
            else:
                self.stringReceived(self._take(length))

    def _refuse(self, length: int, limit: int):
        self._refused = True
        self._refused_limit = limit
        self._pieces.clear()
        self._buffered = 0
        self.lengthLimitExceeded(length)

    def lengthLimitExceeded(self, length: int):
        peer = self.transport.getPeer() if self.transport else None
        self.log.warn(
            "closing connection from {peer}: frame of {length} bytes exceeds {limit}",
            peer=peer,
            length=length,
            limit=self._refused_limit or self.MAX_LENGTH,
        )
        self._refused = True
        self._pieces.clear()
        self._buffered = 0
        self.transport.abortConnection()

    def sendFrame(self, *parts: bytes):
        """Send one frame made of ``parts`` without joining them first."""
        length = sum(len(p) for p in parts)
        if length > self.MAX_LENGTH:
            raise ValueError(f"frame of {length} bytes exceeds {self.MAX_LENGTH}")
        if length >= GATED_FRAME:
            self.send_gate.write([_PREFIX.pack(length), *parts])
        else:
            self.transport.writeSequence([_PREFIX.pack(length), *parts])


#: Frames from this size on go through the ``SendGate``.
GATED_FRAME = 64 * 1024


@implementer(IPushProducer)
class SendGate:
    """Says when a transport has passed the last large frame written to the kernel.

    A transport keeps what it is given in a list and joins all of it into one buffer
    when it next writes: packs written back to back are copied whole, all at once (a
    client backing up 50,000 files peaked 6 MiB higher for it). Whoever sends large
    frames waits in ``wait`` first, so a transport holds one at a time.

    The gate is the transport's producer only while a frame it wrote is buffered: the
    transport pauses it when the frame is written and resumes it once the frame is out.
    It is not registered otherwise, because a registered producer holds a closing TLS
    connection open. Where another producer is registered, frames are written ungated.
    """

    def __init__(self, transport):
        self.transport = transport
        self.paused = False
        self._waiting: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        """Fires once no large frame is buffered (or the connection is gone)."""
        if not self.paused:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def write(self, parts: list[bytes]):
        try:
            self.transport.registerProducer(self, True)
        except RuntimeError:  # another producer is registered: it paces this transport
            self.transport.writeSequence(parts)
            return
        self.transport.writeSequence(parts)  # pauses this gate when it fills the buffer
        if not self.paused:
            self.transport.unregisterProducer()

    # IPushProducer, called by the transport about its write buffer.
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.transport.unregisterProducer()
        self._release()

    def stopProducing(self):
        """The connection is lost: whoever waits goes on (and finds it closed)."""
        self.paused = False
        self._release()

    def _release(self):
        # One at a time: a waiter that writes a large frame pauses the gate again.
        while self._waiting and not self.paused:
            self._waiting.pop(0).callback(None)
