"""MessageProtocol: handshake, request/answer matching, handler errors, protocol violations."""

from struct import pack, unpack

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from sdbackup import hashing
from sdbackup.protocols.messages import (
    PROTOCOL_VERSION,
    Ack,
    ChunkData,
    CommitSnapshot,
    ErrorReply,
    FetchChunk,
    HasChunks,
    Heartbeat,
    Hello,
    ListSnapshots,
    SnapshotCommitted,
    SnapshotList,
    SnapshotSummary,
    StatusRequest,
    StoreChunk,
    Ticket,
    decode,
    encode_frame,
)
from sdbackup.protocols.peer import HANDSHAKE_FRAME_SIZE, MessageProtocol, PeerPool, RemoteError

H1 = hashing.chunk_id(b"one")
H2 = hashing.chunk_id(b"two")
SNAPSHOT = hashing.object_id("snapshot", b"a snapshot")
SUMMARY = SnapshotSummary(SNAPSHOT, 1.5, "h", ["/home"], hashing.object_id("tree", b"a tree"))


class Refused(Exception):
    """An expected refusal, as services raise them."""

    code = "chunk-missing"


class Handler:
    """A service with a few handlers; remembers what it was asked."""

    def __init__(self):
        self.received = []
        self.lost = []
        self.later: dict[int, defer.Deferred] = {}

    def handle_FetchChunk(self, msg, connection):
        self.received.append(msg)
        if msg.chunk_id == H2:
            raise Refused(f"chunk {msg.chunk_id[:16]} is not held here")
        return ChunkData(request_id=msg.request_id, chunk_id=msg.chunk_id,
                         checksum=msg.chunk_id, payload=b"bytes of " + msg.chunk_id.encode())

    def handle_ListSnapshots(self, msg, connection):
        self.received.append(msg)
        return 1 / 0

    def handle_Heartbeat(self, msg, connection):
        self.received.append(msg)
        if msg.free_bytes == 0:
            raise ValueError("no space reported")
        if msg.free_bytes == 1:
            raise Refused("not registered")

    def handle_Ack(self, msg, connection):  # pragma: no cover - Ack is a reply, never dispatched
        raise AssertionError("a reply was dispatched to a handler")

    async def handle_CommitSnapshot(self, msg, connection):
        self.received.append(msg)
        d = self.later[msg.request_id] = defer.Deferred()
        return await d

    def connection_lost(self, connection):
        self.lost.append(connection)


def connected(handler=None, role="server"):
    proto = MessageProtocol(handler if handler is not None else Handler(), role)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def sent(transport) -> list:
    """The messages written to ``transport`` since the last call."""
    data = transport.value()
    transport.clear()
    messages = []
    while data:
        (length,) = unpack("!I", data[:4])
        messages.append(decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return messages


def deliver(proto, *messages):
    proto.dataReceived(b"".join(_framed(encode_frame(m)) for m in messages))


def _framed(body: bytes) -> bytes:
    return pack("!I", len(body)) + body


def greeted(handler=None, role="server", peer="client"):
    proto, transport = connected(handler, role)
    deliver(proto, Hello(version=PROTOCOL_VERSION, role=peer))
    transport.clear()
    return proto, transport


def result_of(d: defer.Deferred):
    """The result a fired Deferred carries (a Failure for an error), consuming it."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def success(d: defer.Deferred):
    result = result_of(d)
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failure(d: defer.Deferred) -> Failure:
    result = result_of(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    return result


# --- handshake -----------------------------------------------------------------


def test_hello_is_sent_first():
    proto, transport = connected(role="manager")
    assert sent(transport) == [Hello(version=PROTOCOL_VERSION, role="manager")]
    assert not proto.ready.called


def test_peer_hello_makes_the_connection_ready():
    proto, transport = connected()
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="client"))
    assert success(proto.ready) is proto
    assert proto.peer_role == "client"
    assert not transport.disconnecting


def test_hello_and_a_request_in_one_read():
    handler = Handler()
    proto, transport = connected(handler)
    transport.clear()
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="client"), FetchChunk(request_id=1, chunk_id=H1))
    assert [m.chunk_id for m in handler.received] == [H1]
    assert [type(m) for m in sent(transport)] == [ChunkData]


def test_wrong_version_closes_the_connection():
    handler = Handler()
    proto, transport = connected(handler)
    waiting = []
    proto.ready.addBoth(waiting.append)
    deliver(proto, Hello(version=PROTOCOL_VERSION + 1, role="client"),
            FetchChunk(request_id=1, chunk_id=H1))
    assert transport.disconnected
    assert handler.received == []
    assert waiting == []
    proto.connectionLost(Failure(ConnectionDone()))
    [outcome] = waiting
    assert isinstance(outcome, Failure)
    assert outcome.check(ConnectionDone)


def test_first_message_other_than_hello_closes_the_connection():
    handler = Handler()
    proto, transport = connected(handler)
    waiting = []
    proto.ready.addBoth(waiting.append)
    transport.clear()
    deliver(proto, FetchChunk(request_id=1, chunk_id=H1))
    assert transport.disconnected
    assert handler.received == []
    assert sent(transport) == []
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="client"))
    assert waiting == []  # a closed connection accepts nothing more
    proto.connectionLost(Failure(ConnectionDone()))
    [outcome] = waiting
    assert isinstance(outcome, Failure)
    assert outcome.check(ConnectionDone)


def test_server_connection_closed_before_the_handshake_logs_no_error():
    # A server-side protocol (made by a Factory) has nobody waiting on ``ready``: a port scan,
    # a health check or a client of another version must not log an unhandled error.
    proto, _ = connected(role="server")
    proto.connectionLost(Failure(ConnectionDone()))
    del proto


# --- requests and answers --------------------------------------------------------


def test_request_fires_with_the_matching_answer():
    proto, transport = greeted(role="client")
    d = proto.request(FetchChunk(chunk_id=H1))
    [request] = sent(transport)
    assert request.request_id > 0
    assert request.chunk_id == H1
    assert not d.called
    answer = ChunkData(request_id=request.request_id, chunk_id=H1, checksum=H1, payload=b"data")
    deliver(proto, answer)
    assert success(d) == answer
    assert proto.in_flight == 0


def test_answers_out_of_order_reach_their_own_requests():
    proto, transport = greeted(role="client")
    ids = [H1, H2, hashing.chunk_id(b"three")]
    waiting = [proto.request(FetchChunk(chunk_id=c)) for c in ids]
    requests = sent(transport)
    assert len({r.request_id for r in requests}) == 3
    assert proto.in_flight == 3
    for r in reversed(requests):
        deliver(proto, ChunkData(request_id=r.request_id, chunk_id=r.chunk_id, checksum=r.chunk_id,
                                 payload=r.chunk_id.encode()))
    assert [success(d).payload for d in waiting] == [c.encode() for c in ids]
    assert not transport.disconnecting


def test_error_reply_errbacks_with_remote_error():
    proto, transport = greeted(role="client")
    d = proto.request(FetchChunk(chunk_id=H1))
    [request] = sent(transport)
    deliver(proto, ErrorReply(request_id=request.request_id, code="chunk-missing", reason="not here"))
    error = failure(d).value
    assert isinstance(error, RemoteError)
    assert error.code == "chunk-missing"
    assert error.reason == "not here"
    assert not transport.disconnecting


def test_reply_answering_no_request_closes_the_connection():
    proto, transport = greeted(role="client")
    d = proto.request(FetchChunk(chunk_id=H1))
    [request] = sent(transport)
    deliver(proto, Ack(request_id=request.request_id + 100))
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionDone()))
    assert failure(d).check(ConnectionDone)


def test_second_answer_to_one_request_closes_the_connection():
    proto, transport = greeted(role="client")
    d = proto.request(ListSnapshots())
    [request] = sent(transport)
    deliver(proto, SnapshotList(request_id=request.request_id), Ack(request_id=request.request_id))
    assert success(d) == SnapshotList(request_id=request.request_id)
    assert transport.disconnected


def test_connection_loss_errbacks_pending_requests():
    handler = Handler()
    proto, _ = greeted(handler, role="client")
    first = proto.request(FetchChunk(chunk_id=H1))
    second = proto.request(ListSnapshots())
    proto.connectionLost(Failure(ConnectionLost("gone")))
    assert failure(first).check(ConnectionLost)
    assert failure(second).check(ConnectionLost)
    assert proto.in_flight == 0
    assert handler.lost == [proto]


def test_request_after_the_connection_closed_fails_at_once():
    proto, transport = greeted(role="client")
    proto.connectionLost(Failure(ConnectionDone()))
    transport.clear()
    assert failure(proto.request(ListSnapshots())).check(ConnectionLost)
    assert transport.value() == b""


def unencodable_store(field: str, value) -> StoreChunk:
    """A StoreChunk whose ticket holds ``value``, which no frame can carry (as a sender's bug
    would make it: the ticket's own checks are passed, so only the encoding fails)."""
    ticket = Ticket(chunk_ids=[H1], chain=["tcp:localhost:1"], expires=1, key_id="k1", mac=H1)
    object.__setattr__(ticket, field, value)
    return StoreChunk(chunk_id=H1, checksum=H1, ticket=ticket)


UNENCODABLE = {
    "an integer past 64 bits": ("expires", 2**64, "Integer exceeds 64-bit range"),
    "a string that is not Unicode": ("key_id", "k\udcff", "str is not valid UTF-8"),
}


@pytest.mark.parametrize(("field", "value", "why"), UNENCODABLE.values(), ids=UNENCODABLE.keys())
def test_a_request_that_cannot_be_encoded_fails_and_the_connection_serves_on(field, value, why):
    # A client backup whose PlacementRequest could not be encoded hung: the ValueError was
    # raised out of ``request`` and its Deferred stayed pending for good.
    handler = Handler()
    client, server, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(handler, "server"), lambda: MessageProtocol(None, "client"))
    d = client.request(unencodable_store(field, value))
    error = failure(d)
    assert error.check(ValueError)
    assert f"cannot encode a message: {why}" in str(error.value)
    assert client.in_flight == 0
    answered = client.request(FetchChunk(chunk_id=H1))
    pump.flush()
    assert success(answered).payload == b"bytes of " + H1.encode()
    assert [type(m) for m in handler.received] == [FetchChunk]  # nothing of the other was sent
    assert not client.transport.disconnecting and not server.transport.disconnecting


# --- handling requests ----------------------------------------------------------


def test_handler_answer_is_sent_back():
    handler = Handler()
    proto, transport = greeted(handler)
    deliver(proto, FetchChunk(request_id=41, chunk_id=H1))
    assert sent(transport) == [ChunkData(request_id=41, chunk_id=H1, checksum=H1,
                                         payload=b"bytes of " + H1.encode())]


def test_handler_exception_with_a_code_becomes_an_error_reply():
    proto, transport = greeted()
    deliver(proto, FetchChunk(request_id=5, chunk_id=H2))
    assert sent(transport) == [ErrorReply(request_id=5, code="chunk-missing",
                                          reason=f"chunk {H2[:16]} is not held here")]
    assert not transport.disconnecting


def test_unexpected_exception_becomes_internal_and_is_logged(logged_errors):
    proto, transport = greeted()
    deliver(proto, ListSnapshots(request_id=6))
    [reply] = sent(transport)
    assert isinstance(reply, ErrorReply)
    assert reply.request_id == 6
    assert reply.code == "internal"
    assert "ZeroDivisionError" in reply.reason
    assert len(logged_errors.flush(ZeroDivisionError)) == 1
    assert not transport.disconnecting


class BrokenAnswers:
    """Handlers whose answers no frame can carry (a service's bug)."""

    def handle_FetchChunk(self, msg, connection):
        answer = ChunkData(request_id=msg.request_id, chunk_id=msg.chunk_id,
                           checksum=msg.chunk_id, payload=b"data")
        if msg.chunk_id == H2:
            object.__setattr__(answer, "checksum", "not unicode \udcff")
        return answer

    def handle_ListSnapshots(self, msg, connection):
        raise BadlyCoded("no snapshots here")

    def handle_HasChunks(self, msg, connection):
        return None  # forgot its answer


class BadlyCoded(Exception):
    """A refusal whose code no ErrorReply can carry (a service's bug)."""

    code = "no\nsuch code"


def test_a_reply_that_cannot_be_encoded_fails_the_request_instead_of_hanging(logged_errors):
    client, _, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(BrokenAnswers(), "server"), lambda: MessageProtocol(None, "client"))
    broken = client.request(FetchChunk(chunk_id=H2))
    pump.flush()
    error = failure(broken).value
    assert isinstance(error, RemoteError)
    assert error.code == "internal"
    assert "the server could not send its ChunkData" in error.reason
    assert "cannot encode a message: str is not valid UTF-8" in error.reason
    assert len(logged_errors.flush(ValueError)) == 1  # a bug of the answering end: logged there
    answered = client.request(FetchChunk(chunk_id=H1))
    pump.flush()
    assert success(answered).payload == b"data"


def test_a_refusal_no_error_reply_can_carry_fails_the_request_as_internal(logged_errors):
    client, _, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(BrokenAnswers(), "server"), lambda: MessageProtocol(None, "client"))
    refused = client.request(ListSnapshots())
    pump.flush()
    error = failure(refused).value
    assert isinstance(error, RemoteError)
    assert error.code == "internal"
    assert "the server could not send its error (code holds" in error.reason
    assert error.reason.endswith("): no snapshots here")
    assert len(logged_errors.flush(ValueError)) == 1
    answered = client.request(FetchChunk(chunk_id=H1))
    pump.flush()
    assert success(answered).payload == b"data"


def test_a_request_its_handler_leaves_unanswered_fails_as_internal_at_once(logged_errors):
    # Unanswered, the requester waited for its timeout (or for good, without one).
    client, _, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(BrokenAnswers(), "server"), lambda: MessageProtocol(None, "client"))
    unanswered = client.request(HasChunks(chunk_ids=[H1]))
    pump.flush()
    error = failure(unanswered).value
    assert isinstance(error, RemoteError)
    assert (error.code, error.reason) == ("internal", "the server had no answer to HasChunks")
    assert len(logged_errors.flush(AssertionError)) == 1
    answered = client.request(FetchChunk(chunk_id=H1))
    pump.flush()
    assert success(answered).payload == b"data"


def test_failing_notification_is_logged_without_a_reply(logged_errors):
    handler = Handler()
    proto, transport = greeted(handler, role="manager", peer="server")
    deliver(proto, Heartbeat(request_id=0, free_bytes=0))
    assert sent(transport) == []
    assert len(logged_errors.flush(ValueError)) == 1
    deliver(proto, Heartbeat(request_id=0, free_bytes=10))
    assert len(handler.received) == 2
    assert not transport.disconnecting


def test_refused_notification_is_not_logged_as_an_error():
    handler = Handler()
    proto, transport = greeted(handler, role="manager", peer="server")
    deliver(proto, Heartbeat(request_id=0, free_bytes=1))
    assert sent(transport) == []
    assert len(handler.received) == 1
    # the autouse ``logged_errors`` fixture fails this test if a failure was logged


def test_asynchronous_handler_answers_when_it_finishes():
    handler = Handler()
    proto, transport = greeted(handler)
    deliver(proto, CommitSnapshot(request_id=3, snapshot_id=SNAPSHOT),
            CommitSnapshot(request_id=4, snapshot_id=SNAPSHOT))
    assert sent(transport) == []
    handler.later[4].errback(Refused("no"))
    handler.later[3].callback(SnapshotCommitted(request_id=3, snapshot=SUMMARY))
    assert sent(transport) == [ErrorReply(request_id=4, code="chunk-missing", reason="no"),
                               SnapshotCommitted(request_id=3, snapshot=SUMMARY)]


def test_answer_after_the_connection_closed_is_dropped():
    handler = Handler()
    proto, transport = greeted(handler)
    deliver(proto, CommitSnapshot(request_id=3, snapshot_id=SNAPSHOT))
    proto.connectionLost(Failure(ConnectionDone()))
    transport.clear()
    handler.later[3].callback(SnapshotCommitted(request_id=3, snapshot=SUMMARY))
    assert transport.value() == b""


def test_message_without_a_handler_closes_the_connection():
    proto, transport = greeted(Handler())
    deliver(proto, StatusRequest(request_id=1))  # Handler has no handle_StatusRequest
    assert transport.disconnected
    assert sent(transport) == []


def test_garbage_frame_closes_that_connection_only():
    handler = Handler()
    bad, bad_transport = greeted(handler)
    good, good_transport = greeted(handler)
    bad.dataReceived(_framed(pack("!HI", Ack.TYPE_CODE, 5) + b"junk!"))
    assert bad_transport.disconnected
    deliver(bad, FetchChunk(request_id=1, chunk_id=H1))
    assert handler.received == []
    deliver(good, FetchChunk(request_id=1, chunk_id=H1))
    assert not good_transport.disconnecting
    assert [type(m) for m in sent(good_transport)] == [ChunkData]
    assert sent(bad_transport) == []


def test_oversize_frame_closes_the_connection():
    proto, transport = greeted()
    proto.dataReceived(pack("!I", MessageProtocol.MAX_LENGTH + 1))
    assert transport.disconnected


# --- two protocols connected in memory ---------------------------------------------


def test_request_between_two_connected_protocols():
    handler = Handler()
    client, server, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(handler, "server"), lambda: MessageProtocol(None, "client"))
    assert success(client.ready) is client
    assert success(server.ready) is server
    assert (client.peer_role, server.peer_role) == ("server", "client")
    found = client.request(FetchChunk(chunk_id=H1))
    missing = client.request(FetchChunk(chunk_id=H2))
    pump.flush()
    assert success(found).payload == b"bytes of " + H1.encode()
    error = failure(missing).value
    assert isinstance(error, RemoteError)
    assert error.code == "chunk-missing"


def test_lost_link_errbacks_the_other_side():
    handler = Handler()
    client, server, pump = iosim.connectedServerAndClient(
        lambda: MessageProtocol(handler, "server"), lambda: MessageProtocol(None, "client"))
    pending = client.request(CommitSnapshot(snapshot_id=SNAPSHOT))
    pump.flush()
    assert len(handler.later) == 1
    server.transport.loseConnection()
    pump.flush()
    assert failure(pending).check(ConnectionDone)
    assert handler.lost == [server]


def test_each_role_announces_itself():
    for role in ("client", "server", "manager"):
        _, transport = connected(role=role)
        assert sent(transport) == [Hello(version=PROTOCOL_VERSION, role=role)]


# --- a pool of connections over loopback TCP -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pool_request_that_cannot_be_encoded_fails_and_the_link_serves_on():
    handler = Handler()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(lambda: MessageProtocol(handler, "server")))
    address = f"tcp:127.0.0.1:{port.getHost().port}"
    pool = PeerPool(reactor, None, "client", request_timeout=10)
    try:
        link = await pool.connection(address)
        with pytest.raises(ValueError, match="cannot encode a message: Integer exceeds 64-bit"):
            await pool.request(address, unencodable_store("expires", 2**64))
        assert link.in_flight == 0
        reply = await pool.request(address, FetchChunk(chunk_id=H1))
        assert reply.payload == b"bytes of " + H1.encode()
        assert await pool.connection(address) is link  # the same connection, still usable
        assert [type(m) for m in handler.received] == [FetchChunk]
    finally:
        await pool.close()
        await port.stopListening()


# --- timeouts --------------------------------------------------------------------


def test_a_request_unanswered_in_time_fails_and_a_late_answer_is_dropped():
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    proto, transport = greeted(role="client")
    d = proto.request(FetchChunk(chunk_id=H1), timeout=30, clock=clock)
    [request] = sent(transport)
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    timed_out = failure(d)
    assert timed_out.check(TimeoutError)
    assert "no answer to FetchChunk within 30 s" in str(timed_out.value)
    # The peer answers at last: the answer is dropped and the connection stays open.
    deliver(proto, ChunkData(request_id=request.request_id, chunk_id=H1, checksum=H1, payload=b"x"))
    assert not transport.disconnecting and not transport.disconnected
    later = proto.request(FetchChunk(chunk_id=H1), timeout=30, clock=clock)
    [second] = sent(transport)
    deliver(proto, ChunkData(request_id=second.request_id, chunk_id=H1, checksum=H1, payload=b"y"))
    assert success(later).payload == b"y"


# --- authorisation ------------------------------------------------------------------


def test_every_request_and_notice_has_its_senders_in_the_table():
    from sdbackup.protocols.authority import SENDERS
    from sdbackup.protocols.messages import MESSAGE_TYPES

    requests = {cls.__name__ for cls in MESSAGE_TYPES.values() if not cls.IS_REPLY} - {"Hello"}
    assert requests - set(SENDERS) == set()
    assert {name.split()[0] for name in SENDERS} <= requests


def test_a_message_from_a_role_not_allowed_is_forbidden_and_the_connection_serves_on():
    handler = Handler()
    proto, transport = greeted(handler, role="manager", peer="client")
    deliver(proto, Heartbeat(request_id=9, free_bytes=10))
    [reply] = sent(transport)
    assert (reply.request_id, reply.code) == (9, "forbidden")
    assert "a client may not send Heartbeat" in reply.reason
    assert handler.received == []
    deliver(proto, FetchChunk(request_id=10, chunk_id=H1))
    assert [type(m) for m in sent(transport)] == [ChunkData]
    assert not transport.disconnecting


def test_a_forbidden_notice_is_dropped_without_a_reply():
    handler = Handler()
    proto, transport = greeted(handler, role="manager", peer="client")
    deliver(proto, Heartbeat(request_id=0, free_bytes=10))
    assert sent(transport) == []
    assert handler.received == []


def test_check_read_data_needs_an_admin_under_tls():
    from sdbackup.protocols import authority
    from sdbackup.protocols.messages import CheckRequest

    costly = CheckRequest(request_id=1, read_data=True)
    assert authority.refusal("client", CheckRequest(request_id=1), authenticated=True) is None
    assert "only admin" in authority.refusal("client", costly, authenticated=True)
    assert authority.refusal("admin", costly, authenticated=True) is None
    # Without TLS there are no identities: a local client is trusted as an admin.
    assert authority.refusal("client", costly, authenticated=False) is None


def test_only_the_manager_orders_replication_and_verification():
    from sdbackup.protocols import authority
    from sdbackup.protocols.messages import ReplicateChunk, SyncNotices, VerifyChunks

    for msg in (ReplicateChunk(chunk_id=H1, forward_to=["tcp:localhost:1"]), VerifyChunks(),
                SyncNotices()):
        assert authority.refusal("manager", msg, authenticated=True) is None
        for role in ("client", "admin", "server"):
            assert authority.refusal(role, msg, authenticated=True) is not None


# --- refusing a peer -------------------------------------------------------------------


def test_a_peer_of_a_role_not_expected_is_told_why_and_closed():
    proto = MessageProtocol(Handler(), "client", expect=("manager",))
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="server"))
    [refusal] = sent(transport)
    assert (refusal.request_id, refusal.code) == (0, "forbidden")
    assert "a manager was expected here, not a server" in refusal.reason
    assert transport.disconnecting
    assert not proto.ready.called


def test_a_refusal_from_the_peer_fails_every_request_with_its_reason():
    proto, transport = greeted(role="client", peer="manager")
    pending = proto.request(ListSnapshots())
    deliver(proto, ErrorReply(request_id=0, code="forbidden", reason="the manager refused this "
                              "connection: its certificate is a client's, but it said it is a server"))
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    error = failure(pending).value
    assert isinstance(error, RemoteError)
    assert error.code == "forbidden"
    assert "its certificate is a client's" in error.reason
    assert failure(proto.request(ListSnapshots())).value is error


# --- hostile connections ---------------------------------------------------------------


def test_only_small_frames_are_read_before_the_hello():
    proto, transport = connected()
    proto.dataReceived(pack("!I", 16 * 1024 * 1024))  # announces 16 MiB, sends nothing more
    assert transport.disconnected


def test_large_frames_are_read_once_the_hello_is_accepted():
    proto, transport = greeted(role="client", peer="server")
    d = proto.request(FetchChunk(chunk_id=H1))
    [request] = sent(transport)
    deliver(proto, ErrorReply(request_id=request.request_id, code="chunk-missing", reason="x" * 5000))
    error = failure(d).value
    assert error.code == "chunk-missing"
    assert len(error.reason) > HANDSHAKE_FRAME_SIZE
    assert not transport.disconnecting


def test_no_handshake_within_the_timeout_closes_the_connection():
    from twisted.internet.task import Clock

    clock = Clock()
    proto = MessageProtocol(Handler(), "server", clock=clock, handshake_timeout=30)
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(29)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_a_handshake_in_time_cancels_the_timeout():
    from twisted.internet.task import Clock

    clock = Clock()
    proto = MessageProtocol(Handler(), "server", clock=clock, handshake_timeout=30)
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(10)
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="client"))
    clock.advance(60)
    assert not transport.disconnecting


def test_an_idle_connection_is_closed_but_not_one_with_work_in_flight():
    from twisted.internet.task import Clock

    clock = Clock()
    handler = Handler()
    proto = MessageProtocol(handler, "server", clock=clock, idle_timeout=100)
    transport = StringTransport()
    proto.makeConnection(transport)
    deliver(proto, Hello(version=PROTOCOL_VERSION, role="client"))
    deliver(proto, CommitSnapshot(request_id=3, snapshot_id=SNAPSHOT))  # still being handled
    clock.advance(250)
    assert not transport.disconnecting
    handler.later[3].callback(SnapshotCommitted(request_id=3, snapshot=SUMMARY))
    sent(transport)
    clock.advance(99)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    [notice] = sent(transport)  # the peer learns it may connect again
    assert (notice.request_id, notice.code) == (0, "idle")
