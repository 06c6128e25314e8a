"""Property-based fuzzing of what a peer can send: the frame decoder and every message's decoder.

Whatever the bytes and however they are split into reads, a connection either
delivers frames within its limits or closes; a frame either decodes into a
valid message or is a ``DecodeError``, never another exception.
"""

import itertools
import json
from struct import pack

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sdbackup.protocols.framing import FrameReceiver
from sdbackup.protocols.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TYPE_CODE_SIZE,
    DecodeError,
    Hello,
    decode,
    encode_frame,
    frame_limit,
)
from sdbackup.protocols.peer import MessageProtocol

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Recorder(FrameReceiver):
    """Frames of the real type limits, under a small overall limit (examples stay small)."""

    MAX_LENGTH = 2000
    HEAD_SIZE = TYPE_CODE_SIZE

    def __init__(self):
        self.frames = []

    def frame_limit(self, head):
        return min(self.MAX_LENGTH, frame_limit(head) + 100)

    def stringReceived(self, frame):
        self.frames.append(frame)


def connected(proto):
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the ``cuts`` offsets: the reads a transport might deliver."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


streams = st.one_of(
    st.binary(max_size=3000),
    # Length prefixes next to bodies make frames the receiver must deal with.
    st.lists(st.tuples(st.integers(0, 2**32 - 1) | st.integers(0, 2500), st.binary(max_size=600)),
             max_size=6).map(lambda frames: b"".join(pack("!I", n) + body for n, body in frames)),
)


@FUZZ
@given(data=streams, cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_the_frame_decoder_delivers_legal_frames_or_closes(data, cuts):
    proto = Recorder()
    transport = connected(proto)
    reads = split(data, cuts)
    for read in reads:
        proto.dataReceived(read)  # never raises
        # The buffer holds at most one legal frame, its prefix and one read.
        assert proto._buffered <= proto.MAX_LENGTH + 4 + max(len(r) for r in reads)
    for frame in proto.frames:
        assert len(frame) <= proto.frame_limit(frame[:TYPE_CODE_SIZE])
    if transport.disconnected:
        assert proto._buffered == 0
    else:
        assert proto._buffered < 4 or proto._frame_length is not None


@FUZZ
@given(frames=st.lists(st.binary(max_size=90), max_size=8),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_legal_frames_arrive_whole_whatever_the_reads(frames, cuts):
    proto = Recorder()
    transport = connected(proto)
    for read in split(b"".join(pack("!I", len(f)) + f for f in frames), cuts):
        proto.dataReceived(read)
    assert proto.frames == frames
    assert not transport.disconnected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=80) | st.sampled_from(["a" * 64, "0" * 64, "tcp:a:1", "data", "client"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=20,
)
message_types = st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE_CODE))


def frame_of(code: int, header: bytes, payload: bytes = b"") -> bytes:
    return pack("!HI", code, len(header)) + header + payload


def decodes_or_refuses(frame: bytes):
    """``frame`` decodes to a message that round-trips, or is a DecodeError: nothing else."""
    try:
        msg = decode(frame)
    except DecodeError:
        return None
    again = decode(encode_frame(msg))
    assert again == msg
    return msg


@FUZZ
@given(cls=message_types, data=st.binary(max_size=300))
def test_arbitrary_bytes_of_each_type_are_refused_cleanly(cls, data):
    decodes_or_refuses(pack("!H", cls.TYPE_CODE) + data)


@FUZZ
@given(code=st.integers(0, 65535), header=json_values, payload=st.binary(max_size=20))
def test_arbitrary_json_headers_are_refused_cleanly(code, header, payload):
    decodes_or_refuses(frame_of(code, json.dumps(header).encode(), payload))


@st.composite
def headers_with_real_fields(draw):
    """A header naming the fields of a real type, with arbitrary values: reaches the
    validators and converters of each field, not just the JSON parser."""
    cls = draw(message_types)
    names = [a.name for a in attrs.fields(cls) if a.name != "payload"]
    fields = draw(st.dictionaries(st.sampled_from(names), json_values, max_size=len(names)))
    payload = draw(st.binary(max_size=20)) if "payload" in attrs.fields_dict(cls) else b""
    return cls, fields, payload


@settings(FUZZ, max_examples=100)
@given(case=headers_with_real_fields())
def test_arbitrary_field_values_of_each_type_are_refused_cleanly(case):
    cls, fields, payload = case
    msg = decodes_or_refuses(frame_of(cls.TYPE_CODE, json.dumps(fields).encode(), payload))
    assert msg is None or type(msg) is cls


class NoHandler:
    """A peer with no requests it serves: every message it gets is refused."""


HELLO = encode_frame(Hello(version=PROTOCOL_VERSION, role="client"))


@FUZZ
@given(body=st.lists(st.tuples(message_types, st.binary(max_size=200)), max_size=4),
       cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_a_connection_survives_any_frames_after_the_handshake(body, cuts):
    proto = MessageProtocol(NoHandler(), "server", clock=Clock())
    transport = connected(proto)
    frames = [HELLO] + [pack("!H", cls.TYPE_CODE) + data for cls, data in body]
    for read in split(b"".join(pack("!I", len(f)) + f for f in frames), cuts):
        proto.dataReceived(read)  # nothing escapes; a bad frame closes the connection
    assert proto.peer_role == "client"
    # This peer serves nothing and asked nothing: whatever came, valid or not, closed it.
    assert transport.disconnected == bool(body)
