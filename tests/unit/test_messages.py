"""The message codec: every type round-trips, payloads travel raw, bad frames are refused."""

import base64
import json
from struct import Struct

import pytest

from sdbackup import hashing
from sdbackup.protocols.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    BeginSnapshot,
    CheckReport,
    CheckRequest,
    ChunkData,
    ChunkInventory,
    ChunkList,
    ChunkNeed,
    ChunkRef,
    ChunksAdded,
    ChunksCorrupt,
    ChunksHeld,
    ChunksStored,
    ChunkStored,
    ClusterStatus,
    CommitFiles,
    DecodeError,
    ErrorReply,
    FetchChunk,
    FileEntry,
    FileList,
    FinishSnapshot,
    HasChunks,
    Heartbeat,
    Hello,
    ListChunks,
    ListFiles,
    ListSnapshots,
    Placement,
    PlacementRequest,
    RegisterServer,
    ReplicateChunk,
    ServerState,
    SnapshotBegun,
    SnapshotFinished,
    SnapshotList,
    SnapshotSummary,
    StageChunks,
    StatusRequest,
    StoreChunk,
    StoreChunks,
    StoredChunk,
    VerifyChunks,
    VerifyReport,
    decode,
    encode,
    encode_frame,
)

HEAD = Struct("!HI")
H1 = hashing.chunk_id(b"one")
H2 = hashing.chunk_id(b"two")
H3 = hashing.chunk_id(b"three")
PAYLOAD = bytes(range(256)) * 4 + b'{"json": "lookalike"}\x00\xff'
SUMMARY = SnapshotSummary("0a1b2c3d", 1700000000.25, "hôst-ü", ["home/ü/docs", "etc"], 3, 4096)
FILES = [
    FileEntry(path="home/ü/日本語.txt", kind="file", mode=0o100644, mtime_ns=1_700_000_000_123_456_789,
              size=20, file_hash=H3, chunks=[ChunkRef(H1, 10, H1), ChunkRef(H2, 10, H2)]),
    FileEntry(path="home/ü", kind="dir", mode=0o40755, mtime_ns=-5),
    FileEntry(path="home/link", kind="symlink", mode=0o120777, mtime_ns=0, link_target="../ü/日本語.txt"),
]

SAMPLES = {
    Hello: Hello(version=PROTOCOL_VERSION, role="client"),
    ErrorReply: ErrorReply(request_id=7, code="replication-failed", reason="bytes differ — ünïcödé",
                           culprit="tcp:b:2"),
    Ack: Ack(request_id=3),
    StoreChunk: StoreChunk(request_id=9, chunk_id=H1, checksum=H2,
                           forward_to=["tcp:host-b:5001", "tcp:host-c:5001"], payload=PAYLOAD),
    ChunkStored: ChunkStored(request_id=9, chunk_id=H1, checksum=H1, holders=["tcp:a:1", "tcp:b:2"]),
    FetchChunk: FetchChunk(request_id=2, chunk_id=H3),
    ChunkData: ChunkData(request_id=2, chunk_id=H3, checksum=H3, payload=b"\x00\xff\r\n" * 100),
    RegisterServer: RegisterServer(request_id=1, address="tcp:127.0.0.1:5001", free_bytes=10**13,
                                   chunk_count=12),
    ChunkInventory: ChunkInventory(request_id=4, chunk_ids=[H1, H2], final=False),
    Heartbeat: Heartbeat(request_id=5, free_bytes=123, chunk_count=2),
    PlacementRequest: PlacementRequest(request_id=6, chunks=[ChunkNeed(H1, 10), ChunkNeed(H2, 0)],
                                       exclude=["tcp:c:3"]),
    Placement: Placement(request_id=6, known=[H1], assignments={H2: ["tcp:a:1", "tcp:b:2"]},
                         replicas=3),
    BeginSnapshot: BeginSnapshot(request_id=7, host="hôst-ü", paths=["home/ü/docs", "etc"]),
    SnapshotBegun: SnapshotBegun(request_id=7, snapshot_id="0a1b2c3d"),
    CommitFiles: CommitFiles(request_id=8, snapshot_id="0a1b2c3d",
                             chunks=[StoredChunk(H1, 10, H1, ["tcp:a:1", "tcp:b:2"]),
                                     StoredChunk(H2, 10, H2, ["tcp:c:3"])],
                             files=FILES),
    FinishSnapshot: FinishSnapshot(request_id=9, snapshot_id="0a1b2c3d"),
    SnapshotFinished: SnapshotFinished(request_id=9, snapshot=SUMMARY),
    ListSnapshots: ListSnapshots(request_id=10),
    SnapshotList: SnapshotList(request_id=10, snapshots=[
        SUMMARY, SnapshotSummary("ffeeddcc", 1700000100, "other", [], 0, 0)]),
    ListFiles: ListFiles(request_id=11, snapshot="0a1b", after="home/ü", limit=50),
    FileList: FileList(request_id=11, snapshot_id="0a1b2c3d", files=FILES,
                       holders={H1: ["tcp:a:1"], H2: ["tcp:b:2", "tcp:c:3"]}, more=True),
    StageChunks: StageChunks(request_id=13, snapshot_id="0a1b2c3d", path="home/ü/big",
                             first_chunk=4096, chunks=[ChunkRef(H1, 10, H1), ChunkRef(H2, 10, H2)]),
    ListChunks: ListChunks(request_id=14, snapshot_id="0a1b2c3d", path="home/ü/big", first_chunk=4096,
                           limit=100),
    ChunkList: ChunkList(request_id=14, chunks=[ChunkRef(H1, 10, H1)], holders={H1: ["tcp:a:1"]},
                         more=True),
    ReplicateChunk: ReplicateChunk(request_id=15, chunk_id=H1, forward_to=["tcp:b:2", "tcp:c:3"]),
    ChunksAdded: ChunksAdded(chunk_ids=[H1, H2]),
    ChunksCorrupt: ChunksCorrupt(chunk_ids=[H3]),
    VerifyChunks: VerifyChunks(request_id=16, read_data=True),
    VerifyReport: VerifyReport(request_id=16, held=12, corrupt=[H2]),
    CheckRequest: CheckRequest(request_id=17, read_data=False),
    CheckReport: CheckReport(request_id=17, servers_checked=["tcp:a:1"], servers_unreachable=["tcp:b:2"],
                             chunks=10, missing=1, under_replicated=2, corrupt=3),
    StoreChunks: StoreChunks(request_id=19, chunks=[ChunkRef(H1, 3, H1), ChunkRef(H2, 2, H2)],
                             forward_to=["tcp:b:2"], payload=b"abcde"),
    ChunksStored: ChunksStored(request_id=19, chunk_ids=[H1, H2], holders=["tcp:a:1", "tcp:b:2"]),
    HasChunks: HasChunks(request_id=18, chunk_ids=[H1, H2]),
    ChunksHeld: ChunksHeld(request_id=18, chunk_ids=[H2]),
    StatusRequest: StatusRequest(request_id=12),
    ClusterStatus: ClusterStatus(request_id=12, replicas=2, servers=[
        ServerState("tcp:a:1", True, 1000, 3, 1700000000.5),
        ServerState("tcp:b:2", False, 0, 0, 0)], chunks=3, under_replicated=1, missing=1),
}


def frame(code: int, header: bytes, payload: bytes = b"") -> bytes:
    return HEAD.pack(code, len(header)) + header + payload


def header_of(frame_bytes: bytes) -> dict:
    _, length = HEAD.unpack_from(frame_bytes)
    return json.loads(frame_bytes[HEAD.size : HEAD.size + length])


def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(MESSAGE_TYPES.values())


def test_round_trip(subtests):
    for cls in sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE_CODE):
        with subtests.test(msg=cls.__name__):
            msg = SAMPLES[cls]
            decoded = decode(encode_frame(msg))
            assert type(decoded) is cls
            assert decoded == msg


def test_round_trip_keeps_nested_records_typed():
    decoded = decode(encode_frame(SAMPLES[CommitFiles]))
    assert all(isinstance(c, StoredChunk) for c in decoded.chunks)
    assert all(isinstance(f, FileEntry) for f in decoded.files)
    assert decoded.files[0].chunks == [ChunkRef(H1, 10, H1), ChunkRef(H2, 10, H2)]
    assert decoded.files[0].path == "home/ü/日本語.txt"
    status = decode(encode_frame(SAMPLES[ClusterStatus]))
    assert all(isinstance(s, ServerState) for s in status.servers)
    assert isinstance(decode(encode_frame(SAMPLES[SnapshotFinished])).snapshot, SnapshotSummary)


def test_type_codes_are_on_the_wire():
    for code, cls in MESSAGE_TYPES.items():
        assert HEAD.unpack_from(encode_frame(SAMPLES[cls]))[0] == code


@pytest.mark.parametrize("cls", [StoreChunk, ChunkData], ids=lambda c: c.__name__)
def test_payload_travels_raw_after_the_header(cls):
    msg = SAMPLES[cls]
    parts = encode(msg)
    data = b"".join(parts)
    _, header_length = HEAD.unpack_from(data)
    assert len(data) == HEAD.size + header_length + len(msg.payload)
    assert data.endswith(msg.payload)
    assert parts[-1] is msg.payload  # handed to the transport as is, never copied into the header
    assert "payload" not in header_of(data)
    assert base64.b64encode(msg.payload) not in data


def test_empty_payload_round_trips():
    msg = StoreChunk(request_id=1, chunk_id=H1, checksum=H1, payload=b"")
    assert decode(encode_frame(msg)) == msg


def test_non_ascii_text_is_utf8_not_escaped():
    data = encode_frame(SAMPLES[BeginSnapshot])
    assert "hôst-ü".encode() in data


def test_decode_accepts_a_payload_frame_built_by_hand():
    header = json.dumps({"request_id": 4, "chunk_id": H1, "checksum": H1}).encode()
    msg = decode(frame(ChunkData.TYPE_CODE, header, b"raw bytes"))
    assert msg == ChunkData(request_id=4, chunk_id=H1, checksum=H1, payload=b"raw bytes")


# --- decode errors -----------------------------------------------------------


def test_frame_shorter_than_a_head():
    for data in (b"", b"\x00", b"\x00\x03\x00\x00\x00"):
        with pytest.raises(DecodeError):
            decode(data)


def test_truncated_frame():
    data = encode_frame(SAMPLES[CommitFiles])
    with pytest.raises(DecodeError):
        decode(data[:-1])


def test_header_length_past_the_end():
    with pytest.raises(DecodeError, match="past the end"):
        decode(HEAD.pack(Ack.TYPE_CODE, 1000) + b'{"request_id":1}')


def test_garbage_header(subtests):
    for header in (b"not json", b"{", b'{"request_id":1', b"\xff\xfe\xfd", b"", b'{"request_id":1}x'):
        with subtests.test(header=header), pytest.raises(DecodeError):
            decode(frame(Ack.TYPE_CODE, header))


def test_header_not_an_object(subtests):
    for header in (b"[1, 2]", b"3", b'"text"', b"null", b"true"):
        with subtests.test(header=header), pytest.raises(DecodeError, match="not an object"):
            decode(frame(Ack.TYPE_CODE, header))


def test_unknown_type_code():
    for code in (0, 4, 999, 65535):
        with pytest.raises(DecodeError, match="unknown message type"):
            decode(frame(code, b"{}"))


def test_unknown_field():
    with pytest.raises(DecodeError, match="unknown fields"):
        decode(frame(Ack.TYPE_CODE, b'{"request_id":1,"sneaky":2}'))


def test_payload_field_in_the_header_of_a_message_without_one():
    with pytest.raises(DecodeError):
        decode(frame(Ack.TYPE_CODE, b'{"request_id":1,"payload":"aGk="}'))


def test_payload_on_a_message_without_a_payload_field():
    with pytest.raises(DecodeError, match="carries no payload"):
        decode(encode_frame(Ack(request_id=1)) + b"extra")


BAD_HEADERS = {
    "chunk id path": (FetchChunk, {"request_id": 1, "chunk_id": "../../etc/passwd"}),
    "chunk id uppercase": (FetchChunk, {"request_id": 1, "chunk_id": H1.upper()}),
    "chunk id short": (FetchChunk, {"request_id": 1, "chunk_id": H1[:-2]}),
    "chunk id long": (FetchChunk, {"request_id": 1, "chunk_id": H1 + "00"}),
    "chunk id number": (FetchChunk, {"request_id": 1, "chunk_id": 12}),
    "checksum not hex": (StoreChunk, {"request_id": 1, "chunk_id": H1, "checksum": "z" * 64}),
    "negative request id": (Ack, {"request_id": -1}),
    "string request id": (Ack, {"request_id": "1"}),
    "float request id": (Ack, {"request_id": 1.5}),
    "negative free bytes": (RegisterServer, {"request_id": 1, "address": "a", "free_bytes": -1}),
    "address not a string": (RegisterServer, {"request_id": 1, "address": ["a"]}),
    "forward_to not strings": (StoreChunk, {"chunk_id": H1, "checksum": H1, "forward_to": [1]}),
    "forward_to a string": (StoreChunk, {"chunk_id": H1, "checksum": H1, "forward_to": "tcp:a:1"}),
    "final not a bool": (ChunkInventory, {"chunk_ids": [], "final": "yes"}),
    "inventory not hex": (ChunkInventory, {"chunk_ids": ["nothex"]}),
    "inventory not a list": (ChunkInventory, {"chunk_ids": H1}),
    "limit zero": (ListFiles, {"limit": 0}),
    "limit huge": (ListFiles, {"limit": 10**9}),
    "unknown role": (Hello, {"version": 1, "role": "admin"}),
    "missing version": (Hello, {"role": "client"}),
    "string version": (Hello, {"version": "1", "role": "client"}),
    "negative chunk size": (PlacementRequest, {"chunks": [[H1, -1]]}),
    "chunk size over the maximum": (PlacementRequest, {"chunks": [[H1, 10**12]]}),
    "chunk need as object": (PlacementRequest, {"chunks": [{"chunk_id": H1, "size": 1}]}),
    "chunk need too short": (PlacementRequest, {"chunks": [[H1]]}),
    "chunks not a list": (PlacementRequest, {"chunks": {}}),
    "assignment key not hex": (Placement, {"assignments": {"abc": ["tcp:a:1"]}}),
    "assignment not a list": (Placement, {"assignments": {H1: "tcp:a:1"}}),
    "assignment holders not strings": (Placement, {"assignments": {H1: [1]}}),
    "assignments a list": (Placement, {"assignments": [H1]}),
    "file kind": (CommitFiles, {"files": [{"path": "a", "kind": "device", "mode": 0, "mtime_ns": 0}]}),
    "file negative size": (CommitFiles, {"files": [
        {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0, "size": -1}]}),
    "file unknown field": (CommitFiles, {"files": [
        {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0, "owner": "root"}]}),
    "file not an object": (CommitFiles, {"files": ["a"]}),
    "file path not a string": (CommitFiles, {"files": [
        {"path": 1, "kind": "file", "mode": 0, "mtime_ns": 0}]}),
    "file chunk ref bad id": (CommitFiles, {"files": [
        {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0, "chunks": [["x", 1, H1]]}]}),
    "file chunk ref negative size": (CommitFiles, {"files": [
        {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0, "chunks": [[H1, -1, H1]]}]}),
    "stored chunk holders not a list": (CommitFiles, {"chunks": [
        {"chunk_id": H1, "size": 1, "checksum": H1, "holders": "tcp:a:1"}]}),
    "stored chunk missing holders": (CommitFiles, {"chunks": [{"chunk_id": H1, "size": 1, "checksum": H1}]}),
    "summary missing": (SnapshotFinished, {"request_id": 1}),
    "summary wrong type": (SnapshotFinished, {"snapshot": "0a1b2c3d"}),
    "server state alive not bool": (ClusterStatus, {"servers": [
        {"address": "a", "alive": 1, "free_bytes": 0, "chunks": 0, "last_seen": 0}]}),
    "holders map not a map": (FileList, {"holders": [[H1, ["a"]]]}),
}


def test_invalid_field_values(subtests):
    for case, (cls, fields) in BAD_HEADERS.items():
        with subtests.test(msg=case), pytest.raises(DecodeError):
            decode(frame(cls.TYPE_CODE, json.dumps(fields).encode()))


def test_an_integer_too_long_to_parse_is_a_decode_error():
    # Python refuses to convert integers of more than 4300 digits; that ValueError must not
    # escape as anything but a DecodeError, or the peer protocol does not catch it.
    with pytest.raises(DecodeError):
        decode(frame(Ack.TYPE_CODE, b'{"request_id":' + b"1" * 5000 + b"}"))


def test_deeply_nested_header_is_a_decode_error():
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(DecodeError):
        decode(frame(Ack.TYPE_CODE, b'{"request_id":' + nested + b"}"))



def test_store_chunks_pieces_follow_the_sizes():
    msg = StoreChunks(chunks=[ChunkRef(H1, 3, H1), ChunkRef(H2, 2, H2)], payload=b"abcde")
    assert [(ref.chunk_id, bytes(piece)) for ref, piece in msg.pieces()] == [(H1, b"abc"), (H2, b"de")]
    frame = encode_frame(msg)
    assert frame.endswith(b"abcde")
    with pytest.raises(DecodeError, match="add up"):
        decode(frame[:-1])
