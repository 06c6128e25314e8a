"""The pure parts of ``diff``: which modifier an entry gets, how two folders pair up, the
lines and JSON a user or script reads."""

from sdbackup.client import diff
from sdbackup.objects import Node, Tree, make_tree
from sdbackup.protocols.messages import SnapshotSummary

A = b"\x01" * 32
B = b"\x02" * 32


def file(name: bytes, content=(A,), size=5, **fields) -> Node:
    return Node(name=name, type="file", mode=0o644, size=size, content=content, hash=content[0],
                mtime_ns=1, **fields)


def summary(snapshot_id: str, size: int) -> SnapshotSummary:
    return SnapshotSummary(snapshot_id, 0.0, "h", ["p"], "00" * 32, [], "", 1, 1, size)


def test_modifier_tells_content_type_and_metadata_apart():
    same = file(b"f")
    assert diff.modifier(same, file(b"f")) == ""
    assert diff.modifier(same, file(b"f", content=(B,))) == diff.CONTENT
    assert diff.modifier(same, file(b"f", size=6)) == diff.CONTENT
    assert diff.modifier(same, Node(name=b"f", type="symlink", target=b"x")) == diff.TYPE
    chmod = Node(name=b"f", type="file", mode=0o600, size=5, content=(A,), hash=A, mtime_ns=1)
    assert diff.modifier(same, chmod) == diff.METADATA
    assert diff.modifier(same, file(b"f", uid=7)) == diff.METADATA
    old_link = Node(name=b"l", type="symlink", target=b"a")
    assert diff.modifier(old_link, Node(name=b"l", type="symlink", target=b"b")) == diff.CONTENT
    # A folder's own modifier is its metadata only: its entries are compared one by one.
    assert diff.modifier(Node(name=b"d", type="dir", subtree=A),
                         Node(name=b"d", type="dir", subtree=B)) == ""


def test_pairs_walks_two_folders_in_name_order():
    old = make_tree([file(b"a"), file(b"c"), file(b"d")])
    new = make_tree([file(b"b"), file(b"c"), file(b"e")])
    assert [(name, a is not None, b is not None) for name, a, b in diff.pairs(old, new)] == [
        (b"a", True, False), (b"b", False, True), (b"c", True, True), (b"d", True, False),
        (b"e", False, True)]
    assert list(diff.pairs(Tree(()), Tree(()))) == []


def test_lines_and_json_have_restic_shapes():
    change = diff.Change(diff.ADDED, (b"src", b"caf\xe9"), file(b"caf\xe9"))
    assert diff.change_line(change) == "+    /src/caf\\xe9"
    folder = diff.Change(diff.REMOVED, (b"src",), Node(name=b"src", type="dir", subtree=A))
    assert diff.change_line(folder) == "-    /src/"
    assert diff.change_json(change) == {"message_type": "change", "path": "/src/caf\\xe9",
                                        "modifier": "+"}
    stats = diff.DiffStats()
    stats.added.count(file(b"x", size=10))
    stats.removed.count(Node(name=b"d", type="dir"))
    stats.changed_files = 2
    out = diff.statistics_json(stats, summary("aa" * 32, 100), summary("bb" * 32, 60))
    assert out["added"] == {"files": 1, "dirs": 0, "others": 0, "bytes": 10}
    assert out["removed"]["dirs"] == 1 and out["changed_files"] == 2
    assert out["bytes_change"] == -40
    lines = diff.summary_lines(stats, summary("aa" * 32, 100), summary("bb" * 32, 60))
    assert "Files:           1 new,     0 removed,     2 changed" in lines
    assert lines[-1].strip() == "Size:    100 B -> 60 B (-40 B)"
