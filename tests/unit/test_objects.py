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


@given(trees)
@settings(max_examples=150, deadline=None)
def test_a_scan_finds_what_a_decode_finds_of_the_subfolders(tree):
    """The read-ahead window keeps trees as bytes and learns their subfolders by a scan: the
    same node count, and each folder's index and subtree, as the decoded tree gives."""
    count, subfolders = objects.tree_subfolders(objects.encode_tree(tree))
    assert count == len(tree.nodes)
    assert subfolders == [(i, n.subtree) for i, n in enumerate(tree.nodes)
                          if n.type == "dir" and n.subtree]


def test_a_scan_refuses_what_is_not_a_tree_or_a_bad_subtree():
    with pytest.raises(ObjectFormatError, match="expected a tree"):
        objects.tree_subfolders(objects.encode_chunk_list([ID_A]))
    with pytest.raises(ObjectFormatError, match="a list of nodes"):
        objects.tree_subfolders(objects.seal(Kind.TREE, [], [], objects._pack([1, 2])))
    short = [{"n": b"d", "t": "dir", "st": b"short"}]
    with pytest.raises(ObjectFormatError, match="a subtree is not a 32-byte id"):
        objects.tree_subfolders(objects.seal(Kind.TREE, [], [], objects._pack(short)))


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
    with pytest.raises(ObjectFormatError, match="version 3 is not one this sdbackup reads"):
        objects.decode_tree(bytes(data))


def test_only_a_tree_head_is_of_format_version_2():
    """Objects are written in the oldest format that holds them: ids of before stay, and a
    reader of version 1 refuses a head rather than misread it. Each shape has one version."""
    plain = objects.encode_tree(objects.make_tree([Node(name=b"a", type="dir", subtree=ID_A)]))
    head = objects.encode_tree_head([ID_A, ID_B])
    assert (plain[4], head[4]) == (1, objects.HEAD_VERSION) == (1, 2)
    for data, version, why in ((plain, 2, "version 2 is a head of pages"),
                               (head, 1, "version 1 is a list of nodes")):
        changed = bytes([*data[:4], version, *data[5:]])
        for read in (objects.decode_tree, objects.tree_subfolders):
            with pytest.raises(ObjectFormatError, match=why):
                read(changed)
    chunk_list = bytearray(objects.encode_chunk_list([ID_A]))
    chunk_list[4] = 2
    with pytest.raises(ObjectFormatError, match="a list object is of format version 1, not 2"):
        objects.decode_chunk_list(bytes(chunk_list))


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


# --- the envelope, byte by byte -----------------------------------------------------------


def _fresh(name: bytes) -> bytes:
    """An equal bytes object that is not the same object (as a name read from the wire is)."""
    return bytes(bytearray(name))


@pytest.mark.parametrize(("kind", "code"), [(Kind.TREE, 1), (Kind.LIST, 2), (Kind.SNAPSHOT, 3),
                                             (Kind.KEY, 4)])
def test_the_header_is_the_documented_bytes(kind, code):
    """The kind codes are the format: another code would make every object another id."""
    data = objects.seal(kind, [ID_B, ID_A, ID_B], [ID_C], b"body")
    assert data == b"SDBO" + bytes([1, code]) + struct.pack("!II", 2, 1) + ID_A + ID_B + ID_C + b"body"
    sealed = objects.seal(kind, [], [], b"x", sealed=True)
    assert sealed == b"SDBO" + bytes([1, code | 0x80]) + struct.pack("!II", 0, 0) + b"x"
    envelope = objects.open_envelope(sealed, kind)
    assert (envelope.kind, envelope.sealed, envelope.body) == (kind, True, b"x")
    assert objects.open_envelope(data, kind).sealed is False


def test_the_inline_chunk_count_is_the_format():
    """A file's first 16384 chunk ids stay in its node: another count would give every big
    unchanged file another tree id, stored anew by the next backup."""
    assert objects.INLINE_CONTENT == 16_384


@pytest.mark.parametrize("size", [31, 33, 0])
def test_seal_refuses_a_ref_that_is_not_an_id(size):
    for trees, data in (([b"r" * size], []), ([], [b"r" * size]), ([ID_A], [ID_B, b"r" * size])):
        with pytest.raises(ValueError, match=f"32 bytes, not {size}"):
            objects.seal(Kind.TREE, trees, data, b"")


def test_the_shortest_objects_open():
    """A header alone, and refs with no body after them, are whole envelopes."""
    bare = objects.open_envelope(objects.seal(Kind.LIST, [], [], b""))
    assert (bare.kind, bare.tree_refs, bare.data_refs, bare.body) == (Kind.LIST, (), (), b"")
    refs_only = objects.open_envelope(objects.seal(Kind.TREE, [ID_A], [ID_B], b""))
    assert (refs_only.tree_refs, refs_only.data_refs, refs_only.body) == ((ID_A,), (ID_B,), b"")
    with pytest.raises(ObjectFormatError, match="too short"):
        objects.open_envelope(objects.seal(Kind.LIST, [], [], b"")[:-1])
    with pytest.raises(ObjectFormatError, match="past the end"):
        objects.open_envelope(objects.seal(Kind.TREE, [ID_A], [ID_B], b"")[:-1])


@pytest.mark.parametrize("magic", [b"ADBO", b"SDBN", b"SDBP", b"ZZZZ", b"sdbo"])
def test_a_wrong_magic_is_refused(magic):
    data = magic + objects.seal(Kind.TREE, [], [], b"\x90")[4:]
    with pytest.raises(ObjectFormatError, match="not an sdbackup object"):
        objects.open_envelope(data)


@pytest.mark.parametrize("version", [0, 3, 255])
def test_any_other_format_version_is_refused(version):
    data = bytearray(objects.seal(Kind.TREE, [], [], b"\x90"))
    data[4] = version
    with pytest.raises(ObjectFormatError, match=f"version {version} is not one this sdbackup reads"):
        objects.open_envelope(bytes(data))


@pytest.mark.parametrize("code", [0, 5, 0x7F, 0x80, 0x85, 0xFF])
def test_an_unknown_kind_code_is_refused(code):
    data = bytearray(objects.seal(Kind.TREE, [], [], b"\x90"))
    data[5] = code
    with pytest.raises(ObjectFormatError, match=f"unknown object kind {code}"):
        objects.open_envelope(bytes(data))


def test_an_object_of_another_kind_than_asked_is_refused():
    for found in (Kind.TREE, Kind.LIST, Kind.SNAPSHOT, Kind.KEY):
        data = objects.seal(found, [], [], b"")
        for asked in (Kind.TREE, Kind.LIST, Kind.SNAPSHOT, Kind.KEY):
            # The kind a caller asks for may come off the wire: an equal string, not the same one.
            wire_kind = asked.encode().decode()
            if asked == found:
                assert objects.open_envelope(data, wire_kind).kind == found
            else:
                with pytest.raises(ObjectFormatError, match=f"expected a {asked} object, found a {found}"):
                    objects.open_envelope(data, wire_kind)
        assert objects.open_envelope(data).kind == found


def test_sealed_trees_and_chunk_lists_need_the_password():
    tree = objects.open_envelope(objects.encode_tree(objects.make_tree([Node(name=b"a", type="file")])))
    with pytest.raises(ObjectFormatError, match="the tree is encrypted"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], tree.body, sealed=True))
    with pytest.raises(ObjectFormatError, match="the tree is encrypted"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], tree.body, sealed=True), trusted=True)
    listed = objects.open_envelope(objects.encode_chunk_list([ID_A]))
    with pytest.raises(ObjectFormatError, match="the list is encrypted"):
        objects.decode_chunk_list(objects.seal(Kind.LIST, [], [ID_A], listed.body, sealed=True))


# --- trees and nodes ------------------------------------------------------------------------


def _tree_of(count: int) -> objects.Tree:
    """Names n001, n003, ...: an absent name sorts between each two (300 nodes: positions past
    256, where two equal ints need not be one object)."""
    return objects.make_tree(Node(name=b"n%03d" % (2 * i + 1), type="file") for i in range(count))


@pytest.mark.timeout(30)  # a broken search can loop forever: fail instead of hanging the run
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 100, 300])
def test_find_gives_each_present_name_and_nothing_for_an_absent_one(count):
    tree = _tree_of(count)
    for node in tree.nodes:
        found = tree.find(_fresh(node.name))
        assert found is node
    absent = [b"n%03d" % (2 * i) for i in range(count + 1)] + [b"", b"a", b"n", b"z", b"n001x"]
    for name in absent:
        assert tree.find(_fresh(name)) is None
    decoded = objects.decode_tree(objects.encode_tree(tree))
    assert [decoded.find(_fresh(n.name)) for n in tree.nodes] == list(tree.nodes)


@pytest.mark.parametrize("names_", [[b"b", b"a"], [b"a", b"a"], [b"a", b"a", b"b"], [b"a", b"c", b"b"]])
def test_a_tree_refuses_names_unsorted_or_repeated(names_):
    nodes_ = tuple(Node(name=n, type="file") for n in names_)
    with pytest.raises(ValueError, match="sorted by name, each name once"):
        objects.Tree(nodes_)
    body = objects._pack([{"n": n, "t": "file"} for n in names_])
    for trusted in (False, True):
        with pytest.raises(ObjectFormatError, match="sorted by name, each name once"):
            objects.decode_tree(objects.seal(Kind.TREE, [], [], body), trusted=trusted)


def test_a_node_given_only_a_name_and_type_is_all_zero_and_empty():
    node = Node(name=b"a", type="file")
    assert attrs.asdict(node, recurse=False) == dict(
        name=b"a", type="file", mode=0, uid=0, gid=0, user="", group="", mtime_ns=0, atime_ns=0,
        ctime_ns=0, size=0, dev=0, inode=0, links=0, rdev=0, target=b"", xattrs=(), content=(),
        content_lists=(), hash=b"", subtree=b"")
    data = objects.encode_tree(objects.make_tree([node]))
    assert objects.open_envelope(data).body == objects._pack([{"n": b"a", "t": "file"}])
    for trusted in (False, True):
        assert objects.decode_tree(data, trusted=trusted).nodes == (node,)


def test_a_node_with_every_field_set_round_trips():
    node = Node(name=b"all", type="file", mode=0o4755, uid=1, gid=2, user="u", group="g",
                mtime_ns=3, atime_ns=4, ctime_ns=5, size=6, dev=7, inode=8, links=9, rdev=10,
                target=b"t", xattrs=((b"user.a", b"1"), (b"user.b", b"")), content=(ID_A, ID_A),
                content_lists=(ID_B,), hash=ID_C, subtree=ID_C)
    data = objects.encode_tree(objects.make_tree([node]))
    assert len(objects._unpack(objects.open_envelope(data).body, "tree")[0]) == len(attrs.fields(Node))
    for trusted in (False, True):
        assert objects.decode_tree(data, trusted=trusted).nodes == (node,)


@pytest.mark.parametrize("bad", [
    (b"i" * 31,), (b"i" * 33,), (ID_A, b""), ("i" * 32,), [ID_A], (1,)])
def test_node_chunk_ids_must_be_a_tuple_of_ids(bad):
    for name in ("content", "content_lists"):
        with pytest.raises(ValueError, match=f"{name} must be a tuple of 32-byte ids"):
            Node(name=b"f", type="file", **{name: bad})


@pytest.mark.parametrize(("bad", "why"), [
    ([(b"a", b"1")], "byte pairs"),
    (([b"a", b"1"],), "byte pairs"),
    (((b"a",),), "byte pairs"),
    (((b"a", b"1", b"2"),), "byte pairs"),
    ((("a", b"1"),), "byte pairs"),
    (((b"", b"1"),), "byte pairs"),
    (((b"a", "1"),), "byte pairs"),
    (((b"a", None),), "byte pairs"),
    (((b"b", b"1"), (b"a", b"2")), "sorted by name, each name once"),
    (((b"a", b"1"), (b"a", b"2")), "sorted by name, each name once"),
    (((b"a", b"1"), (b"a", b"2"), (b"b", b"3")), "sorted by name, each name once"),
])
def test_malformed_xattrs_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        Node(name=b"f", type="file", xattrs=bad)


def test_good_xattrs_are_kept():
    pairs = ((b"security.selinux", b"ctx"), (b"user.empty", b""), (b"user.z", b"\0\xff"))
    assert Node(name=b"f", type="file", xattrs=pairs).xattrs == pairs


def test_a_decoded_node_with_bad_fields_is_refused():
    for fields in ({"c": [b"i" * 31]}, {"c": b"i" * 32}, {"x": [[b"b", b"1"], [b"a", b"1"]]},
                   {"m": "644"}, {"x": [[b"a"]]}):
        body = objects._pack([{"n": b"f", "t": "file", **fields}])
        with pytest.raises(ObjectFormatError, match="bad node"):
            objects.decode_tree(objects.seal(Kind.TREE, [], [], body))


def test_empty_lists_decode_as_the_default_and_a_list_is_no_tuple():
    """A tree written by another encoder may spell an empty list: the node is the same."""
    plain = Node(name=b"f", type="file")
    body = objects._pack([{"n": b"f", "t": "file", "x": [], "c": [], "C": []}])
    for trusted in (False, True):
        assert objects.decode_tree(objects.seal(Kind.TREE, [], [], body), trusted=trusted).nodes == (plain,)
    for name in ("xattrs", "content", "content_lists"):
        with pytest.raises(ValueError, match=f"{name} must be a tuple"):
            Node(name=b"f", type="file", **{name: []})


def test_nodes_not_maps_or_with_fields_of_another_shape_are_refused():
    """Either decode, a node of the wrong shape is an ObjectFormatError, never a crash."""
    for item in (1, [b"a", "file"], b"node"):
        for trusted in (False, True):
            with pytest.raises(ObjectFormatError, match="a node is a map"):
                objects.decode_tree(objects.seal(Kind.TREE, [], [], objects._pack([item])), trusted=trusted)
    for node in ({"n": b"f", "t": "file", "c": 5}, {"n": b"f", "t": "file", "C": 5},
                 {"n": b"f", "t": "file", "x": 5}, {"t": "file"}, {"n": b"f"}):
        body = objects._pack([node])
        for trusted in (False, True):
            with pytest.raises(ObjectFormatError):
                objects.decode_tree(objects.seal(Kind.TREE, [], [], body), trusted=trusted)
    with pytest.raises(ObjectFormatError, match="a tree body is a list of nodes"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], objects._pack(5)))
    with pytest.raises(ObjectFormatError, match="a tree of format version 1 is a list of nodes"):
        objects.decode_tree(objects.seal(Kind.TREE, [], [], objects._pack({"n": b"f"})))


def test_integer_map_keys_are_refused():
    """A map key other than a string is no field of any object: the body is not valid."""
    body = objects._pack([{"n": b"f", "t": "file", 1: 2}])
    for trusted in (False, True):
        with pytest.raises(ObjectFormatError, match="tree body is not valid"):
            objects.decode_tree(objects.seal(Kind.TREE, [], [], body), trusted=trusted)
    snapshot = objects._pack({"details": b"sealed", "repo": "r", 3: 4})
    with pytest.raises(ObjectFormatError, match="snapshot body is not valid"):
        objects.sealed_details(objects.seal(Kind.SNAPSHOT, [ID_A], [], snapshot, sealed=True))


# --- chunk lists ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [b"i" * 31, b"i" * 33, b"", "i" * 32, 32, None])
def test_a_chunk_list_entry_that_is_not_an_id_is_refused(entry):
    body = objects._pack([ID_A, entry])
    with pytest.raises(ObjectFormatError, match="a chunk list entry is not a 32-byte id"):
        objects.decode_chunk_list(objects.seal(Kind.LIST, [], [ID_A], body))


@pytest.mark.parametrize(("listed", "refs"), [
    ([ID_A, ID_B], [ID_A]), ([ID_B], [ID_A, ID_B]), ([ID_A], [ID_B]), ([ID_B], [ID_A]), ([ID_A], [])])
def test_a_chunk_list_whose_refs_do_not_match_its_body_is_refused(listed, refs):
    with pytest.raises(ObjectFormatError, match="refs do not match its body"):
        objects.decode_chunk_list(objects.seal(Kind.LIST, [], refs, objects._pack(listed)))


def test_a_chunk_list_body_must_be_a_list():
    for body in ({"a": ID_A}, ID_A, b"\xc1"):
        packed = body if body == b"\xc1" else objects._pack(body)
        with pytest.raises(ObjectFormatError):
            objects.decode_chunk_list(objects.seal(Kind.LIST, [], [ID_A], packed))


# --- snapshots ------------------------------------------------------------------------------


def _snapshot(**changes) -> Snapshot:
    return Snapshot(**{"time_ns": 5, "host": "h", "paths": (b"/a",), "tree": ID_A, **changes})


def test_a_snapshot_with_defaults_leaves_them_out():
    data = objects.encode_snapshot(_snapshot())
    assert objects.open_envelope(data).body == objects._pack(
        {"host": "h", "paths": [b"/a"], "time_ns": 5, "tree": ID_A})
    assert objects.decode_snapshot(data) == _snapshot()
    full = _snapshot(tags=("t",), parent=ID_B, user="u", summary={"files": 1}, repo="r",
                     original=ID_C, generation=2)
    assert objects.decode_snapshot(objects.encode_snapshot(full)) == full
    assert set(objects._unpack(objects.open_envelope(objects.encode_snapshot(full)).body, "s")) == {
        a.name for a in attrs.fields(Snapshot)}


@pytest.mark.parametrize("field_", ["tree", "parent", "original"])
@pytest.mark.parametrize("size", [31, 33])
def test_a_snapshot_refuses_ids_of_another_size(field_, size):
    with pytest.raises(ValueError, match="tree, parent and original are 32-byte ids"):
        _snapshot(**{field_: b"i" * size})
    if field_ != "tree":
        assert getattr(_snapshot(**{field_: ID_B}), field_) == ID_B


def test_a_snapshot_refuses_an_empty_tree():
    with pytest.raises(ValueError, match="32-byte ids"):
        _snapshot(tree=b"")


@pytest.mark.parametrize(("changes", "why"), [
    ({"paths": [b"/a"]}, "paths must be"), ({"paths": (b"",)}, "paths must be"),
    ({"paths": ("/a",)}, "paths must be"), ({"paths": (b"/a", b"")}, "paths must be"),
    ({"tags": ["t"]}, "tags must be"), ({"tags": (b"t",)}, "tags must be"),
    ({"summary": [("files", 1)]}, "a summary maps"), ({"summary": {"files": "1"}}, "a summary maps"),
    ({"summary": {1: 1}}, "a summary maps"),
])
def test_a_snapshot_refuses_malformed_fields(changes, why):
    with pytest.raises(ValueError, match=why):
        _snapshot(**changes)


@pytest.mark.parametrize(("tree_refs", "data_refs"), [
    ([ID_B], []), ([], []), ([ID_A, ID_B], []), ([ID_A, b"\0" * 32], []), ([ID_A], [ID_B]), ([ID_B], [ID_A])])
def test_a_snapshot_whose_refs_do_not_match_its_tree_is_refused(tree_refs, data_refs):
    body = objects.open_envelope(objects.encode_snapshot(_snapshot(tree=ID_A))).body
    with pytest.raises(ObjectFormatError, match="refs do not match its tree"):
        objects.decode_snapshot(objects.seal(Kind.SNAPSHOT, tree_refs, data_refs, body))


@pytest.mark.parametrize("fields", [
    {"host": "h", "paths": [b"/a"], "tree": ID_A},
    {"time_ns": 1, "host": "h", "paths": [b"/a"], "tree": ID_A, "tags": "t"},
    {"time_ns": 1, "host": "h", "paths": [b"/a"], "tree": b"i" * 31},
    {"time_ns": 1, "host": "h", "paths": [b"/a"], "tree": ID_A, "summary": {"f": "1"}},
    {"time_ns": "1", "host": "h", "paths": [b"/a"], "tree": ID_A},
])
def test_a_decoded_snapshot_with_bad_fields_is_refused(fields):
    data = objects.seal(Kind.SNAPSHOT, [ID_A], [], objects._pack(fields))
    with pytest.raises(ObjectFormatError, match="bad snapshot"):
        objects.decode_snapshot(data)


def test_unknown_snapshot_fields_and_bodies_not_maps_are_refused():
    extra = objects._pack({"time_ns": 1, "host": "h", "paths": [b"/a"], "tree": ID_A, "zz": 1})
    with pytest.raises(ObjectFormatError, match="unknown snapshot fields"):
        objects.decode_snapshot(objects.seal(Kind.SNAPSHOT, [ID_A], [], extra))
    with pytest.raises(ObjectFormatError, match="a snapshot body is a map"):
        objects.decode_snapshot(objects.seal(Kind.SNAPSHOT, [ID_A], [], objects._pack([1])))


def test_an_encrypted_snapshot_shows_its_public_fields_only():
    snap = _snapshot(tags=("t",), parent=ID_B, user="u", summary={"b": 2, "a": 1}, repo="r",
                     original=ID_C, generation=3)
    body = objects.public_snapshot_body(snap, b"sealed details")
    assert body == objects._pack({"details": b"sealed details", "generation": 3, "host": "h",
                                  "original": ID_C, "repo": "r", "summary": {"a": 1, "b": 2},
                                  "time_ns": 5, "tree": ID_A})
    data = objects.seal(Kind.SNAPSHOT, [ID_A], [], body, sealed=True)
    assert objects.sealed_details(data) == b"sealed details"
    public = objects.decode_snapshot(data)
    assert public == Snapshot(time_ns=5, host="h", paths=(), tree=ID_A, summary={"a": 1, "b": 2},
                              repo="r", original=ID_C, generation=3)
    # A first backup's snapshot: the defaults are left out of the public body too.
    plain = objects.public_snapshot_body(_snapshot(repo="r"), b"d")
    assert plain == objects._pack({"details": b"d", "host": "h", "repo": "r", "time_ns": 5, "tree": ID_A})
    first = objects.decode_snapshot(objects.seal(Kind.SNAPSHOT, [ID_A], [], plain, sealed=True))
    assert first == Snapshot(time_ns=5, host="h", paths=(), tree=ID_A, repo="r")


@pytest.mark.parametrize("fields", [
    {"host": "h", "repo": "r", "time_ns": 5, "tree": ID_A},
    {"details": "text", "host": "h", "repo": "r", "time_ns": 5, "tree": ID_A},
    {"details": b"d", "host": "h", "time_ns": 5, "tree": ID_A},
    {"details": b"d", "host": "h", "repo": "", "time_ns": 5, "tree": ID_A},
    {"details": b"d", "host": "h", "repo": "r", "time_ns": 5, "tree": ID_A, "paths": [b"/a"]},
    {"details": b"d", "host": "h", "repo": "r", "time_ns": 5, "tree": ID_A, "user": "u"},
])
def test_an_encrypted_snapshot_showing_more_or_less_is_refused(fields):
    data = objects.seal(Kind.SNAPSHOT, [ID_A], [], objects._pack(fields), sealed=True)
    with pytest.raises(ObjectFormatError, match="shows only its public fields"):
        objects.decode_snapshot(data)


@pytest.mark.parametrize("details", [None, "text", 1])
def test_sealed_details_must_be_bytes(details):
    fields = {"host": "h", "repo": "r", "time_ns": 5, "tree": ID_A}
    if details is not None:
        fields["details"] = details
    data = objects.seal(Kind.SNAPSHOT, [ID_A], [], objects._pack(fields), sealed=True)
    with pytest.raises(ObjectFormatError, match="has sealed details"):
        objects.sealed_details(data)
    with pytest.raises(ObjectFormatError, match="expected a snapshot"):
        objects.sealed_details(objects.seal(Kind.TREE, [], [], objects._pack(fields), sealed=True))


@pytest.mark.parametrize("body", [[1], "text", 7])
def test_sealed_details_of_a_body_that_is_not_a_map_is_a_format_error(body):
    data = objects.seal(Kind.SNAPSHOT, [ID_A], [], objects._pack(body), sealed=True)
    with pytest.raises(ObjectFormatError, match="has sealed details"):
        objects.sealed_details(data)


# --- paged trees -------------------------------------------------------------------------


def many_files(count: int, prefix: str = "file") -> list[Node]:
    return [Node(name=f"{prefix}-{i:06d}".encode(), type="file", size=i, mtime_ns=7 * i,
                 content=(bytes.fromhex(hashing.chunk_id(str(i).encode())),)) for i in range(count)]


def test_a_tree_that_fits_a_page_is_one_page():
    tree = objects.make_tree(many_files(100))
    assert objects.split_tree(tree, len(objects.encode_tree(tree)) + 100) == [tree]


def test_pages_are_runs_of_the_tree_each_within_the_page_size():
    tree = objects.make_tree(many_files(5000))
    pages = objects.split_tree(tree, 32 * 1024)
    assert len(pages) > 8
    assert all(len(objects.encode_tree(page)) <= 32 * 1024 for page in pages)
    assert objects.join_pages(pages) == tree
    # A pure function of the nodes: the same folder, the same pages.
    assert objects.split_tree(objects.make_tree(reversed(tree.nodes)), 32 * 1024) == pages


def test_an_entry_added_to_a_large_folder_changes_one_page_not_those_after_it():
    files = many_files(20_000)
    before = {objects.encode_tree(p) for p in objects.split_tree(objects.make_tree(files), 64 * 1024)}
    added = [*files[:5000], Node(name=b"file-005000-new", type="file"), *files[5000:]]
    after = {objects.encode_tree(p) for p in objects.split_tree(objects.make_tree(added), 64 * 1024)}
    assert len(before) > 20
    assert len(after - before) == 1


def test_a_tree_head_lists_its_pages_in_order_and_refs_them():
    pages = [ID_C, ID_A, ID_B]
    data = objects.encode_tree_head(pages)
    assert objects.decode_tree(data) == objects.TreeHead((ID_C, ID_A, ID_B))
    assert objects.tree_subfolders(data) == objects.TreeHead((ID_C, ID_A, ID_B))
    envelope = objects.open_envelope(data, Kind.TREE)
    assert (envelope.tree_refs, envelope.data_refs) == ((ID_A, ID_B, ID_C), ())


def test_tree_heads_that_lie_are_refused():
    def head(body, tree_refs=(ID_A, ID_B), data_refs=()):
        return objects.seal(Kind.TREE, tree_refs, data_refs, objects._pack(body),
                            version=objects.HEAD_VERSION)

    for body, refs, why in (
            ({"pages": [ID_A]}, (ID_A,), "two or more pages"),
            ({"pages": [ID_A, ID_B], "more": 1}, (ID_A, ID_B), "two or more pages"),
            ({"pages": [ID_A, b"short"]}, (ID_A, ID_B), "not a 32-byte id"),
            ({"pages": [ID_A, ID_A]}, (ID_A,), "refs do not match"),
            ({"pages": [ID_A, ID_B]}, (ID_A, ID_C), "refs do not match")):
        with pytest.raises(ObjectFormatError, match=why):
            objects.decode_tree(head(body, refs))
    with pytest.raises(ObjectFormatError, match="refs do not match"):
        objects.decode_tree(head({"pages": [ID_A, ID_B]}, data_refs=(ID_C,)))


def test_a_page_is_never_a_head_and_pages_must_follow_one_another():
    for read in (objects.decode_page, objects.page_subfolders):
        with pytest.raises(ObjectFormatError, match="itself paged"):
            read(objects.encode_tree_head([ID_A, ID_B]))
    first, second = objects.split_tree(objects.make_tree(many_files(2000)), 32 * 1024)[:2]
    with pytest.raises(ObjectFormatError, match="do not follow one another"):
        objects.join_pages([second, first])
    with pytest.raises(ObjectFormatError, match="do not follow one another"):
        objects.join_pages([first, first])
