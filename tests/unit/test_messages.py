"""The message codec: every type round-trips, payloads travel raw, bad frames are refused."""

import base64
import json
import os
from struct import Struct

import attrs
import pytest

from sdbackup import chunking, hashing, limits, sealing
from sdbackup.client import uploader
from sdbackup.protocols.authority import SENDERS, refusal
from sdbackup.protocols.messages import (
    FRAME_LIMITS,
    MAX_CHUNK_SIZE,
    MAX_FETCH_IDS,
    MAX_FRAME_SIZE,
    MAX_KEYS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TYPE_CODE_SIZE,
    Ack,
    CheckReport,
    CheckRequest,
    ChunkData,
    ChunkInventory,
    ChunkNeed,
    ChunkRef,
    ChunksAdded,
    ChunksCorrupt,
    ChunksData,
    ChunksDeleted,
    ChunksHeld,
    ChunksStored,
    ChunkStored,
    ClusterStatus,
    CommitKey,
    CommitSnapshot,
    DecodeError,
    DeleteChunks,
    DeleteSnapshots,
    DrainServer,
    ErrorReply,
    FetchChunk,
    FetchChunks,
    ForgetSnapshots,
    HasChunks,
    Heartbeat,
    HeldChunk,
    Hello,
    KeyCommitted,
    KeyList,
    ListKeys,
    ListServers,
    ListSnapshots,
    Locate,
    Locations,
    Placement,
    PlacementRequest,
    PruneRequest,
    PruneStatus,
    PruneStatusRequest,
    Registered,
    RegisterServer,
    RemoveKey,
    ReplaceSnapshot,
    ReplicateChunk,
    RetireServer,
    ServerInfo,
    ServerList,
    ServerState,
    SnapshotCommitted,
    SnapshotList,
    SnapshotsForgotten,
    SnapshotSummary,
    StatusRequest,
    StoreChunk,
    StoreChunks,
    SyncNotices,
    Ticket,
    TicketKey,
    TicketKeys,
    VerifyChunks,
    VerifyReport,
    decode,
    encode,
    encode_frame,
    frame_limit,
    max_frame_size,
    payload_offset,
)

HEAD = Struct("!HI")
H1 = hashing.chunk_id(b"one")
H2 = hashing.chunk_id(b"two")
H3 = hashing.chunk_id(b"three")
S1 = hashing.object_id("snapshot", b"a snapshot")
T1 = hashing.object_id("tree", b"a tree")
PAYLOAD = bytes(range(256)) * 4 + b'{"json": "lookalike"}\x00\xff'
SUMMARY = SnapshotSummary(S1, 1700000000.25, "hôst-ü", ["/home/ü/docs", "odd\\x01name", "etc"], T1,
                          tags=["daily", "ünï"], parent=H3, files=3, dirs=2, bytes=4096)
TICKET = Ticket(chunk_ids=[H1, H2], chain=["tcp:a:1", "tcp:b:2", "tcp:c:3"], expires=1700000600,
                key_id="k1", mac=H3)

SAMPLES = {
    Hello: Hello(version=PROTOCOL_VERSION, role="client"),
    ErrorReply: ErrorReply(request_id=7, code="replication-failed", reason="bytes differ — ünïcödé",
                           culprit="tcp:b:2"),
    Ack: Ack(request_id=3),
    StoreChunk: StoreChunk(request_id=9, chunk_id=H1, checksum=H2,
                           forward_to=["tcp:host-b:5001", "tcp:host-c:5001"], kind="tree",
                           payload=PAYLOAD),
    ChunkStored: ChunkStored(request_id=9, chunk_id=H1, checksum=H1, holders=["tcp:a:1", "tcp:b:2"]),
    FetchChunk: FetchChunk(request_id=2, chunk_id=H3),
    ChunkData: ChunkData(request_id=2, chunk_id=H3, checksum=H3, kind="snapshot",
                         payload=b"\x00\xff\r\n" * 100),
    RegisterServer: RegisterServer(request_id=1, address="tcp:127.0.0.1:5001", free_bytes=10**13,
                                   chunk_count=12),
    ChunkInventory: ChunkInventory(request_id=4, chunks=[HeldChunk(H1, 10), HeldChunk(S1, 0)],
                                   snapshots=[S1], final=False),
    Heartbeat: Heartbeat(request_id=5, free_bytes=123, chunk_count=2),
    PlacementRequest: PlacementRequest(request_id=6, chunks=[ChunkNeed(H1, 10), ChunkNeed(H2, 0)],
                                       exclude=["tcp:c:3"]),
    Placement: Placement(request_id=6, known=[H1], assignments={H2: ["tcp:a:1", "tcp:b:2"]},
                         replicas=3),
    CommitSnapshot: CommitSnapshot(request_id=7, snapshot_id=S1),
    SnapshotCommitted: SnapshotCommitted(request_id=7, snapshot=SUMMARY),
    ListSnapshots: ListSnapshots(request_id=10),
    SnapshotList: SnapshotList(request_id=10, snapshots=[
        SUMMARY, SnapshotSummary(H2, 1700000100, "other", [], T1)]),
    Locate: Locate(request_id=11, chunk_ids=[H1, S1]),
    Locations: Locations(request_id=11, holders={H1: ["tcp:a:1"], S1: ["tcp:b:2", "tcp:c:3"]}),
    ReplicateChunk: ReplicateChunk(request_id=15, chunk_id=H1, forward_to=["tcp:b:2", "tcp:c:3"],
                                   ticket=TICKET),
    ChunksAdded: ChunksAdded(chunks=[HeldChunk(H1, MAX_CHUNK_SIZE), HeldChunk(S1, 300)],
                             snapshots=[S1]),
    ChunksCorrupt: ChunksCorrupt(chunk_ids=[H3]),
    VerifyChunks: VerifyChunks(request_id=16, read_data=True),
    VerifyReport: VerifyReport(request_id=16, held=12, corrupt=[H2]),
    SyncNotices: SyncNotices(request_id=20),
    CheckRequest: CheckRequest(request_id=17, read_data=False),
    CheckReport: CheckReport(request_id=17, servers_checked=["tcp:a:1"], servers_unreachable=["tcp:b:2"],
                             chunks=10, missing=1, under_replicated=2, corrupt=3, snapshots=4,
                             trees=12, damaged=[S1]),
    StoreChunks: StoreChunks(request_id=19, chunks=[ChunkRef(H1, 3, H1), ChunkRef(H2, 2, H2)],
                             forward_to=["tcp:b:2"], kind="list", payload=b"abcde"),
    ChunksStored: ChunksStored(request_id=19, chunk_ids=[H1, H2], holders=["tcp:a:1", "tcp:b:2"]),
    HasChunks: HasChunks(request_id=18, chunk_ids=[H1, H2]),
    ChunksHeld: ChunksHeld(request_id=18, chunk_ids=[H2]),
    StatusRequest: StatusRequest(request_id=12),
    ClusterStatus: ClusterStatus(request_id=12, state="starting", replicas=2, servers=[
        ServerState("tcp:a:1", True, 1000, 3, 1700000000.5),
        ServerState("tcp:b:2", False, 0, 0, 0)], snapshots=5, chunks=3, under_replicated=1,
        missing=1),
    ForgetSnapshots: ForgetSnapshots(request_id=21, snapshot_ids=[S1, H2]),
    SnapshotsForgotten: SnapshotsForgotten(request_id=21, snapshot_ids=[S1]),
    DeleteSnapshots: DeleteSnapshots(request_id=22, snapshot_ids=[S1]),
    ReplaceSnapshot: ReplaceSnapshot(request_id=75, snapshot_id=S1, replaces=H1),
    PruneRequest: PruneRequest(request_id=60, dry_run=True),
    PruneStatusRequest: PruneStatusRequest(request_id=61),
    PruneStatus: PruneStatus(request_id=61, prune_id=2, state="sweeping", elapsed=1.5,
                             grace=86400.0, snapshots=2, objects_read=7, reachable=40,
                             unreachable=9, unreachable_bytes=9000, recent=1, swept=4,
                             deleted_chunks=4, deleted_copies=8, deleted_bytes=8100,
                             trimmed_copies=1, trimmed_bytes=1001, error="ünï"),
    DeleteChunks: DeleteChunks(request_id=63, chunk_ids=[H1, H2], min_age=86400.0),
    ChunksDeleted: ChunksDeleted(request_id=63, chunk_ids=[H1], freed_bytes=3033, kept=[H2]),
    Registered: Registered(request_id=23, ticket_keys=[TicketKey("k1", H1), TicketKey("k2", H2)]),
    TicketKeys: TicketKeys(request_id=24, ticket_keys=[TicketKey("k2", H2)]),
    ListKeys: ListKeys(request_id=80, repo="alpha"),
    KeyList: KeyList(request_id=80, key_ids=[H1, H2]),
    CommitKey: CommitKey(request_id=82, key_id=H1),
    KeyCommitted: KeyCommitted(request_id=82, key_id=H1, repo="alpha"),
    RemoveKey: RemoveKey(request_id=84, key_id=H2),
    ListServers: ListServers(request_id=65),
    ServerList: ServerList(request_id=65, replicas=2, servers=[
        ServerInfo("tcp:a:1", "0" * 32, True, 1700000000.5, 3, 3000, 10**9, 10**10, False, True,
                   False, 1, 0),
        ServerInfo("tcp:b:2", "", False, 0, 0, 0, 0, 0, False, False, True, 0, 0)]),
    DrainServer: DrainServer(request_id=67, address="tcp:a:1"),
    RetireServer: RetireServer(request_id=68, address="tcp:b:2"),
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
    inventory = decode(encode_frame(SAMPLES[ChunkInventory]))
    assert inventory.chunks == [HeldChunk(H1, 10), HeldChunk(S1, 0)]
    assert all(isinstance(c, HeldChunk) for c in inventory.chunks)
    added = decode(encode_frame(SAMPLES[ChunksAdded]))
    assert all(isinstance(c, HeldChunk) for c in added.chunks)
    status = decode(encode_frame(SAMPLES[ClusterStatus]))
    assert all(isinstance(s, ServerState) for s in status.servers)
    committed = decode(encode_frame(SAMPLES[SnapshotCommitted]))
    assert isinstance(committed.snapshot, SnapshotSummary)
    assert committed.snapshot.paths == ["/home/ü/docs", "odd\\x01name", "etc"]
    listed = decode(encode_frame(SAMPLES[SnapshotList]))
    assert all(isinstance(s, SnapshotSummary) for s in listed.snapshots)


def test_held_chunks_are_compact_pairs():
    header = header_of(encode_frame(SAMPLES[ChunksAdded]))
    assert header["chunks"] == [[H1, MAX_CHUNK_SIZE], [S1, 300]]
    assert header["snapshots"] == [S1]


def test_a_chunk_kind_defaults_to_data_and_travels():
    assert StoreChunk(chunk_id=H1, checksum=H1).kind == "data"
    assert decode(encode_frame(SAMPLES[StoreChunks])).kind == "list"
    assert header_of(encode_frame(SAMPLES[ChunkData]))["kind"] == "snapshot"


def test_an_inventory_page_of_the_largest_size_fits_a_header():
    from sdbackup.protocols.messages import MAX_HEADER_SIZE
    from sdbackup.services.server import INVENTORY_PAGE

    ids = [hashing.chunk_id(str(i).encode()) for i in range(INVENTORY_PAGE)]
    page = ChunkInventory(chunks=[HeldChunk(i, MAX_CHUNK_SIZE) for i in ids], snapshots=ids)
    _, length = HEAD.unpack_from(encode_frame(page))
    assert length < MAX_HEADER_SIZE


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
    data = encode_frame(SAMPLES[SnapshotCommitted])
    assert "hôst-ü".encode() in data


def test_a_payload_received_apart_from_its_header_is_taken_as_it_is():
    msg = SAMPLES[ChunkData]
    data = encode_frame(msg)
    offset = payload_offset(data[: HEAD.size])
    assert data[offset:] == msg.payload
    payload = bytes(data[offset:])
    decoded = decode(data[:offset], payload)
    assert decoded == msg and decoded.payload is payload  # not copied


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
    data = encode_frame(SAMPLES[SnapshotList])
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
    "final not a bool": (ChunkInventory, {"chunks": [], "final": "yes"}),
    "inventory id not hex": (ChunkInventory, {"chunks": [["nothex", 1]]}),
    "inventory not a list": (ChunkInventory, {"chunks": H1}),
    "inventory without sizes": (ChunkInventory, {"chunks": [H1]}),
    "inventory negative size": (ChunkInventory, {"chunks": [[H1, -1]]}),
    "inventory size over the maximum": (ChunkInventory, {"chunks": [[H1, MAX_CHUNK_SIZE + 1]]}),
    "inventory snapshots not hex": (ChunkInventory, {"snapshots": ["../x"]}),
    "added as plain ids": (ChunksAdded, {"chunks": [H1]}),
    "added snapshots a string": (ChunksAdded, {"snapshots": S1}),
    "unknown kind": (StoreChunk, {"chunk_id": H1, "checksum": H1, "kind": "secret"}),
    "kind not a string": (StoreChunks, {"chunks": [], "kind": 1}),
    "chunk data kind": (ChunkData, {"chunk_id": H1, "checksum": H1, "kind": "file"}),
    "commit snapshot id not hex": (CommitSnapshot, {"snapshot_id": "0a1b2c3d"}),
    "locate ids not hex": (Locate, {"chunk_ids": ["latest"]}),
    "locate id in capitals": (Locate, {"chunk_ids": [H1, H2.upper()]}),
    "locate id with a space": (Locate, {"chunk_ids": [H1, " " + H2[1:]]}),
    "locate ids cut unevenly": (Locate, {"chunk_ids": [H1[:-2], H1[-2:] + H2]}),
    "locate id not a string": (Locate, {"chunk_ids": [H1, 7]}),
    "locations holders a string": (Locations, {"holders": {H1: "tcp:a:1"}}),
    "locations holder not a string": (Locations, {"holders": {H1: ["tcp:a:1"], H2: [["tcp:b:2"]]}}),
    "locations not a map": (Locations, {"holders": [[H1, ["a"]]]}),
    "locations key not hex": (Locations, {"holders": {"x": ["a"]}}),
    "status state": (ClusterStatus, {"state": "sleeping"}),
    "check damaged not strings": (CheckReport, {"damaged": [1]}),
    "summary paths not strings": (SnapshotList, {"snapshots": [
        {"snapshot_id": S1, "time": 1, "host": "h", "paths": [b"x".hex(), 1], "tree": T1}]}),
    "summary negative files": (SnapshotList, {"snapshots": [
        {"snapshot_id": S1, "time": 1, "host": "h", "paths": [], "tree": T1, "files": -1}]}),
    "summary tree not hex": (SnapshotList, {"snapshots": [
        {"snapshot_id": S1, "time": 1, "host": "h", "paths": [], "tree": "root"}]}),
    "summary unknown field": (SnapshotList, {"snapshots": [
        {"snapshot_id": S1, "time": 1, "host": "h", "paths": [], "tree": T1, "owner": "me"}]}),
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
    "summary missing": (SnapshotCommitted, {"request_id": 1}),
    "summary wrong type": (SnapshotCommitted, {"snapshot": "0a1b2c3d"}),
    "negative replicas": (ServerList, {"replicas": -1}),
    "no replicas in a status": (ClusterStatus, {"replicas": 0}),
    "no replicas in a placement": (Placement, {"replicas": 0}),
    "no replicas in a server list": (ServerList, {"replicas": 0}),
    "chunk ref negative size": (StoreChunks, {"chunks": [[H1, -1, H1], [H2, 1, H2]]}),
    "exclude not ascii": (PlacementRequest, {"exclude": ["tcp:sérver:5001"]}),
    "holder not ascii": (Locations, {"holders": {H1: ["tcp:sérver:5001"]}}),
    "repository name a path": (ListSnapshots, {"repo": "../other"}),
    "ticket key id not ascii": (StoreChunk, {"chunk_id": H1, "checksum": H1, "ticket": {
        "chunk_ids": [H1], "chain": ["a"], "expires": 1, "key_id": "clé", "mac": H1}}),
    "ticket key name not ascii": (Registered, {"ticket_keys": [{"key_id": "clé", "secret": H1}]}),
    "server info disk id not ascii": (ServerList, {"servers": [
        {"address": "a", "disk_id": "dïsk", "alive": True, "last_seen": 1.0, "chunks": 0,
         "bytes": 0, "free_bytes": 0, "total_bytes": 0, "full": False, "draining": False,
         "retired": False, "short": 0, "only_here": 0}]}),
    "forward_to not ascii": (StoreChunk, {"chunk_id": H1, "checksum": H1,
                                          "forward_to": ["tcp:sérver:5001"]}),
    "chunk ref without its checksum": (StoreChunks, {"chunks": [[H1, 0]]}),
    "chunk ref with a fourth field": (StoreChunks, {"chunks": [[H1, 0, H1, H1]]}),
    "held chunk with a third field": (ChunkInventory, {"chunks": [[H1, 1, 1]]}),
    "registration disk id not ascii": (RegisterServer, {"address": "a", "disk_id": "dïsk"}),
    "server state alive not bool": (ClusterStatus, {"servers": [
        {"address": "a", "alive": 1, "free_bytes": 0, "chunks": 0, "last_seen": 0}]}),
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
    with pytest.raises(DecodeError, match="add up"):  # bytes after the last chunk: refused too
        decode(frame + b"f")


# --- bounds: every field a peer sends has a limit (sdbackup.limits) ---------------------

ADDRESS = "tcp:" + "a" * (limits.MAX_ADDRESS_LENGTH - 4)
#: The longest address as JSON: every character escaped.
WORST_ADDRESS = "tcp:" + '"\\' * ((limits.MAX_ADDRESS_LENGTH - 4) // 2)
OVER_LONG = {
    "address": (RegisterServer, {"address": ADDRESS + "x"}),
    "address with a newline": (RegisterServer, {"address": "tcp:a:1\nforged log line"}),
    "address with a lone surrogate": (RegisterServer, {"address": "tcp:\ud800:1"}),
    "forward chain": (StoreChunk, {"chunk_id": H1, "checksum": H1,
                                   "forward_to": ["tcp:a:1"] * (limits.MAX_REPLICAS + 1)}),
    "forwarded to a long address": (ReplicateChunk, {"chunk_id": H1, "forward_to": [ADDRESS + "x"]}),
    "holders": (ChunksStored, {"holders": ["tcp:a:1"] * (limits.MAX_REPLICAS + 1)}),
    "culprit": (ErrorReply, {"culprit": ADDRESS + "x"}),
    "error code": (ErrorReply, {"code": "c" * (limits.MAX_CODE_LENGTH + 1)}),
    "ids per request": (HasChunks, {"chunk_ids": [H1] * (limits.MAX_IDS + 1)}),
    "ids per locate": (Locate, {"chunk_ids": [H1] * (limits.MAX_LOCATE_IDS + 1)}),
    "chunks per placement": (PlacementRequest, {"chunks": [[H1, 1]] * (limits.MAX_BATCH_CHUNKS + 1)}),
    "chunks per pack": (StoreChunks, {"chunks": [[H1, 0, H1]] * (limits.MAX_BATCH_CHUNKS + 1)}),
    "inventory page": (ChunkInventory, {"chunks": [[H1, 1]] * (limits.MAX_IDS + 1)}),
    "holders per location": (Locations, {"holders": {H1: ["tcp:a:1"] * (limits.MAX_REPLICAS + 1)}}),
    "location address": (Locations, {"holders": {H1: [ADDRESS + "x"]}}),
    "assignment address": (Placement, {"assignments": {H1: ["tcp:a:1\r\n"]}}),
    "excluded servers": (PlacementRequest, {"exclude": ["tcp:a:1"] * (limits.MAX_SERVERS + 1)}),
    "status servers": (ClusterStatus, {"servers": [
        {"address": "tcp:a:1", "alive": True, "free_bytes": 0, "chunks": 0, "last_seen": 0}]
        * (limits.MAX_SERVERS + 1)}),
    "address not ASCII": (RegisterServer, {"address": "tcp:ex\u0430mple.com:1"}),
    "replicas": (Placement, {"replicas": limits.MAX_REPLICAS + 1}),
    "count beyond 64 bits": (Heartbeat, {"free_bytes": 2**63}),
    "request id beyond 64 bits": (Ack, {"request_id": 2**64}),
    "damaged not ids": (CheckReport, {"damaged": ["x" * 100]}),
    "snapshots per page": (SnapshotList, {"snapshots": [SUMMARY.to_wire()] * (
        limits.MAX_SNAPSHOTS_PER_PAGE + 1)}),
    "page limit zero": (ListSnapshots, {"limit": 0}),
    "page limit too large": (ListSnapshots, {"limit": limits.MAX_SNAPSHOTS_PER_PAGE + 1}),
    "cursor not an id": (ListSnapshots, {"after_id": "latest"}),
    "cursor time not a number": (ListSnapshots, {"after_time": "now", "after_id": S1}),
    "cursor time huge": (ListSnapshots, {"after_time": 10**300, "after_id": S1}),
}


def summary_with(**fields) -> dict:
    return {**SUMMARY.to_wire(), **fields}


OVER_LONG_SUMMARIES = {
    "host": summary_with(host="h" * (limits.MAX_HOST_LENGTH + 1)),
    "host with control characters": summary_with(host="laptop\x1b[2J"),
    "path": summary_with(paths=["/" * (limits.MAX_PATH_LENGTH + 1)]),
    "paths": summary_with(paths=["/p"] * (limits.MAX_SNAPSHOT_PATHS + 1)),
    "paths together": summary_with(paths=["/" * limits.MAX_PATH_LENGTH] * (
        limits.MAX_SNAPSHOT_TEXT // limits.MAX_PATH_LENGTH + 1)),
    "tag": summary_with(tags=["t" * (limits.MAX_TAG_LENGTH + 1)]),
    "tags": summary_with(tags=["t"] * (limits.MAX_TAGS + 1)),
    "parent not an id": summary_with(parent="x"),
    "time not finite": summary_with(time=1e400),
    "count beyond 64 bits": summary_with(files=2**63),
}


def test_over_long_or_unprintable_fields_are_decode_errors(subtests):
    for case, (cls, fields) in OVER_LONG.items():
        with subtests.test(msg=case), pytest.raises(DecodeError):
            decode(frame(cls.TYPE_CODE, json.dumps(fields).encode()))
    for case, summary in OVER_LONG_SUMMARIES.items():
        with subtests.test(msg=f"summary {case}"), pytest.raises(DecodeError):
            decode(frame(SnapshotCommitted.TYPE_CODE, json.dumps({"snapshot": summary}).encode()))


def test_fields_at_their_bounds_are_accepted(subtests):
    at_bounds = [
        RegisterServer(address=ADDRESS, free_bytes=limits.MAX_COUNT),
        StoreChunk(chunk_id=H1, checksum=H1, forward_to=[ADDRESS] * (limits.MAX_REPLICAS - 1)),
        HasChunks(chunk_ids=[H1] * limits.MAX_IDS),
        Locations(holders={H1: [ADDRESS] * limits.MAX_REPLICAS}),
        SnapshotCommitted(snapshot=SnapshotSummary(
            S1, -1.5, "h" * limits.MAX_HOST_LENGTH,
            ["/" * limits.MAX_PATH_LENGTH] * (limits.MAX_SNAPSHOT_TEXT // limits.MAX_PATH_LENGTH - 1),
            T1, tags=["t" * limits.MAX_TAG_LENGTH] * 3)),
        ListSnapshots(after_time=1700000000.123456, after_id=S1, limit=1),
    ]
    for msg in at_bounds:
        with subtests.test(msg=type(msg).__name__):
            assert decode(encode_frame(msg)) == msg


def test_json_constants_and_overflowing_numbers_are_decode_errors(subtests):
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        with subtests.test(number=number), pytest.raises(DecodeError):
            decode(frame(Heartbeat.TYPE_CODE, b'{"free_bytes":' + number + b"}"))


def test_senders_cannot_build_an_over_long_field():
    with pytest.raises(ValueError):
        RegisterServer(address=ADDRESS + "x")
    with pytest.raises(ValueError):
        HasChunks(chunk_ids=[H1] * (limits.MAX_IDS + 1))


def test_locations_of_more_chunks_than_a_page_are_refused():
    many = {hashing.chunk_id(str(i).encode()): ["a"] for i in range(limits.MAX_LOCATE_IDS + 1)}
    with pytest.raises(DecodeError, match="more than"):
        decode(frame(Locations.TYPE_CODE, json.dumps({"holders": many}).encode()))


def test_an_error_reason_of_the_longest_length_is_kept_whole():
    longest = "x" * limits.MAX_REASON_LENGTH
    assert ErrorReply(code="bad-request", reason=longest).reason == longest


def test_an_error_reason_is_cut_not_refused():
    # A long reason (about a long value) must still reach the user, not fail the reply.
    reply = ErrorReply(code="bad-request", reason="x" * 100_000 + "\udcff")
    assert len(reply.reason) == limits.MAX_REASON_LENGTH
    assert decode(encode_frame(reply)) == reply
    assert ErrorReply(reason="broken name \udcff").reason == "broken name \\udcff"


def test_a_decode_error_does_not_repeat_a_huge_value(subtests):
    # Attack 13: an 8 MiB id was logged in full with the frame's rejection.
    huge = "z" * (8 * 1024 * 1024)
    frames = {
        "chunk id": frame(StoreChunk.TYPE_CODE, json.dumps({"chunk_id": huge}).encode()),
        "id in a list": frame(ChunkInventory.TYPE_CODE,
                              json.dumps({"snapshots": [huge[:3_000_000]]}).encode()),
        "field name": frame(StoreChunk.TYPE_CODE, json.dumps({huge: 1}).encode()),
        "kind": frame(StoreChunk.TYPE_CODE, json.dumps({"chunk_id": H1, "checksum": H1,
                                                        "kind": huge}).encode()),
        "wrong type": frame(StoreChunk.TYPE_CODE, json.dumps({"chunk_id": H1, "checksum": H1,
                                                              "forward_to": huge}).encode()),
    }
    for case, data in frames.items():
        with subtests.test(msg=case), pytest.raises(DecodeError) as caught:
            decode(data)
        assert len(str(caught.value)) < 600


def test_shorten_cuts_and_escapes():
    assert limits.shorten("short") == "short"
    cut = limits.shorten("x" * 10_000)
    assert cut.startswith("x" * 200) and len(cut) < 250 and "10000 characters" in cut
    assert limits.shorten("two\nlines\x1b[2J") == "two\\nlines\\x1b[2J"
    assert limits.shorten(b"\x00" * 10**6, limit=20) == "b'\\x00\\x00\\x00\\x00\\x... (1000000 items)"


# --- frame limits per message type -------------------------------------------------------


def test_every_message_type_has_its_own_frame_limit():
    assert set(FRAME_LIMITS) == set(MESSAGE_TYPES.values())
    for code, cls in MESSAGE_TYPES.items():
        assert max_frame_size(code) == max_frame_size(cls) == FRAME_LIMITS[cls]
        assert frame_limit(code.to_bytes(TYPE_CODE_SIZE, "big")) == FRAME_LIMITS[cls]
        assert FRAME_LIMITS[cls] <= MAX_FRAME_SIZE
    assert max_frame_size(Hello) <= 1024
    assert max_frame_size(FetchChunk) <= 64 * 1024
    assert max_frame_size(StoreChunks) == MAX_FRAME_SIZE
    assert frame_limit(b"\xff\xff") == HEAD.size  # an unknown type: nothing to wait for


def padded(cls, length: int) -> bytes:
    """A frame of ``cls`` of ``length`` bytes: its default fields, and blanks."""
    return frame(cls.TYPE_CODE, b"{" + b" " * (length - HEAD.size - 2) + b"}")


def test_a_frame_over_its_types_limit_is_a_decode_error(subtests):
    for cls in (Ack, ListSnapshots, StatusRequest, SyncNotices):
        with subtests.test(msg=f"{cls.__name__} at its limit"):
            assert decode(padded(cls, max_frame_size(cls))) == cls()
    for cls in (Hello, Ack, FetchChunk, RegisterServer, ListSnapshots, Locate, SnapshotList):
        with subtests.test(msg=f"{cls.__name__} over"), pytest.raises(DecodeError, match="exceeds"):
            decode(padded(cls, max_frame_size(cls) + 1))


def test_an_over_large_message_cannot_be_sent():
    hello = Hello(version=2, role="client")
    object.__setattr__(hello, "role", "x" * 10_000)  # (as a sender's bug would make it)
    with pytest.raises(ValueError, match="exceeds its limit"):
        encode(hello)
    with pytest.raises(ValueError, match="cannot encode a message: Integer exceeds 64-bit"):
        encode(Hello(version=2**64, role="client"))
    object.__setattr__(hello, "role", "client\udcff")
    with pytest.raises(ValueError, match="cannot encode a message: str is not valid UTF-8"):
        encode(hello)
    for wrong in (b"client", {"client"}):  # not written as arrays, as a row is
        object.__setattr__(hello, "role", wrong)
        with pytest.raises(ValueError, match="cannot encode a message: Type is not JSON"):
            encode(hello)


LARGEST = {
    "a status of the most servers": ClusterStatus(servers=[
        ServerState(WORST_ADDRESS, True, limits.MAX_COUNT,
                    limits.MAX_COUNT, 1.7e9)] * limits.MAX_SERVERS, snapshots=limits.MAX_COUNT),
    "an inventory page": ChunkInventory(chunks=[HeldChunk(H1, MAX_CHUNK_SIZE)] * limits.MAX_IDS,
                                        snapshots=[S1] * limits.MAX_IDS),
    "a largest summary": SnapshotCommitted(snapshot=SnapshotSummary(
        S1, 1.7e9, "😀" * limits.MAX_HOST_LENGTH,
        ["😀" * 1000] * ((limits.MAX_SNAPSHOT_TEXT - limits.MAX_HOST_LENGTH - 1000) // 1000),
        T1, tags=["😀" * 250] * 4, parent=H3, files=limits.MAX_COUNT)),
    "ids": HasChunks(chunk_ids=[H1] * limits.MAX_IDS),
    "stored": ChunksStored(chunk_ids=[H1] * limits.MAX_BATCH_CHUNKS,
                           holders=[WORST_ADDRESS] * limits.MAX_REPLICAS),
    "a check": CheckReport(servers_checked=[WORST_ADDRESS] * limits.MAX_SERVERS,
                           servers_unreachable=[WORST_ADDRESS] * limits.MAX_SERVERS,
                           damaged=[S1] * limits.MAX_IDS),
    "a placement of a full batch, 3 copies": Placement(
        known=[H1] * limits.MAX_BATCH_CHUNKS,
        assignments={hashing.chunk_id(str(i).encode()): [f"tcp:server-{i}.example.net:5001"] * 3
                     for i in range(limits.MAX_BATCH_CHUNKS)}),
    "locations of a full page, 3 copies": Locations(holders={
        hashing.chunk_id(str(i).encode()): [f"tcp:server-{i}.example.net:5001"] * 3
        for i in range(limits.MAX_LOCATE_IDS)}),
}


def test_the_largest_legal_messages_fit_their_frames(subtests):
    for case, msg in LARGEST.items():
        with subtests.test(msg=case):
            data = encode_frame(msg)
            assert len(data) <= max_frame_size(type(msg))
            assert decode(data) == msg


def test_a_snapshot_page_stays_within_its_frame():
    big = SnapshotSummary(S1, 1.7e9, "h", ["/" * limits.MAX_PATH_LENGTH] * 3, T1)
    page = SnapshotList.filled(5, [big] * 500, 400)
    assert 1 <= len(page.snapshots) < 400 and page.more
    assert len(encode_frame(page)) <= max_frame_size(SnapshotList)
    small = [SUMMARY] * 10
    assert SnapshotList.filled(5, small, 10) == SnapshotList(request_id=5, snapshots=small)
    assert SnapshotList.filled(5, [*small, SUMMARY], 10).more
    # One summary always goes, whatever its size: a page never comes back empty.
    huge = SnapshotSummary(S1, 1.7e9, "h", ["😀" * limits.MAX_PATH_LENGTH] * 3, T1)
    assert len(SnapshotList.filled(1, [huge] * 30, 1000).snapshots) >= 1


# --- batched fetch (restore) ---

SAMPLES[FetchChunks] = FetchChunks(request_id=21, chunk_ids=[H1, H2, H3])
SAMPLES[ChunksData] = ChunksData(request_id=21, chunks=[ChunkRef(H1, 3, H1), ChunkRef(H2, 0, H2)],
                                 missing=[H3], corrupt=[S1], payload=b"abc")


def test_chunks_data_pieces_follow_the_sizes():
    msg = ChunksData(chunks=[ChunkRef(H1, 3, H1), ChunkRef(H2, 2, H2)], missing=[H3],
                     payload=b"abcde")
    assert [(ref.chunk_id, bytes(piece)) for ref, piece in msg.pieces()] == [(H1, b"abc"), (H2, b"de")]
    frame = encode_frame(msg)
    assert header_of(frame)["chunks"] == [[H1, 3, H1], [H2, 2, H2]]
    with pytest.raises(DecodeError, match="add up"):
        decode(frame[:-1])
    with pytest.raises(DecodeError, match="add up"):  # bytes after the last chunk: refused too
        decode(frame + b"f")


@pytest.mark.parametrize(("cls", "fields"), [
    (FetchChunks, {"chunk_ids": [H1] * (MAX_FETCH_IDS + 1)}),
    (FetchChunks, {"chunk_ids": ["not hex"]}),
    (ChunksData, {"missing": [H1] * (MAX_FETCH_IDS + 1)}),
    (ChunksData, {"chunks": [[H1, 3]]}),
    (ChunksData, {"chunks": [[H1, MAX_CHUNK_SIZE + 1, H1]]}),
    (ChunksData, {"corrupt": "abc"}),
], ids=["too many ids", "id not hex", "too many missing", "chunk without checksum",
        "chunk too large", "corrupt not a list"])
def test_bad_batched_fetches_are_refused(cls, fields):
    with pytest.raises(DecodeError):
        decode(frame(cls.TYPE_CODE, json.dumps(fields).encode()))


# --- what every peer relies on ------------------------------------------------------------------

#: The type codes on the wire. A peer of the same protocol version built before a change must
#: still understand each frame: a code never moves.
WIRE_CODES = {
    "Hello": 1, "ErrorReply": 2, "Ack": 3, "StoreChunk": 10, "ChunkStored": 11, "FetchChunk": 12,
    "ChunkData": 13, "ReplicateChunk": 14, "StoreChunks": 15, "ChunksStored": 16,
    "FetchChunks": 17, "ChunksData": 18, "RegisterServer": 20, "ChunkInventory": 21,
    "Heartbeat": 22, "ChunksAdded": 23, "ChunksCorrupt": 24, "VerifyChunks": 25,
    "VerifyReport": 26, "SyncNotices": 27, "PlacementRequest": 30, "Placement": 31,
    "CommitSnapshot": 32, "SnapshotCommitted": 33, "ListSnapshots": 37, "SnapshotList": 38,
    "Locate": 39, "Locations": 40, "StatusRequest": 41, "ClusterStatus": 42, "CheckRequest": 46,
    "CheckReport": 47, "HasChunks": 48, "ChunksHeld": 49, "ForgetSnapshots": 50,
    "SnapshotsForgotten": 51, "DeleteSnapshots": 52, "PruneRequest": 60,
    "PruneStatusRequest": 61, "PruneStatus": 62, "DeleteChunks": 63, "ChunksDeleted": 64,
    "ListServers": 65, "ServerList": 66, "DrainServer": 67, "RetireServer": 68, "Registered": 70,
    "TicketKeys": 71, "ReplaceSnapshot": 75, "ListKeys": 80, "KeyList": 81, "CommitKey": 82,
    "KeyCommitted": 83, "RemoveKey": 84,
}


def test_every_type_keeps_its_code_on_the_wire():
    assert {cls.__name__: code for code, cls in MESSAGE_TYPES.items()} == WIRE_CODES
    assert PROTOCOL_VERSION == 2  # (a new version is a deliberate change, with its migration)


def test_every_message_type_can_be_sent_by_some_peer():
    """A request some role may send, or a reply to one (the handshake goes first, outside
    the table): a type no peer may send would be refused wherever it came from."""
    for cls in MESSAGE_TYPES.values():
        if cls is Hello:
            assert not cls.IS_REPLY
            continue
        if cls.IS_REPLY:
            assert cls.__name__ not in SENDERS, cls
            assert refusal("client", SAMPLES[cls], authenticated=True) is None, cls
        else:
            assert SENDERS.get(cls.__name__), cls


def test_a_count_or_a_flag_a_peer_leaves_out_is_zero_or_off():
    """A figure a peer does not send is none at all, never a made-up one; the exceptions say
    what an absent field means."""
    meaning = {
        (ChunkInventory, "final"): True,  # an inventory in one page is its last
        (ListSnapshots, "limit"): limits.MAX_SNAPSHOTS_PER_PAGE,
        (Placement, "replicas"): limits.DEFAULT_REPLICAS,
        (ClusterStatus, "replicas"): limits.DEFAULT_REPLICAS,
        (ServerList, "replicas"): limits.DEFAULT_REPLICAS,
    }
    for cls in MESSAGE_TYPES.values():
        for field in attrs.fields(cls):
            default = field.default
            if isinstance(default, bool | int | float):  # (a request id too: none, a notice)
                expected = meaning.get((cls, field.name), False if isinstance(default, bool) else 0)
                assert default == expected, (cls, field.name)
                assert isinstance(default, bool) == isinstance(expected, bool), (cls, field.name)
    for record in (SnapshotSummary(S1, 1.0, "h", [], T1),):
        assert (record.files, record.dirs, record.bytes) == (0, 0, 0)


def test_the_replication_factor_a_manager_omits_is_the_default_one():
    assert limits.DEFAULT_REPLICAS == 2  # (the README's default)
    assert decode(frame(ClusterStatus.TYPE_CODE, b"{}")).replicas == 2
    for cls in (ClusterStatus, Placement, ServerList):  # (a cluster of one copy: README's 1)
        assert decode(frame(cls.TYPE_CODE, b'{"replicas":1}')).replicas == 1


def test_secrets_stay_out_of_logged_messages():
    secret = hashing.chunk_id(b"a ticket key")
    assert secret not in repr(TicketKey("k1", secret))
    for msg in (Registered(request_id=1, ticket_keys=[TicketKey("k1", secret)]),
                TicketKeys(request_id=1, ticket_keys=[TicketKey("k1", secret)])):
        assert secret not in repr(msg)
        assert decode(encode_frame(msg)).ticket_keys[0].secret == secret


def test_an_invalid_summary_is_named_by_its_short_id():
    with pytest.raises(ValueError) as caught:
        many = limits.MAX_SNAPSHOT_TEXT // limits.MAX_PATH_LENGTH + 1
        SnapshotSummary(S1, 1.0, "h", ["p" * limits.MAX_PATH_LENGTH] * many, T1)
    assert str(caught.value).startswith(f"snapshot {S1[:16]}: ")


def test_a_full_batch_of_fetched_chunks_is_one_reply_and_one_more_is_refused():
    ids = [hashing.chunk_id(str(i).encode()) for i in range(MAX_FETCH_IDS)]
    assert decode(encode_frame(FetchChunks(request_id=1, chunk_ids=ids))).chunk_ids == ids
    with pytest.raises(ValueError, match=f"more than {MAX_FETCH_IDS}"):
        FetchChunks(request_id=1, chunk_ids=[*ids, H1])
    refs = [ChunkRef(H1, 0, H1)] * MAX_FETCH_IDS
    assert len(decode(encode_frame(ChunksData(request_id=1, chunks=refs))).chunks) == MAX_FETCH_IDS
    with pytest.raises(ValueError, match=f"more than {MAX_FETCH_IDS}"):
        ChunksData(request_id=1, chunks=[*refs, ChunkRef(H2, 0, H2)])


def test_fetched_chunks_of_real_sizes_add_up_to_their_payload():
    data = [os.urandom(1000), os.urandom(70_000)]
    refs = [ChunkRef(hashing.chunk_id(d), len(d), hashing.checksum(d)) for d in data]
    msg = decode(encode_frame(ChunksData(request_id=1, chunks=refs, payload=b"".join(data))))
    assert [piece for _, piece in msg.pieces()] == data
    with pytest.raises(ValueError, match="do not add up"):
        ChunksData(request_id=1, chunks=refs, payload=b"".join(data)[:-1])


def test_a_repository_of_the_most_keys_is_listed_and_one_more_is_refused():
    ids = [hashing.chunk_id(str(i).encode()) for i in range(MAX_KEYS)]
    assert decode(encode_frame(KeyList(request_id=1, key_ids=ids))).key_ids == ids
    with pytest.raises(DecodeError, match=f"more than {MAX_KEYS}"):
        decode(frame(KeyList.TYPE_CODE, json.dumps({"key_ids": [*ids, H1]}).encode()))


def test_a_page_of_snapshots_fills_up_to_the_page_bytes_exactly():
    """Summaries that take exactly ``SNAPSHOT_PAGE_BYTES`` (with a separator each) make one
    page; a byte more, and the last waits for the next page."""
    def summary(path_bytes: int) -> SnapshotSummary:  # (names travel as UTF-8, not escaped)
        return SnapshotSummary(S1, 1.0, "h", ["é" * (path_bytes // 2) + "p" * (path_bytes % 2)],
                               T1)

    def wire_size(s: SnapshotSummary) -> int:
        return len(json.dumps(s.to_wire(), separators=(",", ":"), ensure_ascii=False).encode())

    base = wire_size(summary(0))
    each = summary(limits.MAX_PATH_LENGTH // 2)
    count = limits.SNAPSHOT_PAGE_BYTES // (wire_size(each) + 1)
    room = limits.SNAPSHOT_PAGE_BYTES - count * (wire_size(each) + 1)
    if room < base + 2:  # (too little left for one more summary: one less of the others)
        count, room = count - 1, room + wire_size(each) + 1
    last = summary(room - 1 - base)
    assert count * (wire_size(each) + 1) + wire_size(last) + 1 == limits.SNAPSHOT_PAGE_BYTES
    full = SnapshotList.filled(1, [each] * count + [last], 1000)
    assert (len(full.snapshots), full.more) == (count + 1, False)
    over = SnapshotList.filled(1, [each] * count + [summary(room - base)], 1000)
    assert (len(over.snapshots), over.more) == (count, True)


def test_a_page_holding_every_snapshot_says_there_are_no_more():
    small = [SUMMARY] * 300
    page = SnapshotList.filled(1, small, 1000)
    assert (len(page.snapshots), page.more) == (300, False)


def test_a_message_of_exactly_its_frame_limit_can_be_sent_and_a_byte_more_cannot():
    head = encode(ChunkData(request_id=1, chunk_id=H1, checksum=H1))
    room = max_frame_size(ChunkData) - sum(len(part) for part in head)
    at_limit = ChunkData(request_id=1, chunk_id=H1, checksum=H1, payload=b"x" * room)
    assert len(encode_frame(at_limit)) == max_frame_size(ChunkData)
    with pytest.raises(ValueError, match="exceeds its limit"):
        encode(attrs.evolve(at_limit, payload=b"x" * (room + 1)))


def test_the_largest_chunk_a_client_makes_sealed_fits_one_store():
    """The chunker's largest chunk, sealed, is a legal chunk and fits one StoreChunks; so
    does the uploader's fullest pack."""
    largest = chunking.MAX_SIZE + sealing.OVERHEAD
    for size in (largest, uploader.PACK_BYTES + largest):
        store = StoreChunks(chunks=[ChunkRef(H1, largest, H1), ChunkRef(H2, size - largest, H2)],
                            payload=b"x" * size)
        assert decode(encode_frame(store)) == store


def test_the_frame_limits_are_the_ones_the_readme_gives():
    """README: a frame is at most 16 MiB + 6 bytes (a head, a header of up to 8 MiB, a payload
    of up to 8 MiB); 1 KiB for a Hello, 64 KiB for small requests and answers."""
    mib = 1024 * 1024
    assert MAX_FRAME_SIZE == max_frame_size(StoreChunks) == 16 * mib + 6
    assert (max_frame_size(Hello), max_frame_size(Ack), max_frame_size(FetchChunk)) == (
        1024, 64 * 1024, 64 * 1024)
    half = 4 * mib
    eight = StoreChunks(chunks=[ChunkRef(H1, half, H1), ChunkRef(H2, half, H2)],
                        payload=b"x" * (2 * half))
    assert decode(encode_frame(eight)) == eight
    one_chunk = StoreChunks(chunks=[ChunkRef(H1, 8 * mib, H1)], payload=b"x" * 8 * mib)
    assert decode(encode_frame(one_chunk)) == one_chunk
    with pytest.raises(ValueError, match="size is not a whole number from 0 to 8388608"):
        StoreChunks(chunks=[ChunkRef(H1, 8 * mib + 1, H1)], payload=b"x" * (8 * mib + 1))
    assert (limits.MAX_SNAPSHOTS_PER_PAGE, limits.SNAPSHOT_PAGE_BYTES) == (1000, mib)
