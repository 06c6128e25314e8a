"""Tree, chunk list and snapshot objects: canonical bytes, exact round trips, version checks."""

import random
import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbackup import hashing, objects
from sdbackup.names import escape, unescape
from sdbackup.objects import Kind, Node, ObjectFormatError, Snapshot

ID_A, ID_B, ID_C = (bytes([i]) * 32 for i in (1, 2, 3))

names = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
ids = st.binary(min_size=32, max_size=32)
ints = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def nodes(draw, name=names):
    kind = draw(st.sampled_from(objects.NODE_TYPES))
    fields = dict(
        name=draw(name), type=kind, mode=draw(st.integers(0, 0o7777)), uid=draw(ints),
        gid=draw(ints), user=draw(st.text(max_size=8)), group=draw(st.text(max_size=8)),
        mtime_ns=draw(st.integers(-(2**62), 2**62)), atime_ns=draw(ints), ctime_ns=draw(ints),
        dev=draw(ints), inode=draw(ints), links=draw(st.integers(0, 10)),
    )
    xattr_names = draw(st.lists(st.binary(min_size=1, max_size=20), unique=True, max_size=3))
    fields["xattrs"] = tuple(sorted((n, draw(st.binary(max_size=40))) for n in xattr_names))
    if kind == "file":
        fields.update(size=draw(ints), content=tuple(draw(st.lists(ids, max_size=5))),
                      hash=draw(ids))
    elif kind == "dir":
        fields["subtree"] = draw(ids)
    elif kind == "symlink":
        fields["target"] = draw(st.binary(min_size=1, max_size=100))
    elif kind in ("chardev", "blockdev"):
        fields["rdev"] = draw(ints)
    return Node(**fields)


trees = st.lists(nodes(), max_size=8, unique_by=lambda n: n.name).map(objects.make_tree)


@given(trees)
@settings(max_examples=150, deadline=None)
def test_every_tree_round_trips_exactly(tree):
    data = objects.encode_tree(tree)
    assert objects.decode_tree(data) == tree


@given(trees)
@settings(max_examples=150, deadline=None)
def test_a_trusted_decode_gives_the_same_tree(tree):
    """The fast path for parent trees (no per-field validators) builds equal Nodes."""
    data = objects.encode_tree(tree)
    trusted = objects.decode_tree(data, trusted=True)
    assert trusted == tree
    assert [hash(n) for n in trusted.nodes] == [hash(n) for n in tree.nodes]


def _reference_body(tree) -> bytes:
    """A tree body as the format defines it, spelled out: each node a map of its wire keys in
    sorted order, defaults (empty lists included) left out."""
    maps = []
    for node in tree.nodes:
        fields = {key: getattr(node, name) for name, key in objects._NODE_KEYS.items()}
        fields.update(x=[list(p) for p in node.xattrs], c=list(node.content),
                      C=list(node.content_lists))
        defaults = {objects._NODE_KEYS[a.name]: a.default for a in attrs.fields(Node)}
        defaults.update(x=[], c=[], C=[])
        maps.append({k: fields[k] for k in sorted(fields) if fields[k] != defaults[k]})
    return objects._pack(maps)


@given(trees)
@settings(max_examples=150, deadline=None)
def test_tree_bytes_follow_the_format(tree):
    """The encoder's shortcuts change no byte: an unchanged folder keeps its tree id across
    sdbackup versions."""
    assert objects.open_envelope(objects.encode_tree(tree)).body == _reference_body(tree)


@given(trees, st.randoms(use_true_random=False))
@settings(max_examples=100, deadline=None)
def test_the_order_nodes_come_in_does_not_change_the_bytes(tree, rnd):
    shuffled = list(tree.nodes)
    rnd.shuffle(shuffled)
    assert objects.encode_tree(objects.make_tree(shuffled)) == objects.encode_tree(tree)


def test_same_folder_state_same_id_and_any_change_another():
    node = Node(name=b"f", type="file", mode=0o644, mtime_ns=1, size=3, content=(ID_A,), hash=ID_B)
    first = objects.encode_tree(objects.make_tree([node]))
    again = objects.encode_tree(objects.make_tree([Node(**{
        a: getattr(node, a) for a in ("name", "type", "mode", "mtime_ns", "size", "content",
                                       "hash")})]))
    touched = objects.encode_tree(objects.make_tree([Node(
        name=b"f", type="file", mode=0o644, mtime_ns=2, size=3, content=(ID_A,), hash=ID_B)]))
    assert objects.object_id(Kind.TREE, first) == objects.object_id(Kind.TREE, again)
    assert objects.object_id(Kind.TREE, first) != objects.object_id(Kind.TREE, touched)


def test_odd_names_round_trip_and_show_escaped():
    odd = [b"new\nline", b"back\\slash", b"bad\xffutf8", b"x" * 255, b"sp ace", "é".encode()]
    tree = objects.make_tree(Node(name=n, type="file") for n in odd)
    assert [n.name for n in objects.decode_tree(objects.encode_tree(tree)).nodes] == sorted(odd)
    for name in odd:
        shown = escape(name)
        assert shown.isprintable()
        assert unescape(shown) == name
    assert escape(b"new\nline") == "new\\nline"
    # Invisible controls and separators a terminal could act on are escaped too.
    for sneaky in ("\u009b31m", "a\u2028b", "\x1b[2J"):
        shown = escape(sneaky.encode())
        assert shown.isprintable() and "\\x" in shown
        assert unescape(shown) == sneaky.encode()
    assert escape(b"bad\xffutf8") == "bad\\xffutf8"


@given(st.binary(max_size=300))
def test_escape_is_lossless_for_any_bytes(name):
    assert unescape(escape(name)) == name


def test_tree_refs_are_readable_without_the_body():
    tree = objects.make_tree([
        Node(name=b"d", type="dir", subtree=ID_A),
        Node(name=b"f", type="file", content=(ID_C, ID_B, ID_C), hash=ID_A),
        Node(name=b"big", type="file", content_lists=(ID_B,), hash=ID_A),
    ])
    envelope = objects.open_envelope(objects.encode_tree(tree))
    assert envelope.kind == Kind.TREE
    assert envelope.tree_refs == (ID_A, ID_B)
    assert envelope.data_refs == (ID_B, ID_C)


def test_a_node_keeps_chunk_order_and_repeats():
    node = Node(name=b"f", type="file", content=(ID_C, ID_A, ID_C), hash=ID_B)
    decoded = objects.decode_tree(objects.encode_tree(objects.make_tree([node])))
    assert decoded.nodes[0].content == (ID_C, ID_A, ID_C)


def test_chunk_lists_keep_order():
    data = objects.encode_chunk_list([ID_C, ID_A, ID_C])
    assert objects.decode_chunk_list(data) == (ID_C, ID_A, ID_C)
    assert objects.open_envelope(data).data_refs == (ID_A, ID_C)


def test_snapshot_round_trip_and_canonical_paths_and_tags():
    snap = Snapshot(time_ns=1_700_000_000_123_456_789, host="h", paths=(b"b", b"a\xff"),
                    tree=ID_A, tags=("z", "a"), parent=ID_B, user="root",
                    summary={"files": 3, "dirs": 1, "bytes": 10})
    data = objects.encode_snapshot(snap)
    back = objects.decode_snapshot(data)
    assert back.paths == (b"a\xff", b"b") and back.tags == ("a", "z")
    assert back.tree == ID_A and back.parent == ID_B and back.summary == snap.summary
    reordered = Snapshot(time_ns=snap.time_ns, host="h", paths=(b"a\xff", b"b"), tree=ID_A,
                         tags=("a", "z"), parent=ID_B, user="root", summary=dict(snap.summary))
    assert objects.encode_snapshot(reordered) == data
    assert objects.open_envelope(data).tree_refs == (ID_A,)


def test_kinds_have_separate_ids():
    data = objects.encode_chunk_list([ID_A])
    assert len({hashing.chunk_id(data), hashing.object_id(Kind.LIST, data),
                hashing.object_id(Kind.TREE, data)}) == 3


def test_a_newer_format_version_is_refused_with_a_clear_error():
    data = bytearray(objects.encode_tree(objects.make_tree([Node(name=b"a", type="dir",
                                                                  subtree=ID_A)])))
    data[4] = objects.FORMAT_VERSION + 1
    with pytest.raises(ObjectFormatError, match="version 2 is not 1"):
        objects.decode_tree(bytes(data))


def test_the_wrong_kind_and_garbage_are_refused():
    snapshot = objects.encode_snapshot(Snapshot(time_ns=1, host="h", paths=(b"a",), tree=ID_A))
    with pytest.raises(ObjectFormatError, match="expected a tree"):
        objects.decode_tree(snapshot)
    for junk in (b"", b"SDBO", b"not an object at all", snapshot[:12]):
        with pytest.raises(ObjectFormatError):
            objects.open_envelope(junk)
    rnd = random.Random(7)
    tree = objects.encode_tree(objects.make_tree([Node(name=b"a", type="file", hash=ID_A)]))
    for _ in range(200):  # flipped bytes never crash the decoder with anything but its error
        damaged = bytearray(tree)
        damaged[rnd.randrange(len(damaged))] ^= 1 << rnd.randrange(8)
        try:
            objects.decode_tree(bytes(damaged))
        except ObjectFormatError:
            pass


def test_refs_that_disagree_with_the_body_are_refused():
    body_tree = objects.make_tree([Node(name=b"d", type="dir", subtree=ID_A)])
    honest = objects.encode_tree(body_tree)
    envelope = objects.open_envelope(honest)
    lying = objects.seal(Kind.TREE, [ID_B], [], envelope.body)
    with pytest.raises(ObjectFormatError, match="refs do not match"):
        objects.decode_tree(lying)


def test_hostile_nodes_are_refused():
    for name in (b"..", b".", b"a/b", b"", b"a\0b"):
        body = objects._pack([{"n": name, "t": "file"}])
        with pytest.raises(ObjectFormatError):
            objects.decode_tree(objects.seal(Kind.TREE, [], [], body))
    unknown_field = objects._pack([{"n": b"a", "t": "file", "zz": 1}])
    with pytest.raises(ObjectFormatError, match="unknown node fields"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], unknown_field))
    unsorted = objects._pack([{"n": b"b", "t": "file"}, {"n": b"a", "t": "file"}])
    with pytest.raises(ObjectFormatError, match="sorted"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], unsorted))


def test_a_trusted_decode_still_checks_the_structure():
    """Trusted skips the per-field checks, not the shape: fields, names in order, refs."""
    bodies = {
        "known fields": [{"n": b"a", "t": "file", "zz": 1}],
        "has a name": [{"t": "file"}],
        "sorted": [{"n": b"b", "t": "file"}, {"n": b"a", "t": "file"}],
        "a name .bytes.": [{"n": "a", "t": "file"}],
        "a type": [{"n": b"a", "t": "socket"}],
    }
    for why, nodes_ in bodies.items():
        with pytest.raises(ObjectFormatError, match=why):
            objects.decode_tree(objects.seal(Kind.TREE, [], [], objects._pack(nodes_)), trusted=True)
    envelope = objects.open_envelope(objects.encode_tree(
        objects.make_tree([Node(name=b"d", type="dir", subtree=ID_A)])))
    with pytest.raises(ObjectFormatError, match="refs do not match"):
        objects.decode_tree(objects.seal(Kind.TREE, [ID_B], [], envelope.body), trusted=True)
    with pytest.raises(ObjectFormatError, match="not an sdbackup object"):
        objects.decode_tree(b"x" * 64, trusted=True)


def test_envelope_counts_cannot_run_past_the_end():
    head = struct.pack("!4sBBII", b"SDBO", 1, 1, 1000, 0)
    with pytest.raises(ObjectFormatError, match="past the end"):
        objects.open_envelope(head + b"x" * 64)
