"""How much a peer may send, in one place, and how much of it a log line repeats.

Every string, list and number that arrives from the network has a bound here.
The message decoder checks them (``sdbackup.protocols.messages``), so an
over-long field rejects its frame before any service sees it, and nothing a
peer sent can be stored that later breaks a listing, a status or a backup.
Each bound is generous for honest use and small next to the frame that
carries it.
"""

import math

#: An endpoint string a server is reached at (``tcp:host:port``; a DNS name is 253 at most);
#: printable ASCII.
MAX_ADDRESS_LENGTH = 300
#: The host name a snapshot was made on.
MAX_HOST_LENGTH = 255
#: One tag of a snapshot, and tags per snapshot.
MAX_TAG_LENGTH = 255
MAX_TAGS = 64
#: One backed-up path as listed (escaped: a byte that is not text takes 4 characters), and
#: paths per snapshot.
MAX_PATH_LENGTH = 4 * 4096
MAX_SNAPSHOT_PATHS = 1024
#: Host, paths and tags of one snapshot together, in characters: a summary stays small.
MAX_SNAPSHOT_TEXT = 64 * 1024
#: A machine-readable error code, and the text of an error a user reads (longer is cut).
MAX_CODE_LENGTH = 64
MAX_REASON_LENGTH = 4096
#: Chunk ids in one request or reply (inventory and notice pages, HasChunks, ...).
MAX_IDS = 50_000
#: Chunks in one StoreChunks or placement (the client sends 128 and 256 at most): a
#: Placement names servers for each, so it stays within its frame.
MAX_BATCH_CHUNKS = 4096
#: Chunk ids one Locate asks about (the client asks 10,000 at most): the Locations reply
#: names servers for each.
MAX_LOCATE_IDS = 10_000
#: Copies of a chunk: the replication factor, the servers of one chain, the holders of an id.
MAX_REPLICAS = 16
#: The replication factor of a manager started without ``--replicas`` (and of a message
#: that does not say).
DEFAULT_REPLICAS = 2
#: A data folder's identity (32 hex digits today).
MAX_DISK_ID_LENGTH = 64
#: The name of a key the manager signs placement tickets with, and keys a server holds at once.
MAX_KEY_ID_LENGTH = 64
MAX_TICKET_KEYS = 8
#: Servers in one listing (status, check, a placement's exclusions).
MAX_SERVERS = 2048
#: Snapshots in one page of a listing, and the header bytes a page is filled up to.
MAX_SNAPSHOTS_PER_PAGE = 1000
SNAPSHOT_PAGE_BYTES = 1024 * 1024
#: Counts and sizes fit SQLite's signed 64-bit integers.
MAX_COUNT = 2**63 - 1
#: Times (seconds since the epoch) are finite and exact as doubles.
MAX_TIME = 2.0**53

#: Characters of a peer's value that a log line or an error text repeats.
LOG_VALUE_LENGTH = 200


def shorten(value, limit: int = LOG_VALUE_LENGTH) -> str:
    """``value`` as text for a log line: its first ``limit`` characters (saying how long it
    was), control characters escaped, so a peer can neither flood a log nor forge its lines."""
    if isinstance(value, bytes | list | tuple) and len(value) > limit:
        text = f"{repr(value[:limit])[:limit]}... ({len(value)} items)"  # (no repr of it all)
    else:
        text = value if isinstance(value, str) else repr(value)
        if len(text) > limit:
            text = f"{text[:limit]}... ({len(text)} characters)"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text


def text_problem(value, max_length: int, ascii: bool = False) -> str | None:
    """Why ``value`` is not a printable string (of ASCII only, with ``ascii``) of at most
    ``max_length`` characters; None when it is. (The value is not repeated: it may be huge.)"""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if len(value) > max_length:
        return f"is {len(value)} characters long, more than {max_length}"
    if not value.isprintable():
        return "holds characters that are not printable"
    if ascii and not value.isascii():
        return "holds characters that are not ASCII"
    return None


def time_problem(value) -> str | None:
    """Why ``value`` is not a time in seconds (a finite number, not absurdly far)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"is a {type(value).__name__}, not a number"
    if not (isinstance(value, int) or math.isfinite(value)) or abs(value) > MAX_TIME:
        return "is not a time"
    return None


def snapshot_problem(host, paths, tags) -> str | None:
    """Why a snapshot's host, (escaped) paths and tags are more than a listing may carry;
    None when they fit. The index refuses such a snapshot; a client can refuse it first."""
    problem = text_problem(host, MAX_HOST_LENGTH)
    if problem:
        return f"host {problem}"
    for name, values, count, limit in (("paths", paths, MAX_SNAPSHOT_PATHS, MAX_PATH_LENGTH),
                                       ("tags", tags, MAX_TAGS, MAX_TAG_LENGTH)):
        if not isinstance(values, list | tuple):
            return f"{name} are not a list"
        if len(values) > count:
            return f"{len(values)} {name}, more than {count}"
        for value in values:
            problem = text_problem(value, limit)
            if problem:
                return f"one of the {name} {problem}"
    total = len(host) + sum(len(p) for p in paths) + sum(len(t) for t in tags)
    if total > MAX_SNAPSHOT_TEXT:
        return f"host, paths and tags are {total} characters, more than {MAX_SNAPSHOT_TEXT}"
    return None
