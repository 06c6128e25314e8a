"""The restore's file-system writer, with real files: every node kind, odd names, deep paths,
hard links, owners, modes, xattrs, times to the nanosecond, sparse files, and links that try
to lead a restore outside its target.

The writer is given nodes and chunk bytes (already verified by the repository in a real
restore), so these tests need no cluster. Most run as root, which is how a faithful restore
runs; the ones that need root say so.
"""

import errno
import os
import pwd
import stat

import attrs
import blake3
import pytest

from sdbackup.client.fswriter import (
    FileSystemWriter,
    Folder,
    RestoreError,
    nonzero_runs,
)
from sdbackup.client.listing import entry_line, mode_string
from sdbackup.objects import Node

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="only root can do this")
MiB = 1024 * 1024
#: Odd but distinct times (nanoseconds matter), atime apart from mtime.
MTIME = 1_600_000_000_123_456_789
ATIME = 1_500_000_000_987_654_321
ODD_NAMES = [b"\xff\xfe-not-utf-8", b"new\nline", b"back\\slash", b"x" * 255, "日本語 é".encode(),
             b" leading space", b"-dash", b"..."]


def file_node(name: bytes, data: bytes, **fields) -> Node:
    fields.setdefault("mode", 0o644)
    fields.setdefault("mtime_ns", MTIME)
    fields.setdefault("atime_ns", ATIME)
    return Node(name=name, type="file", size=len(data), hash=blake3.blake3(data).digest(), **fields)


def node(name: bytes, type: str, **fields) -> Node:
    fields.setdefault("mode", 0o755 if type == "dir" else 0o644)
    fields.setdefault("mtime_ns", MTIME)
    fields.setdefault("atime_ns", ATIME)
    return Node(name=name, type=type, **fields)


def pieces(data: bytes, size: int = 1000):
    return [data[i : i + size] for i in range(0, len(data), size)]


def lstat_at(folder: Folder, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=folder.fd, follow_symlinks=False)


@pytest.fixture
def target(tmp_path):
    return tmp_path / "target"


@pytest.fixture
def writer(target):
    writer = FileSystemWriter(str(target))
    yield writer
    writer.close()


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def everything_under(path) -> list:
    return sorted(os.path.join(dirpath, name) for dirpath, dirs, files in os.walk(path)
                  for name in dirs + files)


# --- files ---------------------------------------------------------------------------------


def test_file_comes_back_with_its_bytes_mode_and_times(writer, target):
    data = os.urandom(10_000)
    notes = writer.write_file(writer.root, file_node(b"f", data, mode=0o640), pieces(data))

    st = os.lstat(target / "f")
    assert notes == []
    assert (target / "f").read_bytes() == data
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_mtime_ns, st.st_atime_ns) == (MTIME, ATIME)
    assert os.listdir(target) == ["f"]  # no temporary file left


def test_empty_file(writer, target):
    writer.write_file(writer.root, file_node(b"empty", b""), [])
    assert (target / "empty").read_bytes() == b""


def test_file_written_chunk_by_chunk(writer, target):
    data = os.urandom(3 * MiB + 17)
    out = writer.open_file(writer.root, file_node(b"big", data))
    for piece in pieces(data, 1 * MiB):
        assert out.write(piece) is False
    out.finish()
    assert (target / "big").read_bytes() == data


def test_bytes_that_do_not_match_the_hash_are_not_written(writer, target):
    data = b"the real bytes"
    with pytest.raises(RestoreError, match="hash"):
        writer.write_file(writer.root, file_node(b"f", data), [b"other bytes!!!"])
    assert os.listdir(target) == []


def test_a_short_file_is_not_written(writer, target):
    data = b"the real bytes"
    with pytest.raises(RestoreError, match="restored 4 bytes"):
        writer.write_file(writer.root, file_node(b"f", data), [data[:4]])
    assert os.listdir(target) == []


def test_a_file_replaces_an_older_file_of_the_same_name(writer, target):
    target.joinpath("f").write_bytes(b"old")
    writer.write_file(writer.root, file_node(b"f", b"new"), [b"new"])
    assert (target / "f").read_bytes() == b"new"


def test_many_entries_in_one_call_and_one_failure_stops_only_its_entry(writer, target):
    (target / "blocked").mkdir(parents=True)
    (target / "blocked" / "inside").write_bytes(b"kept")
    outcomes = writer.write_entries([
        (writer.root, file_node(b"a", b"aaa"), [b"a", b"aa"]),
        (writer.root, file_node(b"bad", b"right"), [b"wrong"]),
        (writer.root, file_node(b"blocked", b"b"), [b"b"]),
        (writer.root, node(b"link", "symlink", target=b"a"), None),
        (writer.root, file_node(b"z", b""), []),
    ])
    assert [type(o).__name__ if isinstance(o, Exception) else o for o in outcomes] == [
        [], "RestoreError", "RestoreError", [], []]
    assert sorted(os.listdir(target)) == ["a", "blocked", "link", "z"]
    assert (target / "a").read_bytes() == b"aaa" and os.readlink(target / "link") == "a"
    assert (target / "blocked" / "inside").read_bytes() == b"kept"


def test_a_folder_in_the_way_of_a_file_is_kept_and_reported(writer, target):
    (target / "f").mkdir()
    (target / "f" / "inside").write_bytes(b"kept")
    with pytest.raises(RestoreError, match="f: a folder of that name is in the way; not replaced"):
        writer.write_file(writer.root, file_node(b"f", b"new"), [b"new"])
    assert (target / "f" / "inside").read_bytes() == b"kept"
    assert sorted(os.listdir(target)) == ["f"]


# --- sparse files --------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "offset", "expected"), [
    (b"", 0, []),
    (b"abc", 0, [(0, 3)]),
    (bytes(4096), 0, []),
    (bytes(8192), 0, []),
    (bytes(4096) + b"x", 0, [(4096, 4097)]),
    (b"x" + bytes(8191), 0, [(0, 4096)]),
    (b"x" + bytes(8191) + b"y", 0, [(0, 4096), (8192, 8193)]),
    # Blocks are the file's: at offset 100, the first block of data ends at 3996.
    (bytes(3996) + bytes(4096) + b"x", 100, [(8092, 8093)]),
    (b"x" + bytes(3995) + bytes(4096) + b"y", 100, [(0, 3996), (8092, 8093)]),
    # A zero run not covering a whole aligned block is written.
    (b"x" + bytes(4096) + b"y", 0, [(0, 4098)]),
    (bytes(3000), 0, [(0, 3000)]),
])
def test_nonzero_runs(data, offset, expected):
    assert nonzero_runs(data, offset) == expected


def test_zero_blocks_are_not_written_and_the_file_stays_sparse(writer, target):
    size = 256 * MiB
    data_at = 100 * MiB + 12345
    payload = os.urandom(4096)
    chunk = 4 * MiB
    expected_hash = blake3.blake3()
    node_pieces = []
    for start in range(0, size, chunk):
        piece = bytearray(chunk)
        if start <= data_at < start + chunk:
            piece[data_at - start : data_at - start + len(payload)] = payload
        node_pieces.append(bytes(piece))
        expected_hash.update(piece)
    sparse = Node(name=b"sparse", type="file", mode=0o600, size=size, hash=expected_hash.digest())

    out = writer.open_file(writer.root, sparse)
    for index, piece in enumerate(node_pieces):
        if index == 5:
            out.write_zeros(len(piece))  # a chunk the restore knows is all zeros: no bytes at all
        else:
            out.write(piece)
    out.finish()

    st = os.lstat(target / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 <= 64 * 1024, f"{st.st_blocks * 512} bytes allocated"
    with open(target / "sparse", "rb") as f:
        f.seek(data_at - 10)
        assert f.read(len(payload) + 20) == bytes(10) + payload + bytes(10)


def test_trailing_zeros_make_the_file_its_full_size(writer, target):
    data = b"head" + bytes(3 * MiB)
    out = writer.open_file(writer.root, file_node(b"f", data))
    assert out.write(data[:4]) is False
    assert out.write(data[4:]) is True  # all zeros: nothing written
    out.finish()
    assert (target / "f").read_bytes() == data
    assert os.lstat(target / "f").st_blocks * 512 <= 64 * 1024


# --- folders ---------------------------------------------------------------------------------------


def test_folder_metadata_is_set_when_it_is_finished(writer, target):
    folder = writer.make_folder(writer.root, node(b"d", "dir", mode=0o2750))
    writer.write_file(folder, file_node(b"f", b"x"), [b"x"])
    writer.make_special(folder, node(b"l", "symlink", target=b"f"))
    assert writer.finish_folder(folder) == []

    st = os.lstat(target / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o2750
    assert (st.st_mtime_ns, st.st_atime_ns) == (MTIME, ATIME)
    assert folder.fd is None  # closed


def test_an_existing_folder_is_used(writer, target):
    (target / "d").mkdir(parents=True)
    (target / "d" / "old").write_bytes(b"kept")
    folder = writer.make_folder(writer.root, node(b"d", "dir"))
    writer.write_file(folder, file_node(b"new", b"n"), [b"n"])
    writer.finish_folder(folder)
    assert sorted(os.listdir(target / "d")) == ["new", "old"]


def test_sticky_and_setgid_folders(writer, target):
    for name, mode in ((b"tmp", 0o1777), (b"shared", 0o2775), (b"all", 0o7755)):
        writer.finish_folder(writer.make_folder(writer.root, node(name, "dir", mode=mode)))
        assert stat.S_IMODE(os.lstat(target / name.decode()).st_mode) == mode


def test_paths_longer_than_path_max_restore(writer, target):
    """Deep nesting: each call sees one name, so the full path's length does not matter."""
    names = [bytes([ord("a") + i % 26]) * 200 for i in range(30)]  # about 6,000 bytes of path
    folders = [writer.root]
    for name in names:
        folders.append(writer.make_folder(folders[-1], node(name, "dir", mode=0o750)))
    data = os.urandom(5000)
    writer.write_file(folders[-1], file_node(b"x" * 255, data), [data])
    writer.make_special(folders[-1], node(b"link", "symlink", target=b"../" * 30))
    for folder in reversed(folders[1:]):
        writer.finish_folder(folder)

    assert sum(len(n) + 1 for n in names) + 256 > 4096
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime_ns == MTIME
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(b"x" * 255, os.O_RDONLY, dir_fd=fd)
        with os.fdopen(file_fd, "rb") as f:
            assert f.read() == data
        assert os.readlink(b"link", dir_fd=fd) == b"../" * 30
    finally:
        os.close(fd)


# --- odd names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ODD_NAMES, ids=repr)
def test_odd_names_come_back_exactly(writer, target, name):
    folder = writer.make_folder(writer.root, node(name, "dir"))
    writer.write_file(folder, file_node(name, b"data"), [b"data"])
    writer.make_special(folder, node(name + b"-link"[: 255 - len(name)] if len(name) < 255 else b"l",
                                     "symlink", target=name))
    writer.finish_folder(folder)

    assert os.listdir(bytes(target)) == [name]
    inside = os.path.join(bytes(target), name)
    assert name in os.listdir(inside)
    with open(os.path.join(inside, name), "rb") as f:
        assert f.read() == b"data"
    links = [n for n in os.listdir(inside) if n != name]
    assert [os.readlink(os.path.join(inside, n)) for n in links] == [name]


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"../../escape", b"/abs", b"nul\0"], ids=repr)
def test_hostile_names_are_refused(writer, tmp_path, target, name):
    """A tree from a hostile cluster could carry any name: the writer checks again."""
    with attrs.validators.disabled():
        hostile = [Node(name=name, type=kind, target=b"/", size=0,
                        hash=blake3.blake3(b"").digest()) for kind in ("dir", "file", "symlink", "fifo")]
    before = everything_under(tmp_path)
    for entry in hostile:
        with pytest.raises(RestoreError, match="not a name"):
            if entry.type == "dir":
                writer.make_folder(writer.root, entry)
            elif entry.type == "file":
                writer.write_file(writer.root, entry, [])
            else:
                writer.make_special(writer.root, entry)
    assert everything_under(tmp_path) == before


# --- links that lead outside ------------------------------------------------------------------------


def test_a_link_is_never_entered_as_a_folder(writer, target, outside):
    """``esc -> /outside`` then ``esc/x``: esc is a link, so it cannot be opened as a folder."""
    writer.make_special(writer.root, node(b"esc", "symlink", target=str(outside).encode()))
    with pytest.raises(RestoreError, match="not a folder"):
        writer.make_folder(writer.root, node(b"esc", "dir"))
    assert os.listdir(outside) == []
    assert os.readlink(target / "esc") == str(outside)


def test_a_relative_link_climbing_out_is_not_entered(writer, target, outside):
    writer.make_special(writer.root, node(b"up", "symlink", target=b"../outside"))
    with pytest.raises(RestoreError):
        writer.make_folder(writer.root, node(b"up", "dir"))
    assert os.listdir(outside) == []


def test_a_file_over_a_link_replaces_the_link_not_what_it_points_to(writer, target, outside):
    victim = outside / "victim"
    victim.write_bytes(b"untouched")
    writer.make_special(writer.root, node(b"esc", "symlink", target=str(victim).encode()))
    writer.write_file(writer.root, file_node(b"esc", b"restored"), [b"restored"])
    writer.make_special(writer.root, node(b"esc2", "symlink", target=str(victim).encode()))
    writer.make_special(writer.root, node(b"esc2", "fifo"))

    assert victim.read_bytes() == b"untouched"
    assert (target / "esc").read_bytes() == b"restored" and not (target / "esc").is_symlink()
    assert stat.S_ISFIFO(os.lstat(target / "esc2").st_mode)
    assert os.listdir(outside) == ["victim"]


def test_a_link_already_in_the_target_is_not_followed(writer, target, outside):
    """The target holds a link from before the restore: it is not followed either."""
    target.mkdir(exist_ok=True)
    (target / "d").symlink_to(outside)
    with pytest.raises(RestoreError):
        writer.make_folder(writer.root, node(b"d", "dir"))
    assert os.listdir(outside) == []


def test_a_hard_link_reaches_only_entries_of_the_restore(writer, target, outside):
    """A hard link's source is an entry the restore made, reached one name at a time."""
    writer.make_special(writer.root, node(b"esc", "symlink", target=str(outside).encode()))
    source = Folder(None, (b"esc",))  # a "folder" that is really the link
    with pytest.raises(OSError) as raised:
        writer.link(writer.root, file_node(b"l", b""), source, b"victim")
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(outside) == []


# --- links, FIFOs, devices ---------------------------------------------------------------------


def test_symlink_with_its_times(writer, target):
    writer.make_special(writer.root, node(b"l", "symlink", target=b"no such file"))
    st = os.lstat(target / "l")
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(target / "l") == "no such file"
    assert (st.st_mtime_ns, st.st_atime_ns) == (MTIME, ATIME)


def test_fifo(writer, target):
    writer.make_special(writer.root, node(b"pipe", "fifo", mode=0o620))
    st = os.lstat(target / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert (st.st_mtime_ns, st.st_atime_ns) == (MTIME, ATIME)


@needs_root
def test_devices_as_root(writer, target):
    writer.make_special(writer.root, node(b"null", "chardev", mode=0o666, rdev=os.makedev(1, 3)))
    writer.make_special(writer.root, node(b"loop", "blockdev", mode=0o660, rdev=os.makedev(7, 200)))
    null, loop = os.lstat(target / "null"), os.lstat(target / "loop")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666 and null.st_mtime_ns == MTIME
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 200)
    assert stat.S_IMODE(loop.st_mode) == 0o660


def test_devices_need_root(target):
    writer = FileSystemWriter(str(target), as_root=False)
    try:
        with pytest.raises(RestoreError, match="only be made by root"):
            writer.make_special(writer.root, node(b"null", "chardev", rdev=os.makedev(1, 3)))
        assert os.listdir(target) == []
    finally:
        writer.close()


# --- hard links ------------------------------------------------------------------------------------


def test_hard_links_share_one_inode(writer, target):
    data = os.urandom(3000)
    first = file_node(b"first", data, links=3, dev=1, inode=77)
    a = writer.make_folder(writer.root, node(b"a", "dir"))
    b = writer.make_folder(writer.root, node(b"b", "dir"))
    writer.write_file(a, first, [data])
    writer.link(b, attrs.evolve(first, name=b"second"), a, b"first")  # source folder open
    writer.finish_folder(a)
    c = writer.make_folder(writer.root, node(b"c", "dir"))
    writer.link(c, attrs.evolve(first, name=b"third"), a, b"first")  # source folder closed: reopened
    writer.finish_folder(b)
    writer.finish_folder(c)

    inodes = {os.lstat(target / p).st_ino for p in ("a/first", "b/second", "c/third")}
    assert len(inodes) == 1
    assert os.lstat(target / "a/first").st_nlink == 3
    assert (target / "c/third").read_bytes() == data
    assert os.lstat(target / "a").st_mtime_ns == MTIME


def test_a_hard_link_replaces_an_existing_file(writer, target):
    writer.write_file(writer.root, file_node(b"first", b"x", links=2), [b"x"])
    (target / "second").write_bytes(b"old")
    writer.link(writer.root, file_node(b"second", b"x", links=2), writer.root, b"first")
    assert os.lstat(target / "second").st_ino == os.lstat(target / "first").st_ino


def test_hard_linked_fifos_and_links(writer, target):
    writer.make_special(writer.root, node(b"p1", "fifo", links=2))
    writer.link(writer.root, node(b"p2", "fifo", links=2), writer.root, b"p1")
    writer.make_special(writer.root, node(b"l1", "symlink", target=b"somewhere", links=2))
    writer.link(writer.root, node(b"l2", "symlink", target=b"somewhere", links=2), writer.root, b"l1")
    assert os.lstat(target / "p1").st_ino == os.lstat(target / "p2").st_ino
    assert os.lstat(target / "l1").st_ino == os.lstat(target / "l2").st_ino
    assert os.readlink(target / "l2") == "somewhere"


# --- owners -------------------------------------------------------------------------------------------


@needs_root
def test_owner_and_group_by_name_where_the_name_exists(writer, target):
    daemon = pwd.getpwnam("daemon")
    # The numbers saved are another machine's; the names exist here: names win.
    writer.write_file(writer.root, file_node(b"f", b"x", user="daemon", uid=4242, group="daemon",
                                             gid=4343), [b"x"])
    st = os.lstat(target / "f")
    assert (st.st_uid, st.st_gid) == (daemon.pw_uid, daemon.pw_gid)


@needs_root
def test_owner_and_group_by_number_when_the_name_does_not_exist(writer, target):
    folder = writer.make_folder(writer.root, node(b"d", "dir", user="no-such-user-here", uid=4242,
                                                  group="no-such-group-here", gid=4343))
    writer.write_file(folder, file_node(b"f", b"x", uid=5151, gid=5252), [b"x"])
    writer.make_special(folder, node(b"l", "symlink", target=b"f", uid=6161, gid=6262))
    writer.make_special(folder, node(b"p", "fifo", uid=7171, gid=7272))
    writer.finish_folder(folder)
    assert (os.lstat(target / "d").st_uid, os.lstat(target / "d").st_gid) == (4242, 4343)
    assert (os.lstat(target / "d/f").st_uid, os.lstat(target / "d/f").st_gid) == (5151, 5252)
    assert (os.lstat(target / "d/l").st_uid, os.lstat(target / "d/l").st_gid) == (6161, 6262)
    assert (os.lstat(target / "d/p").st_uid, os.lstat(target / "d/p").st_gid) == (7171, 7272)


@needs_root
def test_setuid_and_setgid_survive_the_change_of_owner(writer, target):
    """chown clears setuid and setgid: the mode is set after it."""
    writer.write_file(writer.root, file_node(b"su", b"#!", mode=0o6755, uid=4242, gid=4343), [b"#!"])
    st = os.lstat(target / "su")
    assert stat.S_IMODE(st.st_mode) == 0o6755 and (st.st_uid, st.st_gid) == (4242, 4343)


def test_setuid_and_setgid_are_dropped_with_a_note_when_not_root(target):
    """Restored by anyone else, the entries are theirs: a setuid program from a snapshot would
    run with their rights. The sticky bit is kept."""
    writer = FileSystemWriter(str(target), as_root=False)
    try:
        notes = writer.write_file(writer.root, file_node(b"su", b"#!", mode=0o6755), [b"#!"])
        folder = writer.make_folder(writer.root, node(b"shared", "dir", mode=0o3775))
        notes += writer.finish_folder(folder)
        notes += writer.write_file(writer.root, file_node(b"plain", b"x", mode=0o755), [b"x"])
    finally:
        writer.close()
    assert stat.S_IMODE(os.lstat(target / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(target / "shared").st_mode) == 0o1775
    assert stat.S_IMODE(os.lstat(target / "plain").st_mode) == 0o755
    assert notes == ["su: setuid and setgid bits not restored (only root restores them)",
                     "shared: setuid and setgid bits not restored (only root restores them)"]


def test_owner_is_left_alone_when_not_root(target):
    writer = FileSystemWriter(str(target), as_root=False)
    try:
        writer.write_file(writer.root, file_node(b"f", b"x", uid=4242, gid=4343), [b"x"])
    finally:
        writer.close()
    assert os.lstat(target / "f").st_uid == os.geteuid()


# --- extended attributes ---------------------------------------------------------------------------


def _xattrs_work(path) -> bool:
    probe = path / ".probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def posix_acl(mode: int, user: int, user_perm: int) -> bytes:
    """A ``system.posix_acl_access`` value: the owner, group and others from ``mode``, one named
    user, and the mask (the Linux xattr format: version 2, then (tag, perm, id) entries)."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, (mode >> 6) & 7, undefined), (0x02, user_perm, user),
               (0x04, (mode >> 3) & 7, undefined), (0x10, (mode >> 3) & 7 | user_perm, undefined),
               (0x20, mode & 7, undefined)]
    return (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
        for tag, perm, ident in entries)


def test_xattrs_of_files_folders_and_fifos(writer, target, tmp_path):
    if not _xattrs_work(tmp_path):
        pytest.skip("this file system keeps no user xattrs")
    attributes = ((b"user.comment", b"hello \xff"), (b"user.empty", b""))
    folder = writer.make_folder(writer.root, node(b"d", "dir", xattrs=attributes))
    assert writer.write_file(folder, file_node(b"f", b"x", mode=0o444, xattrs=attributes), [b"x"]) == []
    writer.finish_folder(folder)
    for path in (target / "d", target / "d/f"):
        assert {(k.encode(), os.getxattr(path, k)) for k in os.listxattr(path)} >= set(attributes)


def test_posix_acl_comes_back(writer, target, tmp_path):
    acl = posix_acl(0o640, user=4242, user_perm=6)
    probe = tmp_path / "acl-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "system.posix_acl_access", acl)
    except OSError as e:
        pytest.skip(f"no POSIX ACLs here: {e}")
    mode = 0o660  # the group bits of a file with an ACL show its mask
    writer.write_file(writer.root, file_node(b"f", b"x", mode=mode,
                                             xattrs=((b"system.posix_acl_access", acl),)), [b"x"])
    assert os.getxattr(target / "f", "system.posix_acl_access") == acl
    assert stat.S_IMODE(os.lstat(target / "f").st_mode) == mode


@needs_root
def test_trusted_xattrs_on_a_symlink(writer, target):
    attributes = ((b"trusted.sdbackup", b"on the link itself"),)
    try:
        notes = writer.make_special(writer.root, node(b"l", "symlink", target=b"nowhere", xattrs=attributes))
    except OSError as e:  # pragma: no cover - a file system without trusted xattrs
        pytest.skip(f"no trusted xattrs here: {e}")
    if notes:
        pytest.skip(f"no trusted xattrs here: {notes}")
    assert os.getxattr(target / "l", "trusted.sdbackup", follow_symlinks=False) == b"on the link itself"


def test_an_xattr_the_system_refuses_is_a_note_not_a_failure(writer, target):
    """Linux keeps no user.* attributes on links: the link is restored, the attribute noted."""
    notes = writer.make_special(writer.root, node(b"l", "symlink", target=b"x",
                                                  xattrs=((b"user.refused", b"1"),)))
    assert os.path.islink(target / "l")
    assert len(notes) == 1 and "user.refused" in notes[0] and notes[0].startswith("l: ")


# --- ls ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "mode", "expected"), [
    ("dir", 0o755, "drwxr-xr-x"),
    ("dir", 0o1777, "drwxrwxrwt"),
    ("dir", 0o1776, "drwxrwxrwT"),
    ("file", 0o4755, "-rwsr-xr-x"),
    ("file", 0o4644, "-rwSr--r--"),
    ("file", 0o2755, "-rwxr-sr-x"),
    ("file", 0o2745, "-rwxr-Sr-x"),
    ("symlink", 0o777, "lrwxrwxrwx"),
    ("fifo", 0o600, "prw-------"),
    ("chardev", 0o666, "crw-rw-rw-"),
    ("blockdev", 0o660, "brw-rw----"),
])
def test_mode_strings(kind, mode, expected):
    assert mode_string(node(b"n", kind, mode=mode)) == expected


def test_ls_lines():
    assert entry_line((b"a", b"b"), node(b"b", "dir")) == "a/b/"
    assert entry_line((b"l",), node(b"l", "symlink", target=b"new\nline")) == "l -> new\\nline"
    assert entry_line((b"\xff", b"back\\slash"), file_node(b"f", b"")) == "\\xff/back\\\\slash"
    line = entry_line((b"f",), file_node(b"f", b"12345", mode=0o4755, user="root", gid=42), long=True)
    fields = line.split()
    assert fields[:4] == ["-rwsr-xr-x", "root", "42", "5"] and fields[-1] == "f"
    device = entry_line((b"null",), node(b"null", "chardev", rdev=os.makedev(1, 3)), long=True)
    assert "1,3" in device.split()


def test_an_extended_attribute_the_kernel_refuses_is_a_note_naming_its_entry(writer, target):
    folder = writer.make_folder(writer.root, node(b"d", "dir"))
    refused = ((b"nosuch.name", b"v"),)  # a namespace Linux does not have
    notes = writer.write_file(folder, file_node(b"f\n", b"x", xattrs=refused), [b"x"])
    assert writer.finish_folder(folder) == []
    assert (target / "d" / "f\n").read_bytes() == b"x"
    assert len(notes) == 1
    assert notes[0].startswith("d/f\\n: extended attribute nosuch.name not restored: ")
