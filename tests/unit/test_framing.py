"""FrameReceiver: the linear-buffer ``Int32StringReceiver`` under every protocol."""

from struct import pack

import pytest
from twisted.internet.testing import StringTransport

from sdbackup.protocols.framing import FrameReceiver


class Recorder(FrameReceiver):
    """Keeps every frame it receives."""

    MAX_LENGTH = 1000

    def __init__(self):
        self.frames = []

    def stringReceived(self, frame):
        self.frames.append(frame)


class PausingRecorder(Recorder):
    """Pauses itself after every frame, as a consumer with a full buffer would."""

    def stringReceived(self, frame):
        super().stringReceived(frame)
        self.pauseProducing()


def framed(*frames: bytes) -> bytes:
    return b"".join(pack("!I", len(f)) + f for f in frames)


def connected(cls=Recorder):
    proto = cls()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def pieces(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)]


FRAMES = [b"", b"x", bytes(range(256)) * 3, b"hello world", b"\x00\x00\x00\x05", b"y" * 1000]


def test_frames_split_across_reads(subtests):
    for read_size in (1, 2, 3, 5, 7, 64, 1000, 4096):
        with subtests.test(read_size=read_size):
            proto, transport = connected()
            for piece in pieces(framed(*FRAMES), read_size):
                proto.dataReceived(piece)
            assert proto.frames == FRAMES
            assert not transport.disconnecting


def test_several_frames_in_one_read():
    proto, _ = connected()
    proto.dataReceived(framed(*FRAMES))
    assert proto.frames == FRAMES


def test_partial_frame_waits_for_the_rest():
    proto, _ = connected()
    data = framed(b"first", b"second")
    proto.dataReceived(data[:-3])
    assert proto.frames == [b"first"]
    proto.dataReceived(data[-3:])
    assert proto.frames == [b"first", b"second"]


def test_frames_are_bytes():
    proto, _ = connected()
    data = framed(b"abcdef", b"ghij")
    for piece in pieces(data, 3):
        proto.dataReceived(piece)
    assert [type(f) for f in proto.frames] == [bytes, bytes]


def test_frame_of_exactly_max_length_is_accepted():
    proto, transport = connected()
    big = bytes(range(250)) * 4
    assert len(big) == Recorder.MAX_LENGTH
    proto.dataReceived(framed(big, b"after"))
    assert proto.frames == [big, b"after"]
    assert not transport.disconnecting


def test_oversize_length_prefix_aborts_the_connection():
    proto, transport = connected()
    proto.dataReceived(framed(b"ok") + pack("!I", Recorder.MAX_LENGTH + 1) + b"z" * 10)
    assert proto.frames == [b"ok"]
    assert transport.disconnected  # StringTransport's mark of abortConnection


def test_huge_length_prefix_aborts_before_any_body_arrives():
    proto, transport = connected()
    proto.dataReceived(pack("!I", 0xFFFFFFFF))
    assert transport.disconnected
    assert proto.frames == []


def test_frames_after_an_oversize_prefix_are_not_delivered():
    proto, transport = connected()
    proto.dataReceived(pack("!I", Recorder.MAX_LENGTH + 1) + framed(b"smuggled"))
    assert transport.disconnected
    assert proto.frames == []


def test_pause_holds_frames_back_and_resume_delivers_them():
    proto, transport = connected(PausingRecorder)
    proto.dataReceived(framed(b"one", b"two", b"three"))
    assert proto.frames == [b"one"]
    assert transport.producerState == "paused"
    proto.dataReceived(framed(b"four"))
    assert proto.frames == [b"one"]
    proto.resumeProducing()
    assert proto.frames == [b"one", b"two"]
    proto.resumeProducing()
    proto.resumeProducing()
    assert proto.frames == [b"one", b"two", b"three", b"four"]
    proto.resumeProducing()
    assert proto.frames == [b"one", b"two", b"three", b"four"]


def test_paused_receiver_delivers_nothing_until_resumed():
    proto, transport = connected()
    proto.pauseProducing()
    for piece in pieces(framed(b"a", b"bb", b"ccc"), 2):
        proto.dataReceived(piece)
    assert proto.frames == []
    proto.resumeProducing()
    assert transport.producerState == "producing"
    assert proto.frames == [b"a", b"bb", b"ccc"]


def test_send_frame_writes_a_length_prefix_and_the_parts():
    proto, transport = connected()
    proto.sendFrame(b"head", b"", b"payload")
    assert transport.value() == pack("!I", 11) + b"headpayload"
    receiver, _ = connected()
    receiver.dataReceived(transport.value())
    assert receiver.frames == [b"headpayload"]


def test_send_frame_refuses_an_oversize_frame():
    proto, transport = connected()
    with pytest.raises(ValueError):
        proto.sendFrame(b"a" * 600, b"b" * 401)
    assert transport.value() == b""


# --- limits checked before a frame is buffered ------------------------------------------


class TypedRecorder(Recorder):
    """Frames whose first byte names a type; type ``b"s"`` frames are small (10 bytes)."""

    MAX_LENGTH = 1000
    HEAD_SIZE = 1

    def frame_limit(self, head):
        return 10 if head == b"s" else self.MAX_LENGTH


def test_max_length_changed_at_run_time_applies_to_the_next_frame():
    proto, transport = connected()
    proto.MAX_LENGTH = 10  # e.g. before the peer is authenticated
    proto.dataReceived(framed(b"x" * 10))
    proto.MAX_LENGTH = 500  # after
    proto.dataReceived(framed(b"y" * 500))
    assert proto.frames == [b"x" * 10, b"y" * 500]
    assert Recorder.MAX_LENGTH == 1000  # (the class, and so other connections, keep theirs)
    proto.MAX_LENGTH = 10
    proto.dataReceived(pack("!I", 11))
    assert transport.disconnected


def test_an_announced_length_over_the_limit_is_refused_before_its_body_is_kept():
    proto, transport = connected()
    proto.MAX_LENGTH = 4096
    # 16 MiB announced, and the first bytes of it sent in the same read: nothing is kept.
    proto.dataReceived(pack("!I", 16 * 1024 * 1024) + b"z" * 60_000)
    assert transport.disconnected
    assert proto._buffered == 0 and not proto._pieces
    proto.dataReceived(b"z" * 60_000)  # (bytes already on their way)
    assert proto._buffered == 0 and proto.frames == []


def test_a_frame_over_its_types_limit_is_refused_once_its_type_arrives():
    proto, transport = connected(TypedRecorder)
    proto.dataReceived(framed(b"s" + b"1" * 9, b"b" + b"2" * 900))
    assert proto.frames == [b"s" + b"1" * 9, b"b" + b"2" * 900]
    proto.dataReceived(pack("!I", 11))
    assert not transport.disconnected  # (its type is not known yet)
    proto.dataReceived(b"s")
    assert transport.disconnected
    assert proto.frames == [b"s" + b"1" * 9, b"b" + b"2" * 900]


def test_a_type_limit_is_checked_with_the_type_split_across_reads():
    class TwoByteTypes(Recorder):
        HEAD_SIZE = 2

        def frame_limit(self, head):
            return 5 if head == b"ss" else self.MAX_LENGTH

    proto, transport = connected(TwoByteTypes)
    proto.dataReceived(pack("!I", 4) + b"s")
    proto.dataReceived(b"sab" + pack("!I", 1) + b"s")  # a frame shorter than a type: no check
    assert proto.frames == [b"ssab", b"s"]
    proto.dataReceived(pack("!I", 6) + b"s")
    assert not transport.disconnected
    proto.dataReceived(b"s")
    assert transport.disconnected


# --- a frame's payload delivered apart -------------------------------------------------------


class SplitRecorder(Recorder):
    """Frames whose first byte says where their payload begins."""

    HEAD_SIZE = 1

    def payload_offset(self, head):
        return head[0]

    def stringReceived(self, frame):
        self.frames.append(("whole", frame))

    def partsReceived(self, front, payload):
        self.frames.append(("parts", front, payload))


def test_a_frame_with_a_payload_arrives_in_two_parts_each_joined_once(subtests):
    with_payload = bytes([3]) + b"hd" + b"p" * 700
    no_payload = bytes([6]) + b"hdr12"  # the payload would start at its end
    at_zero = bytes([0]) + b"xyz"
    past_end = bytes([200]) + b"short"
    frames = [with_payload, no_payload, at_zero, past_end, bytes([2]) + b"h" + b"q"]
    for read_size in (1, 2, 3, 64, 4096):
        with subtests.test(read_size=read_size):
            proto, transport = connected(SplitRecorder)
            for piece in pieces(framed(*frames), read_size):
                proto.dataReceived(piece)
            assert proto.frames == [
                ("parts", with_payload[:3], with_payload[3:]), ("whole", no_payload),
                ("whole", at_zero), ("whole", past_end), ("parts", b"\x02h", b"q")]
            assert all(type(part) is bytes for found in proto.frames for part in found[1:])
            assert not transport.disconnecting
