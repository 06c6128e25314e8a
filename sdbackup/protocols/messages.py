"""Typed messages and their codec.

A frame is ``type code (2 bytes) | header length (4 bytes) | header | payload``.
The header is the message's fields as compact JSON (through orjson: a
backup's store and locate messages carry thousands of hex ids, and the
standard library took a twentieth of the client's reactor thread encoding and
decoding them); the payload, when a message carries chunk bytes, travels raw
after it (no base64, no JSON around data). Decoding checks every field through
the attrs validators, so a malformed frame is rejected before any service sees
it.

Nothing a peer sends is unbounded: every string, list and number has a limit
from ``sdbackup.limits``, and every message type a largest frame
(``max_frame_size``), which a connection checks as soon as a frame's type code
arrives, before buffering it.
"""

from struct import Struct
from typing import Any, ClassVar, NamedTuple

import attrs
import orjson
from attrs import field, frozen
from attrs.validators import ge, in_, instance_of, le

from sdbackup import limits
from sdbackup.hashing import are_hex_digests, is_hex_digest
from sdbackup.limits import shorten
from sdbackup.sealing import repo_problem

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
        raise ValueError(f"{attribute.name} is not a hex digest: {shorten(value, 80)}")


def _optional_hex_digest(instance, attribute, value):
    if value != "":
        _hex_digest(instance, attribute, value)


def _hex_digests(instance, attribute, value, most: int = limits.MAX_IDS):
    if not isinstance(value, list) or not are_hex_digests(value):
        raise ValueError(f"{attribute.name} must be a list of hex digests")
    if len(value) > most:
        raise ValueError(f"{attribute.name} holds {len(value)} ids, more than {most}")


def _batch_ids(instance, attribute, value):
    _hex_digests(instance, attribute, value, limits.MAX_BATCH_CHUNKS)


def _locate_ids(instance, attribute, value):
    _hex_digests(instance, attribute, value, limits.MAX_LOCATE_IDS)


def _count_of(items: str, most: int):
    """A validator: a list of at most ``most`` ``items``."""

    def check(instance, attribute, value):
        if len(value) > most:
            raise ValueError(f"{attribute.name} holds {len(value)} {items}, more than {most}")

    return check


def _text(most: int, ascii: bool = False):
    """A validator: printable text (ASCII only, with ``ascii``) of at most ``most`` characters."""

    def check(instance, attribute, value):
        problem = limits.text_problem(value, most, ascii)
        if problem:
            raise ValueError(f"{attribute.name} {problem}")

    return check


def _texts(most_items: int, most_length: int, ascii: bool = False):
    """A validator: a list of at most ``most_items`` printable texts of ``most_length``."""
    one = _text(most_length, ascii)

    def check(instance, attribute, value):
        if not isinstance(value, list):
            raise ValueError(f"{attribute.name} is not a list")
        _count_of("entries", most_items)(instance, attribute, value)
        for item in value:
            one(instance, attribute, item)

    return check


def _time(instance, attribute, value):
    problem = limits.time_problem(value)
    if problem:
        raise ValueError(f"{attribute.name} {problem}")


_int = instance_of(int)
#: What a stored chunk is (``sdbackup.objects.Kind``): raw file data, or an object.
CHUNK_KINDS = ("data", "tree", "list", "snapshot", "key")
_kind = field(default="data", validator=in_(CHUNK_KINDS))
_non_negative = [_int, ge(0), le(limits.MAX_COUNT)]
_str = instance_of(str)
_bool = instance_of(bool)


def _repo_name(instance, attribute, value):
    problem = repo_problem(value)
    if problem:
        raise ValueError(problem)


def _optional_repo_name(instance, attribute, value):
    if value != "":
        _repo_name(instance, attribute, value)
#: A server's address; a chain of them (a chunk's holders, where to forward it); a listing.
_address = _text(limits.MAX_ADDRESS_LENGTH, ascii=True)
_chain = _texts(limits.MAX_REPLICAS, limits.MAX_ADDRESS_LENGTH, ascii=True)
_servers = _texts(limits.MAX_SERVERS, limits.MAX_ADDRESS_LENGTH, ascii=True)


def _check_list(values, cls, most: int | None):
    """Refuse what is not a list of at most ``most`` (a converter's first check)."""
    if not isinstance(values, list):
        raise ValueError(f"expected a list of {cls.__name__}")
    if most is not None and len(values) > most:
        raise ValueError(f"{len(values)} {cls.__name__} records, more than {most}")


def _records(cls, most: int | None = None):
    """A converter that turns wire lists/dicts into ``cls`` records (at most ``most``)."""

    def convert(values):
        _check_list(values, cls, most)
        return [v if isinstance(v, cls) else cls.from_wire(v) for v in values]

    return convert


def _rows(cls, most: int | None = None):
    """A converter that turns wire lists into ``cls`` rows: a NamedTuple of a chunk id, a
    size and maybe a checksum, as ``ChunkRef``.

    A pack, a placement or a fetch reply holds up to thousands of them, and attrs validators
    on each field of each took a twentieth of a backup's reactor thread: the lot is checked
    in a few passes in C instead, column by column.
    """
    width, shape = len(cls._fields), f"[{', '.join(cls._fields)}]"

    def convert(values):
        _check_list(values, cls, most)
        if not values:
            return []
        if not set(map(type, values)) <= {list, cls} or set(map(len, values)) != {width}:
            raise ValueError(f"a {cls.__name__} is {shape}")
        columns = list(zip(*values, strict=True))
        if not all(are_hex_digests(column) for column in columns[::2]):
            raise ValueError(f"a {cls.__name__}'s id or checksum is not a hex digest")
        sizes = columns[1]
        if not set(map(type, sizes)) <= {int} or min(sizes) < 0 or max(sizes) > MAX_CHUNK_SIZE:
            raise ValueError(f"a {cls.__name__}'s size is not a whole number from 0 to "
                             f"{MAX_CHUNK_SIZE}")
        return [v if type(v) is cls else cls._make(v) for v in values]

    return convert


def _record(cls):
    """A converter that turns a wire dict into a ``cls`` record."""
    return lambda value: value if isinstance(value, cls) else cls.from_wire(value)


def _holders_map(most: int):
    """A converter: a mapping of at most ``most`` chunk ids to the addresses holding each."""

    def check(value):
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of chunk id to addresses")
        if len(value) > most:
            raise ValueError(f"locations of {len(value)} chunks, more than {most}")
        lists = value.values()
        if (not are_hex_digests(value) or set(map(type, lists)) - {list}
                or max(map(len, lists), default=0) > limits.MAX_REPLICAS):
            raise ValueError("bad chunk location entry")
        addresses = [a for addresses in lists for a in addresses]
        if set(map(type, addresses)) - {str} or any(
                limits.text_problem(a, limits.MAX_ADDRESS_LENGTH, True) is not None
                for a in set(addresses)):  # a few servers' addresses, each checked once
            raise ValueError("bad chunk location entry")
        return value

    return check


def _no_surrogates(text: str) -> str:
    """``text`` that encodes as UTF-8 (a lone surrogate, from a file name, is escaped)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reason(value):
    """An error's text, cut to ``MAX_REASON_LENGTH``: an error about a long value stays short."""
    if not isinstance(value, str):
        return value  # (the validator says what is wrong)
    if len(value) > limits.MAX_REASON_LENGTH:
        value = value[: limits.MAX_REASON_LENGTH - 3] + "..."
    return _no_surrogates(value)


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


class ChunkRef(NamedTuple):
    """One chunk of a file, in order: ``[chunk_id, size, checksum]`` on the wire, checked with
    the others of its message (``_rows``)."""

    chunk_id: str
    size: int
    checksum: str


@frozen
class SnapshotSummary(Record):
    """A snapshot as the manager's index lists it (read from its object on the servers).

    ``paths`` are escaped with ``sdbackup.names.escape`` (names are bytes).
    """

    snapshot_id: str = field(validator=_hex_digest)
    time: float = field(validator=_time)
    host: str = field(validator=_text(limits.MAX_HOST_LENGTH))
    paths: list = field(validator=_texts(limits.MAX_SNAPSHOT_PATHS, limits.MAX_PATH_LENGTH))
    tree: str = field(validator=_hex_digest)
    tags: list = field(factory=list, validator=_texts(limits.MAX_TAGS, limits.MAX_TAG_LENGTH))
    parent: str = field(default="", validator=_optional_hex_digest)
    files: int = field(default=0, validator=_non_negative)
    dirs: int = field(default=0, validator=_non_negative)
    bytes: int = field(default=0, validator=_non_negative)
    #: Its repository (``default`` for a plaintext snapshot that names none).
    repo: str = field(default="default", validator=_repo_name)

    def __attrs_post_init__(self):
        problem = limits.snapshot_problem(self.host, self.paths, self.tags)
        if problem:
            raise ValueError(f"snapshot {self.snapshot_id[:16]}: {problem}")


class HeldChunk(NamedTuple):
    """A chunk a server holds, and the size of its payload: ``[chunk_id, size]``."""

    chunk_id: str
    size: int


@frozen
class ServerState(Record):
    address: str = field(validator=_address)
    alive: bool = field(validator=_bool)
    free_bytes: int = field(validator=_non_negative)
    chunks: int = field(validator=_non_negative)
    last_seen: float = field(validator=_time)


class ChunkNeed(NamedTuple):
    """A chunk a client wants placed, and its size: ``[chunk_id, size]``."""

    chunk_id: str
    size: int


@frozen
class Ticket(Record):
    """The manager's signed word that ``chunk_ids`` go along ``chain`` (primary first) until
    ``expires`` (seconds since the epoch): what a server stores and forwards under
    (``sdbackup.tickets``). ``mac`` is an HMAC-SHA256 under the key ``key_id``."""

    chunk_ids: list = field(validator=_batch_ids)
    chain: list = field(validator=_chain)
    expires: int = field(validator=_non_negative)
    key_id: str = field(validator=_text(limits.MAX_KEY_ID_LENGTH, ascii=True))
    mac: str = field(validator=_hex_digest)


def _optional_ticket(value):
    return value if value is None or isinstance(value, Ticket) else Ticket.from_wire(value)


#: A store's or a replication order's ticket (None: none given, and the server refuses it).
_ticket = field(default=None, converter=_optional_ticket)


@frozen
class TicketKey(Record):
    """A secret the manager signs tickets with (256 bits, hex), and its name."""

    key_id: str = field(validator=_text(limits.MAX_KEY_ID_LENGTH, ascii=True))
    secret: str = field(validator=_hex_digest, repr=False)


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
    code: str = field(default="error", validator=_text(limits.MAX_CODE_LENGTH))
    reason: str = field(default="", converter=_reason, validator=_str)
    #: The server at fault, when it is not the one answering (a replica that failed).
    culprit: str = field(default="", validator=_address)


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
    forward_to: list = field(factory=list, validator=_chain)
    kind: str = _kind
    ticket: Ticket | None = _ticket
    payload: bytes = _payload


@message(11)
@frozen
class ChunkStored(Message):
    """Every server in ``holders`` has the chunk on disk with this checksum."""

    IS_REPLY = True
    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    checksum: str = field(default="", validator=_hex_digest)
    holders: list = field(factory=list, validator=_chain)


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
    address: str = field(default="", validator=_address)
    free_bytes: int = field(default=0, validator=_non_negative)
    chunk_count: int = field(default=0, validator=_non_negative)
    #: Size of the data folder's file system (0: not told).
    total_bytes: int = field(default=0, validator=_non_negative)
    #: The data folder's identity (``chunkstore.folder_identity``): copies are counted per
    #: disk, whatever address it is served at ("": not told).
    disk_id: str = field(default="", validator=_text(limits.MAX_DISK_ID_LENGTH, ascii=True))
    #: Less free space than the server's reserve: place nothing on it.
    full: bool = field(default=False, validator=_bool)


@message(21)
@frozen
class ChunkInventory(Message):
    """A page of what a server holds; ``final`` closes the report.

    ``snapshots`` are the snapshot objects among them: from these the manager
    rebuilds its list of snapshots when its catalog is lost.
    """

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_rows(HeldChunk, limits.MAX_IDS))
    snapshots: list = field(factory=list, validator=_hex_digests)
    final: bool = field(default=True, validator=_bool)


@message(22)
@frozen
class Heartbeat(Message):
    """A server's disk and scrub figures, every few seconds."""

    request_id: int = _request_id
    free_bytes: int = field(default=0, validator=_non_negative)
    chunk_count: int = field(default=0, validator=_non_negative)
    total_bytes: int = field(default=0, validator=_non_negative)
    #: The scrub pass under way: chunks checked of how many (0 of 0: none runs).
    scrub_done: int = field(default=0, validator=_non_negative)
    scrub_total: int = field(default=0, validator=_non_negative)
    #: Less free space than the server's reserve: place nothing on it.
    full: bool = field(default=False, validator=_bool)


@message(30)
@frozen
class PlacementRequest(Message):
    """Which of these chunks must be sent, and to which servers."""

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_rows(ChunkNeed, limits.MAX_BATCH_CHUNKS))
    #: Servers the client could not use: the placement avoids them.
    exclude: list = field(factory=list, validator=_servers)


@message(31)
@frozen
class Placement(Message):
    """``known`` chunks are held already; each other one gets its servers, primary first."""

    IS_REPLY = True
    request_id: int = _request_id
    known: list = field(factory=list, validator=_batch_ids)
    assignments: dict = field(factory=dict, converter=_holders_map(limits.MAX_BATCH_CHUNKS))
    #: The cluster's replication factor: an assignment with fewer servers is degraded.
    replicas: int = field(default=limits.DEFAULT_REPLICAS,
                          validator=[_int, ge(1), le(limits.MAX_REPLICAS)])
    #: One for each chain of servers in ``assignments``, naming the chunks placed on it.
    tickets: list = field(factory=list, converter=_records(Ticket, limits.MAX_BATCH_CHUNKS))


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
    """A page of the snapshots, oldest first: at most ``limit``, those after the snapshot
    ``after_id`` (made at ``after_time``); from the first when ``after_id`` is empty. Those
    of one repository, or of all when ``repo`` is empty."""

    request_id: int = _request_id
    after_time: float = field(default=0, validator=_time)
    after_id: str = field(default="", validator=_optional_hex_digest)
    limit: int = field(default=limits.MAX_SNAPSHOTS_PER_PAGE,
                       validator=[_int, ge(1), le(limits.MAX_SNAPSHOTS_PER_PAGE)])
    repo: str = field(default="", validator=_optional_repo_name)


@message(38)
@frozen
class SnapshotList(Message):
    """A page of snapshots; ``more``: ask again after the last of them."""

    IS_REPLY = True
    request_id: int = _request_id
    snapshots: list = field(factory=list, converter=_records(SnapshotSummary,
                                                             limits.MAX_SNAPSHOTS_PER_PAGE))
    more: bool = field(default=False, validator=_bool)

    @classmethod
    def filled(cls, request_id: int, summaries: list, limit: int) -> "SnapshotList":
        """A page of the first of ``summaries``: at most ``limit``, at least one, and no more
        than fit in ``SNAPSHOT_PAGE_BYTES`` of header; ``more`` when any are left over."""
        page, size = [], 0
        for summary in summaries[:limit]:
            size += len(_json(summary.to_wire())) + 1
            if page and size > limits.SNAPSHOT_PAGE_BYTES:
                break
            page.append(summary)
        return cls(request_id=request_id, snapshots=page, more=len(page) < len(summaries))


@message(39)
@frozen
class Locate(Message):
    """Where these chunks or objects are (read-only; places nothing)."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_locate_ids)


@message(40)
@frozen
class Locations(Message):
    """The live holders of each chunk asked about (all recorded ones when none is live);
    a chunk with no recorded copy is left out."""

    IS_REPLY = True
    request_id: int = _request_id
    holders: dict = field(factory=dict, converter=_holders_map(limits.MAX_LOCATE_IDS))


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
    replicas: int = field(default=limits.DEFAULT_REPLICAS,
                          validator=[_int, ge(1), le(limits.MAX_REPLICAS)])
    servers: list = field(factory=list, converter=_records(ServerState, limits.MAX_SERVERS))
    snapshots: int = field(default=0, validator=_non_negative)
    chunks: int = field(default=0, validator=_non_negative)
    under_replicated: int = field(default=0, validator=_non_negative)
    #: Chunks in use with no live copy at all.
    missing: int = field(default=0, validator=_non_negative)


@message(14)
@frozen
class ReplicateChunk(Message):
    """From the manager: send a chunk you hold along ``forward_to`` (re-replication), under
    ``ticket`` (its chain: this server, then ``forward_to``)."""

    request_id: int = _request_id
    chunk_id: str = field(default="", validator=_hex_digest)
    forward_to: list = field(factory=list, validator=_chain)
    ticket: Ticket | None = _ticket


@message(23)
@frozen
class ChunksAdded(Message):
    """One-way, server to manager: chunks this server has just stored (``snapshots``: the
    snapshot objects among them)."""

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_rows(HeldChunk, limits.MAX_IDS))
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
    servers_checked: list = field(factory=list, validator=_servers)
    servers_unreachable: list = field(factory=list, validator=_servers)
    chunks: int = field(default=0, validator=_non_negative)
    #: Chunks and objects that snapshots reference and no live server holds.
    missing: int = field(default=0, validator=_non_negative)
    under_replicated: int = field(default=0, validator=_non_negative)
    corrupt: int = field(default=0, validator=_non_negative)
    snapshots: int = field(default=0, validator=_non_negative)
    #: Tree and chunk list objects read while walking every snapshot.
    trees: int = field(default=0, validator=_non_negative)
    #: Snapshots that reference something missing (they cannot be fully restored).
    damaged: list = field(factory=list, validator=_hex_digests)


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


def payload_pieces(chunks: list, payload: bytes) -> list[tuple[ChunkRef, memoryview]]:
    """Each chunk's bytes in a payload of chunks one after another: views, not copies."""
    view, offset, found = memoryview(payload), 0, []
    for ref in chunks:
        found.append((ref, view[offset : offset + ref.size]))
        offset += ref.size
    return found


@message(15)
@frozen
class StoreChunks(Message):
    """Several chunks in one frame: their bytes follow each other in ``payload``.

    Stored, then forwarded, then confirmed as one: a round trip and a thread hop
    for many small files instead of one each.
    """

    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_rows(ChunkRef, limits.MAX_BATCH_CHUNKS))
    forward_to: list = field(factory=list, validator=_chain)
    kind: str = _kind
    ticket: Ticket | None = _ticket
    payload: bytes = _payload

    def __attrs_post_init__(self):
        if sum(c.size for c in self.chunks) != len(self.payload):
            raise ValueError("the chunks' sizes do not add up to the payload's length")

    def pieces(self) -> list[tuple[ChunkRef, memoryview]]:
        return payload_pieces(self.chunks, self.payload)


@message(16)
@frozen
class ChunksStored(Message):
    """Every chunk of a StoreChunks is on disk at every server in ``holders``."""

    IS_REPLY = True
    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_batch_ids)
    holders: list = field(factory=list, validator=_chain)


# --- batched fetch (restore) ---

#: Ids one FetchChunks may ask for.
MAX_FETCH_IDS = 4096
#: Chunk bytes one ChunksData carries at most (a single larger chunk still travels alone).
FETCH_REPLY_BYTES = MAX_CHUNK_SIZE


def _fetch_ids(instance, attribute, value):
    _hex_digests(instance, attribute, value)
    if len(value) > MAX_FETCH_IDS:
        raise ValueError(f"{attribute.name} holds {len(value)} ids, more than {MAX_FETCH_IDS}")


@message(17)
@frozen
class FetchChunks(Message):
    """Many chunks in one round trip and one disk thread hop (a restore's small files)."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_fetch_ids)


@message(18)
@frozen
class ChunksData(Message):
    """What the server could give of a FetchChunks, its bytes one after another in ``payload``.

    ``missing`` and ``corrupt`` are the ids it has no good copy of (ask another
    holder for just those). An id in neither list nor in ``chunks`` did not fit
    in this reply: ask again.
    """

    IS_REPLY = True
    request_id: int = _request_id
    chunks: list = field(factory=list, converter=_rows(ChunkRef))
    missing: list = field(factory=list, validator=_fetch_ids)
    corrupt: list = field(factory=list, validator=_fetch_ids)
    payload: bytes = _payload

    def __attrs_post_init__(self):
        if len(self.chunks) > MAX_FETCH_IDS:
            raise ValueError(f"more than {MAX_FETCH_IDS} chunks")
        if sum(c.size for c in self.chunks) != len(self.payload):
            raise ValueError("the chunks' sizes do not add up to the payload's length")

    def pieces(self) -> list[tuple[ChunkRef, memoryview]]:
        return payload_pieces(self.chunks, self.payload)


# --- forget ---


@message(50)
@frozen
class ForgetSnapshots(Message):
    """From an admin: unlist these snapshots and have every server delete their objects (the
    data they reference stays until a prune)."""

    request_id: int = _request_id
    snapshot_ids: list = field(factory=list, validator=_hex_digests)


@message(51)
@frozen
class SnapshotsForgotten(Message):
    """The snapshots forgotten (those asked for that were listed)."""

    IS_REPLY = True
    request_id: int = _request_id
    snapshot_ids: list = field(factory=list, validator=_hex_digests)


@message(52)
@frozen
class DeleteSnapshots(Message):
    """From the manager: delete these snapshot objects, durably (Ack); unheld ones are no
    error."""

    request_id: int = _request_id
    snapshot_ids: list = field(factory=list, validator=_hex_digests)


# --- servers: list, drain, retire ---


@frozen
class ServerInfo(Record):
    """A storage server as ``sdbackup server list`` shows it."""

    address: str = field(validator=_address)
    disk_id: str = field(validator=_text(limits.MAX_DISK_ID_LENGTH, ascii=True))
    alive: bool = field(validator=_bool)
    last_seen: float = field(validator=_time)
    #: Copies the catalog records on it, and their bytes.
    chunks: int = field(validator=_non_negative)
    bytes: int = field(validator=_non_negative)
    free_bytes: int = field(validator=_non_negative)
    total_bytes: int = field(validator=_non_negative)
    full: bool = field(validator=_bool)
    draining: bool = field(validator=_bool)
    retired: bool = field(validator=_bool)
    #: Of its chunks, those with fewer copies than the factor on the other live servers that
    #: are not draining: what a drain has still to copy, what a retirement would put at risk.
    short: int = field(validator=_non_negative)
    #: Of those, the ones no other live server holds at all.
    only_here: int = field(validator=_non_negative)


@message(65)
@frozen
class ListServers(Message):
    """Every storage server the manager knows (``sdbackup server list``)."""

    request_id: int = _request_id


@message(66)
@frozen
class ServerList(Message):
    IS_REPLY = True
    request_id: int = _request_id
    servers: list = field(factory=list, converter=_records(ServerInfo, limits.MAX_SERVERS))
    replicas: int = field(default=limits.DEFAULT_REPLICAS,
                          validator=[_int, ge(1), le(limits.MAX_REPLICAS)])


@message(67)
@frozen
class DrainServer(Message):
    """From an admin: place nothing more on this server and copy every chunk it holds to the
    others (answered at once with its ServerList entry; ask again for progress)."""

    request_id: int = _request_id
    address: str = field(default="", validator=_address)


@message(68)
@frozen
class RetireServer(Message):
    """From an admin: forget a dead or drained server, refused while any chunk it holds lacks
    its full copies elsewhere (answered with its last ServerList entry)."""

    request_id: int = _request_id
    address: str = field(default="", validator=_address)


# --- placement tickets ---


@message(70)
@frozen
class Registered(Message):
    """The manager's answer to a RegisterServer: the keys its placement tickets are signed
    with (``sdbackup.tickets``), newest last."""

    IS_REPLY = True
    request_id: int = _request_id
    ticket_keys: list = field(factory=list, converter=_records(TicketKey, limits.MAX_TICKET_KEYS),
                              repr=False)


@message(71)
@frozen
class TicketKeys(Message):
    """From the manager: the keys its tickets are signed with now, newest last (they
    replace those given before); answered with an Ack."""

    request_id: int = _request_id
    ticket_keys: list = field(factory=list, converter=_records(TicketKey, limits.MAX_TICKET_KEYS),
                              repr=False)


# --- encryption: a repository's key objects ---

#: Key objects listed for one repository at most.
MAX_KEYS = 1000


def _key_ids(instance, attribute, value):
    _hex_digests(instance, attribute, value)
    if len(value) > MAX_KEYS:
        raise ValueError(f"{attribute.name} holds {len(value)} ids, more than {MAX_KEYS}")


@message(80)
@frozen
class ListKeys(Message):
    """The key objects of a repository (none: it is not initialised, it is plaintext)."""

    request_id: int = _request_id
    repo: str = field(default="default", validator=_repo_name)


@message(81)
@frozen
class KeyList(Message):
    IS_REPLY = True
    request_id: int = _request_id
    key_ids: list = field(factory=list, validator=_key_ids)


@message(82)
@frozen
class CommitKey(Message):
    """A key object the client has stored: the manager reads it from a server and lists it
    under its repository (answered with KeyCommitted)."""

    request_id: int = _request_id
    key_id: str = field(default="", validator=_hex_digest)
    #: The repository's first key (``init``): refused when it has another already.
    first: bool = field(default=False, validator=_bool)


@message(83)
@frozen
class KeyCommitted(Message):
    IS_REPLY = True
    request_id: int = _request_id
    key_id: str = field(default="", validator=_hex_digest)
    repo: str = field(default="default", validator=_repo_name)


@message(84)
@frozen
class RemoveKey(Message):
    """Unlist a key object and have every live server delete it (Ack); the last key of a
    repository is never removed."""

    request_id: int = _request_id
    key_id: str = field(default="", validator=_hex_digest)


# --- tags ---


@message(75)
@frozen
class ReplaceSnapshot(Message):
    """From a client's ``tag``: list the stored snapshot ``snapshot_id`` instead of
    ``replaces`` (answered with SnapshotCommitted). The manager lists it only if it has the
    same root tree, host and paths, so a tag change can hide or swap no content."""

    request_id: int = _request_id
    snapshot_id: str = field(default="", validator=_hex_digest)
    replaces: str = field(default="", validator=_hex_digest)


# --- prune ---

#: What a prune is doing: reading the snapshots' objects, deleting unreachable chunks,
#: trimming copies above the factor; then done, or failed (``error`` says why).
PRUNE_STATES = ("marking", "sweeping", "trimming", "done", "failed")


@message(60)
@frozen
class PruneRequest(Message):
    """From an admin: start a prune (``sdbackup prune``), or with ``dry_run`` count what it
    would free; answered at once with its PruneStatus (ask PruneStatusRequest for more)."""

    request_id: int = _request_id
    dry_run: bool = field(default=False, validator=_bool)


@message(61)
@frozen
class PruneStatusRequest(Message):
    """From an admin: how is the prune under way, or the last one, doing?"""

    request_id: int = _request_id


@message(62)
@frozen
class PruneStatus(Message):
    """A prune's figures so far (final once ``state`` is done or failed)."""

    IS_REPLY = True
    request_id: int = _request_id
    prune_id: int = field(default=0, validator=_non_negative)
    state: str = field(default="done", validator=in_(PRUNE_STATES))
    dry_run: bool = field(default=False, validator=_bool)
    #: Seconds since it started; the grace period it kept (see ``services/prune.py``).
    elapsed: float = field(default=0.0, validator=_time)
    grace: float = field(default=0.0, validator=_time)
    snapshots: int = field(default=0, validator=_non_negative)
    #: Objects read and chunks found reachable by the mark.
    objects_read: int = field(default=0, validator=_non_negative)
    reachable: int = field(default=0, validator=_non_negative)
    #: Unreachable chunks: to delete (and their bytes, one copy each), and those spared
    #: because a backup stored or counted on them within the grace period.
    unreachable: int = field(default=0, validator=_non_negative)
    unreachable_bytes: int = field(default=0, validator=_non_negative)
    recent: int = field(default=0, validator=_non_negative)
    #: Unreachable chunks dealt with so far (of ``unreachable``), and their copies deleted
    #: on the servers (would be, with dry_run), with the bytes freed.
    swept: int = field(default=0, validator=_non_negative)
    deleted_chunks: int = field(default=0, validator=_non_negative)
    deleted_copies: int = field(default=0, validator=_non_negative)
    deleted_bytes: int = field(default=0, validator=_non_negative)
    #: Copies above the replication factor deleted (would be), and their bytes.
    trimmed_copies: int = field(default=0, validator=_non_negative)
    trimmed_bytes: int = field(default=0, validator=_non_negative)
    error: str = field(default="", converter=_reason, validator=_str)


@message(63)
@frozen
class DeleteChunks(Message):
    """From the manager: delete these chunks (data, trees, chunk lists; never snapshot
    objects), but those written or stored again here less than ``min_age`` seconds ago."""

    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)
    min_age: float = field(default=0.0, validator=_time)


@message(64)
@frozen
class ChunksDeleted(Message):
    """What a DeleteChunks removed (and the bytes freed), and what it kept as too new."""

    IS_REPLY = True
    request_id: int = _request_id
    chunk_ids: list = field(factory=list, validator=_hex_digests)
    freed_bytes: int = field(default=0, validator=_non_negative)
    kept: list = field(factory=list, validator=_hex_digests)


# --- codec ------------------------------------------------------------------

#: Bytes of a frame's start that name its type (what ``frame_limit`` reads).
TYPE_CODE_SIZE = 2
#: Bytes of a frame's start that hold its type and its header's length: a connection checks
#: the frame's length against ``frame_limit`` as soon as they arrive, and learns where its
#: payload begins (``payload_offset``).
HEAD_SIZE = _HEAD.size
#: The handshake's frame, and a request or reply of a few bounded fields.
HELLO_FRAME = 1024
SMALL_FRAME = 64 * 1024
#: One snapshot's summary (its text is bounded by ``limits.MAX_SNAPSHOT_TEXT``), a page of them.
SUMMARY_FRAME = 512 * 1024
SNAPSHOT_PAGE_FRAME = limits.SNAPSHOT_PAGE_BYTES + SUMMARY_FRAME
#: A list of ``limits.MAX_IDS`` chunk ids (67 bytes each in JSON), or of a batch's.
ID_LIST_FRAME = 4 * 1024 * 1024
BATCH_FRAME = 512 * 1024
#: Pages of chunks with sizes, of locations, of servers.
LIST_FRAME = _HEAD.size + MAX_HEADER_SIZE

#: The largest legal frame of each message type. A type not named here may use the
#: largest frame of all (``MAX_FRAME_SIZE``).
FRAME_LIMITS: dict[type, int] = {
    Hello: HELLO_FRAME,
    ErrorReply: SMALL_FRAME,
    Ack: SMALL_FRAME,
    StoreChunk: MAX_FRAME_SIZE,
    ChunkStored: SMALL_FRAME,
    FetchChunk: SMALL_FRAME,
    ChunkData: MAX_FRAME_SIZE,
    ReplicateChunk: SMALL_FRAME,
    StoreChunks: MAX_FRAME_SIZE,
    ChunksStored: BATCH_FRAME,
    RegisterServer: SMALL_FRAME,
    ChunkInventory: LIST_FRAME,
    Heartbeat: SMALL_FRAME,
    ChunksAdded: LIST_FRAME,
    ChunksCorrupt: ID_LIST_FRAME,
    VerifyChunks: SMALL_FRAME,
    VerifyReport: ID_LIST_FRAME,
    SyncNotices: SMALL_FRAME,
    PlacementRequest: LIST_FRAME,
    Placement: LIST_FRAME,
    CommitSnapshot: SMALL_FRAME,
    SnapshotCommitted: SUMMARY_FRAME,
    ListSnapshots: SMALL_FRAME,
    SnapshotList: SNAPSHOT_PAGE_FRAME,
    Locate: ID_LIST_FRAME,
    Locations: LIST_FRAME,
    StatusRequest: SMALL_FRAME,
    ClusterStatus: LIST_FRAME,
    CheckRequest: SMALL_FRAME,
    CheckReport: LIST_FRAME,
    HasChunks: ID_LIST_FRAME,
    ChunksHeld: ID_LIST_FRAME,
    FetchChunks: ID_LIST_FRAME,
    ChunksData: MAX_FRAME_SIZE,
    ForgetSnapshots: ID_LIST_FRAME,
    SnapshotsForgotten: ID_LIST_FRAME,
    DeleteSnapshots: ID_LIST_FRAME,
    ReplaceSnapshot: SMALL_FRAME,
    Registered: SMALL_FRAME,
    TicketKeys: SMALL_FRAME,
    ListServers: SMALL_FRAME,
    ServerList: LIST_FRAME,
    DrainServer: SMALL_FRAME,
    RetireServer: SMALL_FRAME,
    PruneRequest: SMALL_FRAME,
    PruneStatusRequest: SMALL_FRAME,
    PruneStatus: SMALL_FRAME,
    DeleteChunks: ID_LIST_FRAME,
    ChunksDeleted: LIST_FRAME,
    ListKeys: SMALL_FRAME,
    KeyList: ID_LIST_FRAME,
    CommitKey: SMALL_FRAME,
    KeyCommitted: SMALL_FRAME,
    RemoveKey: SMALL_FRAME,
}


def max_frame_size(message_type: "int | type") -> int:
    """The largest legal frame (without its length prefix) of a message type, given by its
    class or its type code; for an unknown code, the least a frame can be."""
    cls = MESSAGE_TYPES.get(message_type) if isinstance(message_type, int) else message_type
    if cls is None:
        return _HEAD.size
    return FRAME_LIMITS.get(cls, MAX_FRAME_SIZE)


def frame_limit(head: bytes) -> int:
    """The largest legal length of a frame that starts with ``head`` (its first
    ``TYPE_CODE_SIZE`` bytes): what a connection checks before it buffers the frame."""
    return max_frame_size(int.from_bytes(head[:TYPE_CODE_SIZE], "big"))


def payload_offset(head: bytes) -> int:
    """Where the payload of a frame that starts with ``head`` (``HEAD_SIZE`` bytes) begins: a
    connection receives a frame's payload apart, so it is not copied out of the frame."""
    return HEAD_SIZE + _HEAD.unpack_from(head)[1]


#: The rows: orjson writes them as arrays (through ``_row_as_tuple``).
_ROWS = (ChunkRef, HeldChunk, ChunkNeed)
#: What orjson writes as it is: a list of only these needs no copy.
_AS_IS = {str, int, float, bool, type(None), *_ROWS}


def _to_wire(value: Any):
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, list):
        if set(map(type, value)) <= _AS_IS:
            return value
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
    header = _json(fields)
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError(f"{type(msg).__name__} header of {len(header)} bytes is too large")
    length, limit = _HEAD.size + len(header) + len(payload), max_frame_size(type(msg))
    if length > limit:
        raise ValueError(f"{type(msg).__name__} of {length} bytes exceeds its limit of {limit}")
    if payload:
        return [_HEAD.pack(msg.TYPE_CODE, len(header)), header, payload]
    return [_HEAD.pack(msg.TYPE_CODE, len(header)), header]


def encode_frame(msg: Message) -> bytes:
    return b"".join(encode(msg))


def decode(frame: bytes, payload: bytes | None = None) -> Message:
    """The message in ``frame``; ``DecodeError`` says why it is not one. ``payload``: the
    bytes after the header when they were received apart (``frame`` then ends with it)."""
    if len(frame) < _HEAD.size:
        raise DecodeError(f"frame of {len(frame)} bytes is shorter than a message head")
    code, header_length = _HEAD.unpack_from(frame)
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise DecodeError(f"unknown message type {code}")
    if len(frame) > max_frame_size(cls):
        raise DecodeError(f"{cls.__name__} of {len(frame)} bytes exceeds its limit of "
                          f"{max_frame_size(cls)}")
    header_end = _HEAD.size + header_length
    if header_end > len(frame):
        raise DecodeError(f"{cls.__name__}: header runs past the end of the frame")
    try:
        # (orjson refuses NaN, infinities, bad UTF-8, lone surrogates and nesting past 1,024)
        fields = orjson.loads(frame[_HEAD.size : header_end])
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"{cls.__name__}: header is not JSON: {shorten(str(e))}") from None
    if not isinstance(fields, dict):
        raise DecodeError(f"{cls.__name__}: header is not an object")
    names = {a.name for a in attrs.fields(cls)}
    if payload is None:
        payload = frame[header_end:]
    if "payload" in names:
        fields["payload"] = bytes(payload)
    elif payload:
        raise DecodeError(f"{cls.__name__} carries no payload but {len(payload)} bytes follow")
    unknown = set(fields) - names
    if unknown:
        raise DecodeError(f"{cls.__name__}: unknown fields {shorten(sorted(unknown))}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        # (attrs' own messages repeat the value: a peer's, maybe megabytes of it)
        raise DecodeError(f"{cls.__name__}: {shorten(str(e))}") from None


def _json(fields) -> bytes:
    """Compact UTF-8 JSON of a header's fields; ``ValueError`` for what JSON cannot carry (a
    string that is not valid Unicode, an integer past 64 bits)."""
    try:
        return orjson.dumps(fields, default=_row_as_tuple)
    except orjson.JSONEncodeError as e:
        raise ValueError(f"cannot encode a message: {e}") from None


def _row_as_tuple(value) -> tuple:
    """A row as the plain tuple orjson writes (it writes no tuple subclass); nothing else:
    bytes or a set in a header is a sender's bug, refused, not written as an array."""
    if type(value) in _ROWS:
        return tuple(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")
