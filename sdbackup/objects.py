"""The objects a cluster stores besides file data: trees, chunk lists and snapshots.

Pure encode and decode functions, no I/O. Like git's tree and commit objects,
an object's id is the hash of its canonical bytes, so the same folder state
always gives the same tree id and an unchanged folder stores nothing new.

Every object is an *envelope*::

    magic "SDBO" | format version (1 byte: 1, or 2 for a paged tree's head) | kind (1 byte)
    | tree ref count (4 bytes) | data ref count (4 bytes)
    | tree refs (32 bytes each) | data refs (32 bytes each) | body

The refs are the ids the object points to, in a part the cluster reads
without any key: *tree refs* are objects to walk further (subtrees, chunk
lists, a snapshot's root tree), *data refs* are leaves (file chunks). Repair,
``check`` and, later, garbage collection walk the graph through them alone;
the body (msgpack, canonical: maps with sorted keys, defaults left out) is
what a client reads, and is what client-side encryption will seal.

A folder too large for one tree object is *paged* (``split_tree``): trees of
runs of its nodes, listed in order by a head (``encode_tree_head``).

Names, link targets and extended attributes are bytes: a Linux name is any
bytes but ``/`` and NUL, and comes back exactly.
"""

import operator
import struct
from collections.abc import Iterable

import attrs
import msgpack
from attrs import field, frozen

from sdbackup import hashing

MAGIC = b"SDBO"
#: The newest object format this sdbackup reads. An object is written in the oldest format
#: that can hold it: version 2 added paged trees, so a tree head is version 2 and every
#: other object version 1, as before (their ids did not change); a reader of version 1
#: alone refuses a head as written by a newer sdbackup rather than misread it.
FORMAT_VERSION = 2
HEAD_VERSION = 2
_HEAD = struct.Struct("!4sBBII")
ID_SIZE = hashing.DIGEST_SIZE


class Kind:
    """What a stored chunk is. Data chunks are raw file bytes, never an envelope."""

    DATA = "data"
    TREE = "tree"
    LIST = "list"
    SNAPSHOT = "snapshot"
    #: A repository's master key wrapped under a password (``sdbackup.sealing``).
    KEY = "key"


KINDS = (Kind.DATA, Kind.TREE, Kind.LIST, Kind.SNAPSHOT, Kind.KEY)
_KIND_CODES = {Kind.TREE: 1, Kind.LIST: 2, Kind.SNAPSHOT: 3, Kind.KEY: 4}
_KIND_NAMES = {code: name for name, code in _KIND_CODES.items()}
#: Set in the kind byte of an object whose body is sealed (``sdbackup.sealing``).
_SEALED = 0x80

#: Node types. Sockets are not backed up (nothing can restore one meaningfully).
NODE_TYPES = ("file", "dir", "symlink", "fifo", "chardev", "blockdev")
#: A file with more chunks than this keeps them in chunk list objects, this many a list.
INLINE_CONTENT = 16_384
#: A folder whose tree would be larger than this is stored as *pages*: trees of runs of its
#: nodes, listed in order by a *head* tree (half a chunk: a sealed page still fits one).
TREE_PAGE_SIZE = 4 * 1024 * 1024


class ObjectFormatError(ValueError):
    """Bytes that are not a valid object of the expected kind and version."""

    code = "bad-object"


# --- envelope ------------------------------------------------------------------


@frozen
class Envelope:
    kind: str
    tree_refs: tuple
    data_refs: tuple
    body: bytes
    version: int = 1
    #: The body is encrypted (an initialised repository's); the refs stay readable.
    sealed: bool = False


def seal(kind: str, tree_refs: Iterable[bytes], data_refs: Iterable[bytes], body: bytes,
         sealed: bool = False, version: int = 1) -> bytes:
    """The canonical bytes of an object: refs sorted and unique, then the body (``sealed``:
    an encrypted one), in format ``version``."""
    trees = sorted(set(tree_refs))
    data = sorted(set(data_refs))
    for ref in (*trees, *data):
        if len(ref) != ID_SIZE:
            raise ValueError(f"an object ref is {ID_SIZE} bytes, not {len(ref)}")
    code = _KIND_CODES[kind] | (_SEALED if sealed else 0)
    return b"".join((_HEAD.pack(MAGIC, version, code, len(trees), len(data)),
                     *trees, *data, body))


def open_envelope(data: bytes, kind: str | None = None) -> Envelope:
    """The envelope in ``data``; ``ObjectFormatError`` says why it is not one."""
    if len(data) < _HEAD.size:
        raise ObjectFormatError("too short for an object")
    magic, version, code, tree_count, data_count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ObjectFormatError("not an sdbackup object")
    if not 1 <= version <= FORMAT_VERSION:
        raise ObjectFormatError(f"object format version {version} is not one this sdbackup "
                                f"reads (1 to {FORMAT_VERSION}); a newer sdbackup wrote it")
    found = _KIND_NAMES.get(code & ~_SEALED)
    if found is None:
        raise ObjectFormatError(f"unknown object kind {code}")
    if version == HEAD_VERSION and found != Kind.TREE:
        raise ObjectFormatError(f"a {found} object is of format version 1, not {version}")
    if kind is not None and found != kind:
        raise ObjectFormatError(f"expected a {kind} object, found a {found}")
    start = _HEAD.size
    end = start + (tree_count + data_count) * ID_SIZE
    if end > len(data):
        raise ObjectFormatError("refs run past the end of the object")
    refs = [bytes(data[i : i + ID_SIZE]) for i in range(start, end, ID_SIZE)]
    return Envelope(found, tuple(refs[:tree_count]), tuple(refs[tree_count:]),
                    bytes(data[end:]), version, bool(code & _SEALED))


def _plain_envelope(data: bytes, kind: str) -> Envelope:
    envelope = open_envelope(data, kind)
    if envelope.sealed:
        raise ObjectFormatError(f"the {kind} is encrypted: its repository needs a password")
    return envelope


def object_id(kind: str, data: bytes) -> str:
    """The id (hex) of an object's bytes: a hash kept apart from file-chunk ids by kind."""
    return hashing.object_id(kind, data)


# --- canonical msgpack -------------------------------------------------------------


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(body: bytes, what: str):
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ObjectFormatError(f"{what} body is not valid: {e}") from None


def _canonical_map(fields: dict, defaults: dict) -> dict:
    """Sorted keys, defaults left out: one state, one encoding."""
    return {k: fields[k] for k in sorted(fields) if fields[k] != defaults.get(k)}


def _check_id(value, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_SIZE:
        raise ObjectFormatError(f"{what} is not a {ID_SIZE}-byte id")
    return value


# --- nodes and trees ------------------------------------------------------------------


def _check_ids(value, what: str):
    if not isinstance(value, tuple) or not all(
            isinstance(v, bytes) and len(v) == ID_SIZE for v in value):
        raise ValueError(f"{what} must be a tuple of {ID_SIZE}-byte ids")


def _check_xattrs(value):
    if not isinstance(value, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], bytes) and p[0]
            and isinstance(p[1], bytes) for p in value):
        raise ValueError("xattrs must be a tuple of (name, value) byte pairs")
    names = [p[0] for p in value]
    if names != sorted(set(names)):
        raise ValueError("xattrs must be sorted by name, each name once")


_int = attrs.validators.instance_of(int)
_str = attrs.validators.instance_of(str)
_bytes = attrs.validators.instance_of(bytes)


def _check_node(node: "Node"):
    """Every field of ``node`` has the type and shape it must, in one pass over the whole node
    (with a validator per field, a restore decoded a node in 15 µs; now in 9 µs)."""
    name = node.name
    if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name:
        raise ValueError(f"a name is non-empty bytes without '/' or NUL: {name!r}")
    if name in (b".", b".."):
        raise ValueError(f"{name!r} cannot be a name")
    if not isinstance(node.type, str) or node.type not in NODE_TYPES:
        raise ValueError(f"a node's type is one of {', '.join(NODE_TYPES)}, not {node.type!r}")
    values = _node_plain(node)
    if not all(map(isinstance, values, _NODE_PLAIN_TYPES)):
        field_name, kind, value = next((f, k, v) for (f, k), v in zip(_NODE_PLAIN, values, strict=True)
                                       if not isinstance(v, k))
        raise ValueError(f"{field_name} must be of type {kind.__name__}, not {value!r}")
    if node.xattrs or not isinstance(node.xattrs, tuple):
        _check_xattrs(node.xattrs)
    if node.content or not isinstance(node.content, tuple):
        _check_ids(node.content, "content")
    if node.content_lists or not isinstance(node.content_lists, tuple):
        _check_ids(node.content_lists, "content_lists")


@frozen
class Node:
    """One entry of a folder, with everything a faithful restore needs.

    ``content`` holds a file's chunk ids in order, or, for a very long file,
    ``content_lists`` holds the ids of chunk list objects that hold them.
    ``dev``, ``inode`` and ``links`` tell hard links apart; ``rdev`` is a
    device's number; ``hash`` is the whole file's BLAKE3, checked on restore.
    """

    name: bytes
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    dev: int = 0
    inode: int = 0
    links: int = 0
    rdev: int = 0
    target: bytes = b""
    xattrs: tuple = ()
    content: tuple = ()
    content_lists: tuple = ()
    hash: bytes = b""
    #: (attrs runs a class's validators once all its fields are set: this one checks them all)
    subtree: bytes = field(default=b"", validator=lambda node, _attribute, _value: _check_node(node))

    def tree_refs(self) -> tuple:
        return ((self.subtree,) if self.subtree else ()) + self.content_lists

    def data_refs(self) -> tuple:
        return self.content


#: The plain fields of a node (with a default, and not a tuple) and the type each is annotated
#: with: what ``_check_node`` checks them against, so a field added is checked too.
_NODE_PLAIN = tuple((a.name, a.type) for a in attrs.fields(Node)
                    if a.default is not attrs.NOTHING and a.type is not tuple)
_NODE_PLAIN_TYPES = tuple(kind for _, kind in _NODE_PLAIN)
_node_plain = operator.attrgetter(*(name for name, _ in _NODE_PLAIN))


#: Wire key of each Node field (short keys keep trees compact) and back.
_NODE_KEYS = {
    "name": "n", "type": "t", "mode": "m", "uid": "u", "gid": "g", "user": "U", "group": "G",
    "mtime_ns": "mt", "atime_ns": "at", "ctime_ns": "ct", "size": "s", "dev": "d", "inode": "i",
    "links": "l", "rdev": "r", "target": "T", "xattrs": "x", "content": "c",
    "content_lists": "C", "hash": "h", "subtree": "st",
}
_NODE_FIELDS = {key: name for name, key in _NODE_KEYS.items()}


#: ``(wire key, default)`` of every Node field in wire-key order, and a getter of the fields'
#: values in that order: a node's map is built in one pass (msgpack packs tuples as arrays,
#: so the tuple fields go as they are).
_NODE_ORDER = tuple(sorted((key, name) for name, key in _NODE_KEYS.items()))
_NODE_SPEC = tuple((key, attrs.fields_dict(Node)[name].default) for key, name in _NODE_ORDER)
_node_values = operator.attrgetter(*(name for _, name in _NODE_ORDER))


def _node_to_map(node: Node) -> dict:
    """A node's canonical map: wire keys in order, defaults left out."""
    return {key: value for (key, default), value in zip(_NODE_SPEC, _node_values(node), strict=True)
            if value != default}


#: How a decoded node's fields are set: the slot setter of each field (past the frozen class's
#: check of the whole node), its wire key, default, and whether it holds a list to make a tuple.
_TUPLES = {a.name for a in attrs.fields(Node) if a.type is tuple}
_NODE_SLOTS = tuple((Node.__dict__[a.name].__set__, _NODE_KEYS[a.name], a.default,
                     a.name in _TUPLES) for a in attrs.fields(Node))
_NODE_WIRE_KEYS = frozenset(_NODE_FIELDS)
_LIST_KEYS = tuple(_NODE_KEYS[name] for name in sorted(_TUPLES))


def _filled_node(value: dict) -> Node:
    """A Node holding a node map's fields as they are, lists made tuples; unchecked."""
    node = object.__new__(Node)
    get = value.get
    for set_slot, key, default, listed in _NODE_SLOTS:
        item = get(key, default)
        if listed and item is not default:  # (an empty list too: one state, one value)
            item = tuple(tuple(p) if isinstance(p, list) else p for p in item)
        set_slot(node, item)
    return node


def _node_from_map(value) -> Node:
    """A node to restore: known fields, each of the type and shape it must have."""
    if not isinstance(value, dict):
        raise ObjectFormatError("a node is a map")
    unknown = value.keys() - _NODE_WIRE_KEYS
    if unknown:
        raise ObjectFormatError(f"unknown node fields {sorted(unknown, key=repr)}")
    for key in _LIST_KEYS:
        if key in value and not isinstance(value[key], list):
            raise ObjectFormatError(f"bad node: {_NODE_FIELDS[key]} is a list")
    node = _filled_node(value)
    try:
        _check_node(node)
    except (TypeError, ValueError) as e:
        raise ObjectFormatError(f"bad node: {e}") from None
    return node


def _trusted_node_from_map(value) -> Node:
    """A Node from a map of a tree whose bytes matched its id, with its name and type checked
    only (a third of the cost of a checked decode). Only for nodes compared with the file
    system, never used to touch it; a restore decodes with every check."""
    if not isinstance(value, dict) or not value.keys() <= _NODE_WIRE_KEYS:
        raise ObjectFormatError("a node is a map of known fields")
    node = _filled_node(value)
    if type(node.name) is not bytes or node.type not in NODE_TYPES:
        raise ObjectFormatError("a node has a name (bytes) and a type")
    return node


@frozen
class Tree:
    """A folder's entries, sorted by name bytes, each name once."""

    nodes: tuple

    def __attrs_post_init__(self):
        names = [n.name for n in self.nodes]
        if names != sorted(set(names)):
            raise ValueError("a tree's nodes are sorted by name, each name once")

    def find(self, name: bytes) -> Node | None:
        lo, hi = 0, len(self.nodes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.nodes[mid].name < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.nodes) and self.nodes[lo].name == name:
            return self.nodes[lo]
        return None


def make_tree(nodes: Iterable[Node]) -> Tree:
    """A tree of ``nodes`` in any order (a repeated name is an error)."""
    return Tree(tuple(sorted(nodes, key=lambda n: n.name)))


@frozen
class TreeHead:
    """A folder too large for one tree object: the ids of its pages, in name order. Each
    page is a tree of a run of the folder's nodes; together they are its tree."""

    pages: tuple


def encode_tree(tree: Tree) -> bytes:
    tree_refs = [ref for n in tree.nodes for ref in n.tree_refs()]
    data_refs = [ref for n in tree.nodes for ref in n.data_refs()]
    body = _pack([_node_to_map(n) for n in tree.nodes])
    return seal(Kind.TREE, tree_refs, data_refs, body)


def encode_tree_head(page_ids: Iterable[bytes]) -> bytes:
    """The head of a paged folder: its pages' ids, in order, in the body and as its refs
    (the cluster walks a paged folder as any tree, through its refs)."""
    pages = list(page_ids)
    return seal(Kind.TREE, pages, [], _pack({"pages": pages}), version=HEAD_VERSION)


def split_tree(tree: Tree, page_size: int) -> list[Tree]:
    """``tree`` cut into pages whose encodings stay under ``page_size`` (``[tree]`` when it
    fits one). A pure function of the nodes, so the same folder gives the same pages.

    A page ends at the first node past a quarter of ``page_size`` whose name hashes to a
    zero byte (or where the next node would not fit): the cuts depend on the names around
    them, so an entry added or changed in a large folder changes the page it falls in,
    not every page after it.
    """
    sizes = [len(_pack(_node_to_map(n))) + ID_SIZE * (len(n.tree_refs()) + len(n.data_refs()))
             for n in tree.nodes]
    budget = page_size - _HEAD.size - 16  # (the body's list header)
    if sum(sizes) <= budget:
        return [tree]
    pages, start, used = [], 0, 0
    for index, (node, size) in enumerate(zip(tree.nodes, sizes, strict=True)):
        if used and used + size > budget:
            pages.append(Tree(tree.nodes[start:index]))
            start, used = index, 0
        used += size
        if used >= budget // 4 and hashing.chunk_id(node.name).startswith("00"):
            pages.append(Tree(tree.nodes[start : index + 1]))
            start, used = index + 1, 0
    if start < len(tree.nodes):
        pages.append(Tree(tree.nodes[start:]))
    return pages


def join_pages(pages: Iterable[Tree]) -> Tree:
    """A paged folder's tree: its pages' nodes in order (``Tree`` refuses pages out of order
    or a name in two of them)."""
    try:
        return Tree(tuple(node for page in pages for node in page.nodes))
    except ValueError as e:
        raise ObjectFormatError(f"a paged tree's pages do not follow one another: {e}") from None


def _tree_body(envelope: Envelope):
    """A tree's body, unpacked: a list of node maps in version 1, a head's map in version 2
    (one shape a version, so one folder state has one encoding)."""
    items = _unpack(envelope.body, "tree")
    if isinstance(items, dict) != (envelope.version == HEAD_VERSION):
        raise ObjectFormatError(f"a tree of format version {envelope.version} is "
                                + ("a head of pages" if envelope.version == HEAD_VERSION
                                   else "a list of nodes"))
    return items


def _decode_head(envelope: Envelope, body: dict) -> TreeHead:
    pages = body.get("pages")
    if body.keys() != {"pages"} or not isinstance(pages, list) or len(pages) < 2:
        raise ObjectFormatError("a tree head is a map of two or more pages")
    ids = tuple(_check_id(page, "a tree page") for page in pages)
    if len(set(ids)) != len(ids) or set(ids) != set(envelope.tree_refs) or envelope.data_refs:
        raise ObjectFormatError("a tree head's refs do not match its pages")
    return TreeHead(ids)


def decode_tree(data: bytes, trusted: bool = False) -> Tree | TreeHead:
    """The tree in ``data``, or the head of a paged one (``TreeHead``: read its pages, then
    ``join_pages``). ``trusted``: ``data`` was checked against its id, and its nodes
    are only compared with the file system, never used to touch it (a backup's parent trees):
    only their names and types are checked. The structure is checked all the
    same: known fields, names in order, refs matching the nodes."""
    envelope = _plain_envelope(data, Kind.TREE)
    items = _tree_body(envelope)
    if isinstance(items, dict):
        return _decode_head(envelope, items)
    if not isinstance(items, list):
        raise ObjectFormatError("a tree body is a list of nodes")
    make = _trusted_node_from_map if trusted else _node_from_map
    try:
        tree = Tree(tuple(make(item) for item in items))
        refs = ({r for n in tree.nodes for r in n.tree_refs()},
                {r for n in tree.nodes for r in n.data_refs()})
    except (TypeError, ValueError) as e:  # TypeError: a trusted node's field of another type
        raise ObjectFormatError(str(e)) from None
    if refs != (set(envelope.tree_refs), set(envelope.data_refs)):
        raise ObjectFormatError("a tree's refs do not match its nodes")
    return tree


def decode_page(data: bytes, trusted: bool = False) -> Tree:
    """One page of a paged tree: a tree, never another head."""
    return _not_a_head(decode_tree(data, trusted))


def page_subfolders(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """``tree_subfolders`` of one page of a paged tree (never another head)."""
    return _not_a_head(tree_subfolders(data))


def _not_a_head(read):
    if isinstance(read, TreeHead):
        raise ObjectFormatError("a page of a paged tree is itself paged")
    return read


def tree_subfolders(data: bytes) -> tuple[int, list[tuple[int, bytes]]] | TreeHead:
    """How many nodes the tree object ``data`` holds, and ``(index, subtree id)`` of each of
    its subfolders, without building its Nodes: what a window that keeps trees as bytes until
    they are wanted needs to know of one (about a quarter of a decode's memory and time).
    The head of a paged tree is decoded (its pages are scanned one by one)."""
    envelope = _plain_envelope(data, Kind.TREE)
    items = _tree_body(envelope)
    if isinstance(items, dict):
        return _decode_head(envelope, items)
    if not isinstance(items, list) or not all(type(item) is dict for item in items):
        raise ObjectFormatError("a tree body is a list of nodes")
    subfolders = []
    for index, item in enumerate(items):
        subtree = item.get("st") if item.get("t") == "dir" else None
        if subtree:
            subfolders.append((index, _check_id(subtree, "a subtree")))
    return len(items), subfolders


# --- chunk lists ----------------------------------------------------------------------


def encode_chunk_list(chunk_ids: Iterable[bytes]) -> bytes:
    """Part of a very long file's chunk ids, in order (the body keeps the order and repeats)."""
    ids = list(chunk_ids)
    return seal(Kind.LIST, [], ids, _pack(ids))


def decode_chunk_list(data: bytes) -> tuple:
    envelope = _plain_envelope(data, Kind.LIST)
    ids = _unpack(envelope.body, "chunk list")
    if not isinstance(ids, list):
        raise ObjectFormatError("a chunk list body is a list of ids")
    found = tuple(_check_id(i, "a chunk list entry") for i in ids)
    if set(found) != set(envelope.data_refs):
        raise ObjectFormatError("a chunk list's refs do not match its body")
    return found


# --- snapshots --------------------------------------------------------------------------


def _paths(instance, attribute, value):
    if not isinstance(value, tuple) or not all(isinstance(p, bytes) and p for p in value):
        raise ValueError("paths must be a tuple of non-empty byte strings")


def _tags(instance, attribute, value):
    if not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
        raise ValueError("tags must be a tuple of strings")


def _summary(instance, attribute, value):
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in value.items()):
        raise ValueError("a summary maps names to counts")


@frozen
class Snapshot:
    """What one backup saved: its root tree and how it was made.

    ``paths`` are the backed-up paths as the snapshot names them (bytes);
    ``parent`` is the snapshot whose trees told which files were unchanged.
    ``repo`` names an encrypted repository; a plaintext snapshot has none.
    ``original``, as restic's, is the id of the first snapshot of a line of tag changes:
    objects are immutable, so ``tag`` writes a new snapshot that replaces the old one; it is
    empty (and left out of the encoding, so ids stay as they were) for one a backup wrote.
    ``generation`` counts the tag changes of the line, so each version has an id of its own
    (tagging back to earlier tags does not make the id of a version replaced before).
    """

    time_ns: int = field(validator=_int)
    host: str = field(validator=_str)
    paths: tuple = field(validator=_paths)
    tree: bytes = field(validator=_bytes)
    tags: tuple = field(default=(), validator=_tags)
    parent: bytes = field(default=b"", validator=_bytes)
    user: str = field(default="", validator=_str)
    summary: dict = field(factory=dict, validator=_summary)
    repo: str = field(default="", validator=_str)
    original: bytes = field(default=b"", validator=_bytes)
    generation: int = field(default=0, validator=_int)

    def __attrs_post_init__(self):
        if len(self.tree) != ID_SIZE or any(ref and len(ref) != ID_SIZE
                                            for ref in (self.parent, self.original)):
            raise ValueError(f"tree, parent and original are {ID_SIZE}-byte ids")


_SNAPSHOT_DEFAULTS = {"tags": [], "parent": b"", "user": "", "summary": {}, "repo": "",
                      "original": b"", "generation": 0}
#: What an encrypted snapshot shows: all the manager may know; the rest is in ``details``.
#: (``original`` and ``generation``, snapshot ids and a count, let the manager replace a
#: snapshot by its tag change.)
_PUBLIC_FIELDS = ("generation", "host", "original", "repo", "summary", "time_ns", "tree")


def encode_snapshot(snapshot: Snapshot) -> bytes:
    fields = {
        "time_ns": snapshot.time_ns, "host": snapshot.host, "paths": sorted(snapshot.paths),
        "tree": snapshot.tree, "tags": sorted(snapshot.tags), "parent": snapshot.parent,
        "user": snapshot.user,
        "summary": {k: snapshot.summary[k] for k in sorted(snapshot.summary)},
        "repo": snapshot.repo, "original": snapshot.original,
        "generation": snapshot.generation,
    }
    body = _pack(_canonical_map(fields, _SNAPSHOT_DEFAULTS))
    return seal(Kind.SNAPSHOT, [snapshot.tree], [], body)


def public_snapshot_body(snapshot: Snapshot, details: bytes) -> bytes:
    """An encrypted snapshot's body: its public fields, and ``details``, all its fields
    sealed."""
    fields = {name: getattr(snapshot, name) for name in _PUBLIC_FIELDS}
    fields["summary"] = {k: snapshot.summary[k] for k in sorted(snapshot.summary)}
    fields["details"] = details
    return _pack(_canonical_map(fields, _SNAPSHOT_DEFAULTS))


def sealed_details(data: bytes) -> bytes:
    """The sealed details of an encrypted snapshot's bytes."""
    fields = _unpack(open_envelope(data, Kind.SNAPSHOT).body, "snapshot")
    details = fields.get("details") if isinstance(fields, dict) else None
    if not isinstance(details, bytes):
        raise ObjectFormatError("an encrypted snapshot has sealed details")
    return details


def decode_snapshot(data: bytes) -> Snapshot:
    """The snapshot in ``data``; of an encrypted one, its public view (no paths, no tags)."""
    envelope = open_envelope(data, Kind.SNAPSHOT)
    fields = _unpack(envelope.body, "snapshot")
    if not isinstance(fields, dict):
        raise ObjectFormatError("a snapshot body is a map")
    if envelope.sealed:
        if not isinstance(fields.pop("details", None), bytes) or not set(fields) <= set(
                _PUBLIC_FIELDS) or not fields.get("repo"):
            raise ObjectFormatError("an encrypted snapshot shows only its public fields")
        fields["paths"] = []
    unknown = set(fields) - {a.name for a in attrs.fields(Snapshot)}
    if unknown:
        raise ObjectFormatError(f"unknown snapshot fields {sorted(unknown)}")
    try:
        for name in ("paths", "tags"):
            if name in fields:
                if not isinstance(fields[name], list):
                    raise ValueError(f"{name} is a list")
                fields[name] = tuple(fields[name])
        snapshot = Snapshot(**fields)
    except (TypeError, ValueError) as e:
        raise ObjectFormatError(f"bad snapshot: {e}") from None
    if envelope.tree_refs != (snapshot.tree,) or envelope.data_refs:
        raise ObjectFormatError("a snapshot's refs do not match its tree")
    return snapshot
