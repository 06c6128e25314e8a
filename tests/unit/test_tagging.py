"""Tag changes, snapshot filters, find's patterns and dump's tar headers: the pure parts of
``tag``, ``snapshots``, ``find`` and ``dump``."""

import tarfile

from sdbackup import objects
from sdbackup.client import tagging
from sdbackup.client.dump import tar_info
from sdbackup.client.find import Pattern
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import SnapshotSummary

TREE = b"\x07" * 32


def snap(snapshot_id: str, time: float, host="h", paths=("p",), tags=()) -> SnapshotSummary:
    return SnapshotSummary(snapshot_id.ljust(64, "0"), time, host, list(paths), "00" * 32,
                           list(tags), "", 0, 0, 0)


def test_new_tags_add_remove_and_set():
    assert tagging.new_tags(("b", "a"), add=["c", "a"]) == ("a", "b", "c")
    assert tagging.new_tags(("a", "b"), remove=["a", "x"]) == ("b",)
    assert tagging.new_tags(("a", "b"), add=["b", "c"], remove=["b"]) == ("a", "c")
    assert tagging.new_tags(("a",), set_to=["z", "y"]) == ("y", "z")
    assert tagging.new_tags(("a",), set_to=[]) == ()
    assert tagging.tag_values(["a,b", "c", ""]) == ["a", "b", "c"]


def test_a_retagged_snapshot_names_its_original_and_gets_a_new_id_each_time():
    first = objects.Snapshot(time_ns=5, host="h", paths=(b"p",), tree=TREE, tags=("x",))
    first_bytes = objects.encode_snapshot(first)
    first_id = objects.object_id(Kind.SNAPSHOT, first_bytes)
    # A snapshot a backup wrote carries neither field: old snapshots keep their ids.
    assert b"original" not in first_bytes and b"generation" not in first_bytes
    second = tagging.retagged(first, first_id, ("x", "y"))
    assert second.original == bytes.fromhex(first_id) and second.generation == 1
    second_id = objects.object_id(Kind.SNAPSHOT, objects.encode_snapshot(second))
    third = tagging.retagged(second, second_id, ("x",))
    assert third.original == bytes.fromhex(first_id) and third.generation == 2
    assert (third.tree, third.host, third.paths, third.time_ns) == (TREE, "h", (b"p",), 5)
    decoded = objects.decode_snapshot(objects.encode_snapshot(third))
    assert decoded == third
    # Back to the first tags, yet a new id: not the id of a version replaced before.
    assert objects.object_id(Kind.SNAPSHOT, objects.encode_snapshot(third)) != first_id


def test_select_filters_as_forget_does_and_keeps_the_latest_of_each_group():
    listed = [snap("a1", 1, host="a", tags=("x",)), snap("b1", 2, host="b"),
              snap("a2", 3, host="a", tags=("x", "y")), snap("a3", 4, host="a", paths=("q",)),
              snap("b2", 5, host="b", tags=("y",))]

    def ids(**filters):
        return [s.snapshot_id[:2] for s in tagging.select(listed, **filters)]

    assert ids() == ["a1", "b1", "a2", "a3", "b2"]
    assert ids(hosts=["b"]) == ["b1", "b2"]
    assert ids(paths=["q"]) == ["a3"]
    assert ids(tags=[("x", "y")]) == ["a2"]
    assert ids(tags=[("x",), ("y",)]) == ["a1", "a2", "b2"]
    assert ids(latest=1) == ["a2", "a3", "b2"]
    assert ids(hosts=["a"], latest=2) == ["a1", "a2", "a3"]


def test_find_patterns_match_names_or_whole_paths():
    by_name = Pattern("*.txt")
    assert by_name.matches((b"src", b"a.txt")) and not by_name.matches((b"a.txt", b"b"))
    assert Pattern("caf\\xe9*").matches((b"x", b"caf\xe9.txt"))
    by_path = Pattern("src/*/big.bin")
    assert by_path.matches((b"src", b"sub", b"big.bin"))
    assert not by_path.matches((b"src", b"a", b"b", b"big.bin"))  # * does not cross a /
    assert not by_path.matches((b"other", b"src", b"sub", b"big.bin"))
    assert Pattern("/src/**/big.bin").matches((b"src", b"a", b"b", b"big.bin"))
    assert Pattern("src/**").matches((b"src", b"a"))


def test_tar_headers_carry_modes_times_links_and_exact_names():
    node = Node(name=b"caf\xe9", type="file", mode=0o4755, uid=3, gid=4, user="u", group="g",
                size=9, mtime_ns=1_500_000_000_250_000_000)
    info = tar_info((b"src", b"caf\xe9"), node)
    assert info.type == tarfile.REGTYPE and info.size == 9 and info.mode == 0o4755
    assert (info.uid, info.gid, info.uname, info.gname) == (3, 4, "u", "g")
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert b"src/caf\xe9" in header and b" mtime=1500000000.250000000\n" in header
    link = tar_info((b"l",), Node(name=b"l", type="symlink", target=b"to/\xff"))
    assert link.type == tarfile.SYMTYPE and link.linkname.encode("utf-8", "surrogateescape") == b"to/\xff"
    hard = tar_info((b"b",), node, link_to=(b"src", b"a"))
    assert hard.type == tarfile.LNKTYPE and hard.linkname == "src/a" and hard.size == 0
    device = tar_info((b"dev",), Node(name=b"dev", type="chardev", rdev=(1 << 8) | 3))
    assert device.type == tarfile.CHRTYPE and (device.devmajor, device.devminor) == (1, 3)
