"""Typed messages and their codec.

A frame is ``type code (2 bytes) | header length (4 bytes) | header | payload``.
The header is the message's fields as compact JSON; the payload, when a
message carries chunk bytes, travels raw after it (no base64, no JSON around
data). Decoding checks every field through the attrs validators, so a
malformed frame is rejected before any service sees it.
"""

import json
from struct import Struct
from typing import Any, ClassVar

import attrs
from attrs import field, frozen
from attrs.validators import deep_iterable, ge, in_, instance_of, le

from sdbackup.hashing import is_hex_digest

PROTOCOL_VERSION = 2

#: The largest chunk a client may send; with CDC this is the maximum chunk size.
MAX_CHUNK_SIZE = 8 * 1024 * 1024
#: The largest header (JSON) a frame may carry: file lists and inventories are paged below it.
MAX_HEADER_SIZE = 8 * 1024 * 1024
_HEAD = Struct("!HI")
#: The largest legal frame; anything longer closes the connection.
MAX_FRAME_SIZE = _HEAD.size + MAX_HEADER_SIZE + MAX_CHUNK_SIZE


class DecodeError(Exception):
    """A frame that is not a valid message."""


def _hex_digest(instance, attribute, value):
    if not is_hex_digest(value):
        raise ValueError(f"{attribute.name} is not a hex digest: {value!r}")


def _hex_digests(instance, attribute, value):
    if not isinstance(value, list) or not all(is_hex_digest(v) for v in value):
        raise ValueError(f"{attribute.name} must be a list of hex digests")


_int = instance_of(int)
#: What a stored chunk is (``sdbackup.objects.Kind``): raw file data, or an object.
CHUNK_KINDS = ("data", "tree", "list", "snapshot")
_kind = field(default="data", validator=in_(CHUNK_KINDS))
_non_negative = [_int, ge(0)]
_str = instance_of(str)
_bool = instance_of(bool)
_strings = deep_iterable(_str, instance_of(list))


def _records(cls):
    """A converter that turns wire lists/dicts into ``cls`` records."""

    def convert(values):
        if not isinstance(values, list):
            raise ValueError(f"expected a list of {cls.__name__}")
        return [v if isinstance(v, cls) else cls.from_wire(v) for v in values]

    return convert


def _record(cls):
    """A converter that turns a wire dict into a ``cls`` record."""
    return lambda value: value if isinstance(value, cls) else cls.from_wire(value)


def _holders_map(value):
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of chunk id to addresses")
    for key, addresses in value.items():
        if not is_hex_digest(key) or not isinstance(addresses, list):
            raise ValueError("bad chunk location entry")
        if not all(isinstance(a, str) for a in addresses):
            raise ValueError("bad chunk location entry")
    return value


class Record:
    """A nested record: encoded as a dict of its fields."""

    def to_wire(self):
        return {a.name: _to_wire(getattr(self, a.name)) for a in attrs.fields(type(self))}

    @classmethod
    def from_wire(cls, value):
        if not isinstance(value, dict):
            raise ValueError(f"expected a {cls.__name__} object")
        try:
            return cls(**value)
        except TypeError as e:
            raise ValueError(f"bad {cls.__name__}: {e}") from None


@frozen
class ChunkRef(Record):
    """One chunk of a file, in order."""

    chunk_id: str = field(validator=_hex_digest)
    size: int = field(validator=[_int, ge(0), le(MAX_CHUNK_SIZE)])
    checksum: str = field(validator=_hex_digest)

    def to_wire(self):
        return [self.chunk_id, self.size, self.checksum]

    @classmethod
    def from_wire(cls, value):
        if not isinstance(value, list) or len(value) != 3:
            raise ValueError("a chunk reference is [chunk_id, size, checksum]")
        return cls(*value)


@frozen
class SnapshotSummary(Record):
    """A snapshot as the manager's index lists it (read from its object on the servers).

    ``paths`` are escaped with ``sdbackup.names.escape`` (names are bytes).
    """

    snapshot_id: str = field(validator=_hex_digest)
    time: float = field(validator=instance_of((int, float)))
    host: str = field(validator=_str)
    paths: list = field(validator=_strings)
    tree: str = field(validator=_hex_digest)
    tags: list = field(factory=list, validator=_strings)
    parent: str = field(default="", validator=_str)
    files: int = field(default=0, validator=_non_negative)
    dirs: int = field(default=0, validator=_non_negative)
    bytes: int = field(default=0, validator=_non_negative)


class _IdAndSize(Record):
    """A record that travels as ``[chunk_id, size]``: lists of them stay compact."""

    def to_wire(self):
        return [self.chunk_id, self.size]

    @classmethod
    def from_wire(cls, value):
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"a {cls.__name__} is [chunk_id, size]")
        return cls(*value)


_chunk_size = field(validator=[_int, ge(0), le(MAX_CHUNK_SIZE)])


@frozen
class HeldChunk(_IdAndSize):
    """A chunk a server holds, and the size of its payload."""

    chunk_id: str = field(validator=_hex_digest)
    size: int = _chunk_size


@frozen
class ServerState(Record):
    address: str = field(validator=_str)
    alive: bool = field(validator=_bool)
    free_bytes: int = field(validator=_non_negative)
    chunks: int = field(validator=_non_negative)
    last_seen: float = field(validator=instance_of((int, float)))


@frozen
class ChunkNeed(_IdAndSize):
    """A chunk a client wants placed, and its size."""

    chunk_id: str = field(validator=_hex_digest)
    size: int = _chunk_size


# --- messages ---------------------------------------------------------------

MESSAGE_TYPES: dict[int, type] = {}


def message(code: int):
    """Register a message class under its wire type code."""

    def register(cls):
        if code in MESSAGE_TYPES:
            raise ValueError(f"type code {code} is taken by {MESSAGE_TYPES[code].__name__}")
        cls.TYPE_CODE = code
        MESSAGE_TYPES[code] = cls
        return cls

    return register


class Message:
    """Base of all messages. ``IS_REPLY`` marks answers that resolve a request."""

    TYPE_CODE: ClassVar[int]
    IS_REPLY: ClassVar[bool] = False


_request_id = field(default=0, validator=_non_negative)
_payload = field(default=b"", repr=lambda p: f"<{len(p)} bytes>", validator=instance_of(bytes))


@message(1)
@frozen
class Hello(Message):
    """Sent first by both ends; a version mismatch closes the connection."""

    version: int = field(validator=_int)
    role: str = field(validator=in_(("client", "server", "manager")))


@message(2)
@frozen
class ErrorReply(Message):
    """The answer to a request that failed, with a reason a user can read."""

    IS_REPLY = True
    request_id: int = _request_id
    code: str = field(default="error", validator=_str)
    reason: str = field(default="", validator=_str)
    #: The server at fault, when it is not the one answering (a replica that failed).
    culprit: str = field(default="", validator=_str)


@message(3)
@frozen
class Ack(Message):
    IS_REPLY = True
    request_id: int = _request_id


@message(10)
@frozen
class StoreChunk(Message):
    """Store a chunk durably, then forward it along ``forward_to`` before answering."""

    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    checksum: str = field(default="", validator=_hex_digest)
    forward_to: list = field(factory=list, validator=_strings)
    kind: str = _kind
    payload: bytes = _payload


@message(11)
@frozen
class ChunkStored(Message):
    """Every server in ``holders`` has the chunk on disk with this checksum."""

    IS_REPLY = True
    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    checksum: str = field(default="", validator=_hex_digest)
    holders: list = field(factory=list, validator=_strings)


@message(12)
@frozen
class FetchChunk(Message):
    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)


@message(13)
@frozen
class ChunkData(Message):
    IS_REPLY = True
    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    checksum: str = field(default="", validator=_hex_digest)
    kind: str = _kind
    payload: bytes = _payload


@message(20)
@frozen
class RegisterServer(Message):
    """A storage server announces itself to the manager."""

    request_id: int = _request_id
    address: str = field(default="", validator=_str)
    free_bytes: int = field(default=0, validator=_non_negative)
    chunk_count: int = field(default=0, validator=_non_negative)


@message(21)
@frozen
class ChunkInventory(Message):
    """A page of what a server holds; ``final`` closes the report.

    ``snapshots`` are the snapshot objects among them: from these the manager
    rebuilds its list of snapshots when its catalog is lost.
    """

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_records(HeldChunk))
    snapshots: list = field(factory=list, validator=_hex_digests)
    final: bool = field(default=True, validator=_bool)


@message(22)
@frozen
class Heartbeat(Message):
    request_id: int = _request_id
    free_bytes: int = field(default=0, validator=_non_negative)
    chunk_count: int = field(default=0, validator=_non_negative)


@message(30)
@frozen
class PlacementRequest(Message):
    """Which of these chunks must be sent, and to which servers."""

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_records(ChunkNeed))
    #: Servers the client could not use: the placement avoids them.
    exclude: list = field(factory=list, validator=_strings)


@message(31)
@frozen
class Placement(Message):
    """``known`` chunks are held already; each other one gets its servers, primary first."""

    IS_REPLY = True
    request_id: int = _request_id
    known: list = field(factory=list, validator=_hex_digests)
    assignments: dict = field(factory=dict, converter=_holders_map)
    #: The cluster's replication factor: an assignment with fewer servers is degraded.
    replicas: int = field(default=2, validator=_non_negative)


@message(32)
@frozen
class CommitSnapshot(Message):
    """A snapshot object is stored: the manager reads it from a holder and lists it."""

    request_id: int = _request_id
    snapshot_id: str = field(default="", validator=_hex_digest)


@message(33)
@frozen
class SnapshotCommitted(Message):
    IS_REPLY = True
    request_id: int = _request_id
    snapshot: SnapshotSummary = field(default=None, converter=_record(SnapshotSummary))


@message(37)
@frozen
class ListSnapshots(Message):
    request_id: int = _request_id


@message(38)
@frozen
class SnapshotList(Message):
    IS_REPLY = True
    request_id: int = _request_id
    snapshots: list = field(factory=list, converter=_records(SnapshotSummary))


@message(39)
@frozen
class Locate(Message):
    """Where these chunks or objects are (read-only; places nothing)."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)


@message(40)
@frozen
class Locations(Message):
    """The live holders of each chunk asked about (all recorded ones when none is live);
    a chunk with no recorded copy is left out."""

    IS_REPLY = True
    request_id: int = _request_id
    holders: dict = field(factory=dict, converter=_holders_map)


@message(41)
@frozen
class StatusRequest(Message):
    request_id: int = _request_id


@message(42)
@frozen
class ClusterStatus(Message):
    IS_REPLY = True
    request_id: int = _request_id
    #: "starting" while the manager waits for servers to report after a start, then "ready".
    state: str = field(default="ready", validator=in_(("starting", "ready")))
    replicas: int = field(default=2, validator=_non_negative)
    servers: list = field(factory=list, converter=_records(ServerState))
    snapshots: int = field(default=0, validator=_non_negative)
    chunks: int = field(default=0, validator=_non_negative)
    under_replicated: int = field(default=0, validator=_non_negative)
    #: Chunks in use with no live copy at all.
    missing: int = field(default=0, validator=_non_negative)


@message(14)
@frozen
class ReplicateChunk(Message):
    """From the manager: send a chunk you hold along ``forward_to`` (re-replication)."""

    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    forward_to: list = field(factory=list, validator=_strings)


@message(23)
@frozen
class ChunksAdded(Message):
    """One-way, server to manager: chunks this server has just stored (``snapshots``: the
    snapshot objects among them)."""

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_records(HeldChunk))
    snapshots: list = field(factory=list, validator=_hex_digests)


@message(24)
@frozen
class ChunksCorrupt(Message):
    """One-way, server to manager: copies found bad and quarantined here."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)


@message(25)
@frozen
class VerifyChunks(Message):
    """From the manager: report your chunks again, after re-hashing them all if ``read_data``."""

    request_id: int = _request_id
    read_data: bool = field(default=False, validator=_bool)


@message(26)
@frozen
class VerifyReport(Message):
    IS_REPLY = True
    request_id: int = _request_id
    held: int = field(default=0, validator=_non_negative)
    corrupt: list = field(factory=list, validator=_hex_digests)


@message(27)
@frozen
class SyncNotices(Message):
    """From the manager: send every ChunksAdded not sent yet, then answer (Ack).

    The manager asks before it lists a snapshot, so its index knows every
    copy a client was told of, without taking the client's word for it.
    """

    request_id: int = _request_id


@message(46)
@frozen
class CheckRequest(Message):
    """Verify the catalog against the servers (``sdbackup check``)."""

    request_id: int = _request_id
    read_data: bool = field(default=False, validator=_bool)


@message(47)
@frozen
class CheckReport(Message):
    IS_REPLY = True
    request_id: int = _request_id
    servers_checked: list = field(factory=list, validator=_strings)
    servers_unreachable: list = field(factory=list, validator=_strings)
    chunks: int = field(default=0, validator=_non_negative)
    #: Chunks and objects that snapshots reference and no live server holds.
    missing: int = field(default=0, validator=_non_negative)
    under_replicated: int = field(default=0, validator=_non_negative)
    corrupt: int = field(default=0, validator=_non_negative)
    snapshots: int = field(default=0, validator=_non_negative)
    #: Tree and chunk list objects read while walking every snapshot.
    trees: int = field(default=0, validator=_non_negative)
    #: Snapshots that reference something missing (they cannot be fully restored).
    damaged: list = field(factory=list, validator=_strings)


@message(48)
@frozen
class HasChunks(Message):
    """Which of these chunks have a copy on a live server (read-only; places nothing)."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)


@message(49)
@frozen
class ChunksHeld(Message):
    IS_REPLY = True
    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)


@message(15)
@frozen
class StoreChunks(Message):
    """Several chunks in one frame: their bytes follow each other in ``payload``.

    Stored, then forwarded, then confirmed as one: a round trip and a thread hop
    for many small files instead of one each.
    """

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_records(ChunkRef))
    forward_to: list = field(factory=list, validator=_strings)
    kind: str = _kind
    payload: bytes = _payload

    def __attrs_post_init__(self):
        if sum(c.size for c in self.chunks) != len(self.payload):
            raise ValueError("the chunks' sizes do not add up to the payload's length")

    def pieces(self) -> list[tuple[ChunkRef, bytes]]:
        view, offset, found = memoryview(self.payload), 0, []
        for ref in self.chunks:
            found.append((ref, view[offset : offset + ref.size]))
            offset += ref.size
        return found


@message(16)
@frozen
class ChunksStored(Message):
    """Every chunk of a StoreChunks is on disk at every server in ``holders``."""

    IS_REPLY = True
    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)
    holders: list = field(factory=list, validator=_strings)


# --- codec ------------------------------------------------------------------


def _to_wire(value: Any):
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def encode(msg: Message) -> list[bytes]:
    """The parts of ``msg``'s frame (without the length prefix)."""
    fields = {}
    payload = b""
    for a in attrs.fields(type(msg)):
        value = getattr(msg, a.name)
        if a.name == "payload":
            payload = value
        else:
            fields[a.name] = _to_wire(value)
    header = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError(f"{type(msg).__name__} header of {len(header)} bytes is too large")
    if payload:
        return [_HEAD.pack(msg.TYPE_CODE, len(header)), header, payload]
    return [_HEAD.pack(msg.TYPE_CODE, len(header)), header]


def encode_frame(msg: Message) -> bytes:
    return b"".join(encode(msg))


def decode(frame: bytes) -> Message:
    """The message in ``frame``; ``DecodeError`` says why it is not one."""
    if len(frame) < _HEAD.size:
        raise DecodeError(f"frame of {len(frame)} bytes is shorter than a message head")
    code, header_length = _HEAD.unpack_from(frame)
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise DecodeError(f"unknown message type {code}")
    header_end = _HEAD.size + header_length
    if header_end > len(frame):
        raise DecodeError(f"{cls.__name__}: header runs past the end of the frame")
    try:
        fields = json.loads(bytes(frame[_HEAD.size : header_end]))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, absurd numbers or nesting
        raise DecodeError(f"{cls.__name__}: header is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise DecodeError(f"{cls.__name__}: header is not an object")
    names = {a.name for a in attrs.fields(cls)}
    payload = frame[header_end:]
    if "payload" in names:
        fields["payload"] = bytes(payload)
    elif payload:
        raise DecodeError(f"{cls.__name__} carries no payload but {len(payload)} bytes follow")
    unknown = set(fields) - names
    if unknown:
        raise DecodeError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"{cls.__name__}: {e}") from None
