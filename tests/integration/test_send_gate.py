"""SendGate over real TCP: a connection's transport holds one large frame at a time.

The receiving side stops reading and both sockets get small kernel buffers, so a large
frame stays in the sender's transport until the receiver reads again.
"""

import socket

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from sdbackup.protocols.framing import GATED_FRAME, FrameReceiver

LARGE = 2 * 1024 * 1024
SMALL_SOCKET_BUFFER = 32 * 1024


class Frames(FrameReceiver):
    """Keeps the frames it receives; ``arrived(n)`` fires once it has ``n``."""

    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self):
        self.frames: list[bytes] = []
        self.lost = defer.Deferred()
        self._until: list[tuple[int, defer.Deferred]] = []

    def connectionMade(self):
        super().connectionMade()
        sock = self.transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)

    def stringReceived(self, frame: bytes):
        self.frames.append(frame)
        self._fire()

    def arrived(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        self._until.append((n, d))
        self._fire()
        return d.addTimeout(10, reactor)

    def _fire(self):
        for n, d in [w for w in self._until if len(self.frames) >= w[0]]:
            self._until.remove((n, d))
            d.callback(self.frames)

    def connectionLost(self, reason=None):
        self.lost.callback(None)


@pytest_twisted.async_yield_fixture
async def pair():
    """A sender and a receiver that does not read, on loopback; closed after the test."""
    accepted = defer.Deferred()

    def build(_addr):
        proto = Frames()
        reactor.callLater(0, accepted.callback, proto)
        return proto

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(_Factory(build))
    sender = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Frames())
    receiver = await accepted
    receiver.transport.pauseProducing()
    try:
        yield sender, receiver
    finally:
        if not sender.lost.called:
            sender.transport.abortConnection()  # a frame may still wait on a receiver not reading
        await sender.lost
        await port.stopListening()


class _Factory(Factory):
    def __init__(self, build):
        self.build = build

    def buildProtocol(self, addr):
        return self.build(addr)


def payload(tag: int, size: int = LARGE) -> bytes:
    return bytes([tag]) * size


@pytest_twisted.ensureDeferred
async def test_a_second_large_frame_waits_until_the_first_has_left_the_transport(pair):
    sender, receiver = pair
    sender.sendFrame(b"head", payload(1))
    next_frame = sender.send_gate.wait()
    await deferLater(reactor, 0.2, lambda: None)
    assert not next_frame.called  # the receiver reads nothing: the frame is still buffered

    receiver.transport.resumeProducing()
    await next_frame  # the transport passed the first frame to the kernel
    sender.sendFrame(b"head", payload(2))
    frames = await receiver.arrived(2)
    assert frames == [b"head" + payload(1), b"head" + payload(2)]


@pytest_twisted.ensureDeferred
async def test_senders_waiting_together_go_one_at_a_time(pair):
    sender, receiver = pair
    sender.sendFrame(b"head", payload(1))
    first, second = sender.send_gate.wait(), sender.send_gate.wait()
    first.addCallback(lambda _: sender.sendFrame(b"head", payload(2)))
    # Whether a frame is still buffered when the second sender is let go:
    second.addCallback(lambda _: sender.send_gate.paused)
    receiver.transport.resumeProducing()
    await first
    assert await second.addTimeout(10, reactor) is False  # only once the first's frame left
    sender.sendFrame(b"head", payload(3))
    frames = await receiver.arrived(3)
    assert [f[4] for f in frames] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_small_frames_are_not_held_back(pair):
    sender, receiver = pair
    for n in range(50):
        sender.sendFrame(b"x" * (GATED_FRAME // 2), bytes([n]))
    assert sender.send_gate.wait().called
    receiver.transport.resumeProducing()
    frames = await receiver.arrived(50)
    assert [f[-1] for f in frames] == list(range(50))


@pytest_twisted.ensureDeferred
async def test_a_waiting_sender_goes_on_when_the_connection_is_lost(pair):
    sender, receiver = pair
    sender.sendFrame(b"head", payload(1))
    waiting = sender.send_gate.wait()
    receiver.transport.abortConnection()
    await waiting.addTimeout(10, reactor)  # released, not left hanging
    await sender.lost


@pytest_twisted.ensureDeferred
async def test_a_connection_closes_after_its_gated_frames_are_sent(pair):
    """The gate lets go of the transport once a frame is out: a close is not held up."""
    sender, receiver = pair
    sender.sendFrame(b"head", payload(1))
    sender.transport.loseConnection()
    receiver.transport.resumeProducing()
    frames = await receiver.arrived(1)
    assert frames == [b"head" + payload(1)]
    await sender.lost.addTimeout(10, reactor)
    await receiver.lost.addTimeout(10, reactor)
