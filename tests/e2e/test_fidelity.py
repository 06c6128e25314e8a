"""A restore is a faithful copy of any Linux tree: real processes, restored as root, compared entry by entry.

One tree holds what a backup meets on a real system: regular, empty and sparse
files (one of 256 MiB with 4 KiB of data), folders, symbolic links (one
dangling), a group of three hard links (and a file whose other link is outside
the tree), a FIFO, a character and a block device, a socket (skipped, with a
note), setuid, setgid and sticky modes, owners with and without a name on this
machine, nanosecond mtimes and atimes on files, folders and links, extended
attributes in the ``user``, ``trusted`` and ``security`` namespaces and POSIX
ACLs, names with a newline, a backslash, a byte that is not UTF-8 or 255 bytes,
and a path longer than 4,096 bytes. It is backed up with the ``sdbackup``
command, restored into a new folder, and every entry is compared: type, bytes,
mode, owner and group, mtime and atime in ns, extended attributes, hard-link
groups, sparse allocation, device numbers and names. ``sdbackup ls`` must show
every name on one line, escaped.

The tree is read and built relative to folder descriptors (a path past 4,096
bytes cannot be named whole). atimes are set in the future, so that reading a
file or listing a folder (relatime) does not move them while the test looks.
"""

import contextlib
import grp
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import attrs
import blake3
import pytest

from sdbackup.names import escape

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners, devices and trusted.* needs root"),
]

MiB = 1024 * 1024
SPARSE_SIZE = 256 * MiB
SPARSE_DATA_AT = 100 * MiB
MTIME_BASE = 1_400_000_000_123_456_789
#: atimes a day and more in the future, each different in its nanoseconds.
ATIME_BASE = time.time_ns() + 86_400 * 10**9 + 987_654_321
#: Deep enough for a path of more than 4,096 bytes: 22 names of 200 bytes.
DEEP_LEVELS = 22
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ODD_NAMES = [
    b"new\nline", b"back\\slash", b"bad\xffbyte", b"\xe9t\xe9 latin-1", b"a name with spaces",
    b" leading space", b"trailing space ", b"tab\there", b"-dash", b"\x01control", b"x\\x41 looks escaped",
    b"zero\xe2\x80\x8bwidth", b"emoji \xf0\x9f\x98\x80", "é".encode() * 127 + b"x",
]
LONG_NAME = b"L" * 255


def unused_id(lookup) -> int:
    """A number that no user (or group) on this machine has."""
    for number in range(12345, 60000):
        try:
            lookup(number)
        except KeyError:
            return number
    raise AssertionError("no unused id")


NAMELESS_UID = unused_id(pwd.getpwuid)
NAMELESS_GID = unused_id(grp.getgrgid)
NAMED_UID = pwd.getpwnam("daemon").pw_uid
NAMED_GID = grp.getgrnam("daemon").gr_gid


# --- building the tree, one name at a time ------------------------------------------------------


@contextlib.contextmanager
def parent_of(root: Path, parts: tuple):
    """``(fd of the folder holding parts[-1], parts[-1])``, reached without following links."""
    fd = os.open(root, FOLDER_FLAGS)
    try:
        for part in parts[:-1]:
            inner = os.open(part, FOLDER_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield fd, parts[-1]
    finally:
        os.close(fd)


def proc_path(fd: int, name: bytes) -> bytes:
    """A short path to ``name`` in the folder ``fd`` (for calls that take no ``dir_fd``)."""
    return b"/proc/self/fd/%d/%s" % (fd, name)


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The bytes of ``system.posix_acl_*``: version 2, then (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


UNDEFINED = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def set_acl(root: Path, parts: tuple, default: bool = False):
    """An ACL giving NAMELESS_UID rw- and the daemon group r--: by ``setfacl`` when installed,
    else by writing the xattr's bytes."""
    with parent_of(root, parts) as (fd, name):
        path = proc_path(fd, name)
        if shutil.which("setfacl"):
            spec = f"u:{NAMELESS_UID}:rw,g:{NAMED_GID}:r,m::rw"
            subprocess.run(["setfacl", *(["-d"] if default else []), "-m", spec, os.fsdecode(path)],
                           check=True)
            return
        value = posix_acl([(USER_OBJ, 6, UNDEFINED), (USER, 6, NAMELESS_UID), (GROUP_OBJ, 4, UNDEFINED),
                           (GROUP, 4, NAMED_GID), (MASK, 6, UNDEFINED), (OTHER, 4, UNDEFINED)])
        key = "system.posix_acl_default" if default else "system.posix_acl_access"
        os.setxattr(path, key, value, follow_symlinks=False)


class Tree:
    """Builds the fidelity tree under ``root``; remembers every path to give it times at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: list[tuple] = []
        root.mkdir()

    def _new(self, parts: tuple, make, uid: int = 0, gid: int = 0, mode: int | None = None):
        with parent_of(self.root, parts) as (fd, name):
            make(fd, name)
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)  # before chmod: it clears setuid
            if mode is not None:
                os.chmod(name, mode, dir_fd=fd)
        self.paths.append(parts)

    def folder(self, parts: tuple, mode: int = 0o755, uid: int = 0, gid: int = 0):
        self._new(parts, lambda fd, name: os.mkdir(name, dir_fd=fd), uid, gid, mode)

    def file(self, parts: tuple, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0):
        def make(fd, name):
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd)
            try:
                os.write(out, data)
            finally:
                os.close(out)

        self._new(parts, make, uid, gid, mode)

    def sparse(self, parts: tuple, size: int, data_at: int, data: bytes):
        def make(fd, name):
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd)
            try:
                os.pwrite(out, data, data_at)
                os.ftruncate(out, size)
            finally:
                os.close(out)

        self._new(parts, make, mode=0o640)

    def symlink(self, parts: tuple, target: bytes, uid: int = 0, gid: int = 0):
        self._new(parts, lambda fd, name: os.symlink(target, name, dir_fd=fd), uid, gid)

    def hard_link(self, parts: tuple, existing: tuple):
        with parent_of(self.root, existing) as (source_fd, source_name), \
                parent_of(self.root, parts) as (fd, name):
            os.link(source_name, name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
        self.paths.append(parts)

    def fifo(self, parts: tuple, mode: int, uid: int = 0, gid: int = 0):
        self._new(parts, lambda fd, name: os.mkfifo(name, 0o600, dir_fd=fd), uid, gid, mode)

    def device(self, parts: tuple, kind: int, rdev: int, mode: int, uid: int = 0, gid: int = 0):
        self._new(parts, lambda fd, name: os.mknod(name, kind | 0o600, rdev, dir_fd=fd), uid, gid, mode)

    def xattr(self, parts: tuple, key: str, value: bytes):
        with parent_of(self.root, parts) as (fd, name):
            os.setxattr(proc_path(fd, name), key, value, follow_symlinks=False)

    def set_times(self):
        """Distinct mtimes and atimes in ns on everything, deepest first (writing in a folder
        moves its mtime), the root last."""
        ordered = sorted(self.paths, key=len, reverse=True)
        for index, parts in enumerate(ordered):
            with parent_of(self.root, parts) as (fd, name):
                os.utime(name, ns=(ATIME_BASE + index * 1_000_003, MTIME_BASE + index * 86_400_000_000_007),
                         dir_fd=fd, follow_symlinks=False)
        os.utime(self.root, ns=(ATIME_BASE - 1, MTIME_BASE - 1))


def build(src: Path, outside: Path) -> dict:
    """The fidelity tree at ``src``; returns facts the checks need."""
    tree = Tree(src)
    tree.file((b"file.bin",), os.urandom(300_000))
    tree.file((b"empty",))
    tree.folder((b"empty folder",), mode=0o700)
    tree.folder((b"dir",))
    tree.folder((b"dir", b"sub"), mode=0o750)
    tree.file((b"dir", b"sub", b"leaf.txt"), b"leaf\n" * 100)
    tree.symlink((b"link to leaf",), b"dir/sub/leaf.txt")
    tree.symlink((b"dangling",), b"no/such/file")
    tree.symlink((b"absolute",), b"/usr/share")
    # Hard links: a group of three over two folders, and one whose other link is outside the tree.
    tree.folder((b"links",))
    tree.folder((b"other",))
    tree.file((b"links", b"one"), os.urandom(5000), mode=0o640, uid=NAMED_UID, gid=NAMED_GID)
    tree.hard_link((b"links", b"two"), (b"links", b"one"))
    tree.hard_link((b"other", b"three"), (b"links", b"one"))
    tree.xattr((b"links", b"one"), "user.shared", b"by all three")
    outside.write_bytes(b"linked from outside\n")
    os.link(outside, src / "partial")
    tree.paths.append((b"partial",))
    # Special files.
    tree.folder((b"special",))
    tree.fifo((b"special", b"fifo"), 0o640, uid=NAMELESS_UID, gid=NAMELESS_GID)
    tree.device((b"special", b"chardev"), stat.S_IFCHR, os.makedev(1, 7), 0o620, NAMED_UID, NAMED_GID)
    tree.device((b"special", b"blockdev"), stat.S_IFBLK, os.makedev(7, 200), 0o660)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(src / "special" / "socket.sock"))
    # Modes and owners.
    tree.folder((b"modes",))
    tree.file((b"modes", b"setuid"), b"#!/bin/sh\n", mode=0o4755, uid=NAMELESS_UID, gid=NAMELESS_GID)
    tree.file((b"modes", b"setgid"), b"#!/bin/sh\n", mode=0o2711, gid=NAMED_GID)
    tree.folder((b"modes", b"sticky"), mode=0o1777)
    tree.folder((b"modes", b"setgid folder"), mode=0o2775, gid=NAMED_GID)
    tree.folder((b"modes", b"read-only folder"), mode=0o555)
    tree.file((b"modes", b"read-only folder", b"inside"), b"x", mode=0o444)
    tree.folder((b"owners",), mode=0o750, uid=NAMELESS_UID, gid=NAMELESS_GID)
    tree.file((b"owners", b"nameless"), b"n", uid=NAMELESS_UID, gid=NAMELESS_GID)
    tree.file((b"owners", b"daemon"), b"d", uid=NAMED_UID, gid=NAMED_GID)
    tree.file((b"owners", b"mixed"), b"m", uid=NAMED_UID, gid=NAMELESS_GID)
    tree.symlink((b"owners", b"link"), b"daemon", uid=NAMED_UID, gid=NAMELESS_GID)
    # Extended attributes and ACLs (a capability, which chown clears, so it goes on after it).
    tree.folder((b"xattrs",))
    tree.file((b"xattrs", b"plain"), b"attributes\n")
    tree.xattr((b"xattrs", b"plain"), "user.comment", b"hello")
    tree.xattr((b"xattrs", b"plain"), "user.binary", bytes(range(256)))
    tree.xattr((b"xattrs", b"plain"), "user.empty", b"")
    tree.xattr((b"xattrs", b"plain"), "trusted.sdbackup", b"root only")
    tree.xattr((b"xattrs",), "user.folder", b"on a folder")
    tree.xattr((b"link to leaf",), "trusted.on-a-link", b"l")
    tree.xattr((b"special", b"fifo"), "trusted.on-a-fifo", b"f")
    tree.file((b"xattrs", b"capable"), b"\x7fELF", mode=0o755, uid=NAMELESS_UID, gid=NAMED_GID)
    tree.xattr((b"xattrs", b"capable"), "security.capability",
               struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0))  # cap_net_bind_service=ep
    tree.file((b"xattrs", b"acl"), b"acl\n", mode=0o640)
    set_acl(src, (b"xattrs", b"acl"))
    tree.folder((b"xattrs", b"acl folder"))
    set_acl(src, (b"xattrs", b"acl folder"))
    set_acl(src, (b"xattrs", b"acl folder"), default=True)
    tree.file((b"xattrs", b"acl folder", b"inherits"), b"i\n", mode=0o660)  # gets the default ACL
    # Sparse files: one of 256 MiB with 4 KiB of data, one ending in a hole at an odd size.
    sparse_data = os.urandom(4096)
    tree.sparse((b"sparse.img",), SPARSE_SIZE, SPARSE_DATA_AT, sparse_data)
    tree.sparse((b"ends in a hole",), 32 * MiB + 100, 0, os.urandom(4096))
    # Odd names: files and a folder; and a path longer than 4,096 bytes.
    tree.folder((b"names",))
    for index, name in enumerate(ODD_NAMES):
        tree.file((b"names", name), b"%d\n" % index)
    tree.folder((b"names", LONG_NAME))
    tree.file((b"names", LONG_NAME, LONG_NAME[:-1] + b"f"), b"255 bytes\n")
    deep = (b"deep",)
    tree.folder(deep)
    for level in range(DEEP_LEVELS):
        deep = (*deep, b"%02d" % level + b"_" * 198)
        tree.folder(deep)
    tree.file((*deep, b"bottom.txt"), b"far down\n")
    tree.symlink((*deep, b"up"), b"../..")
    tree.set_times()
    return {"sparse_data": sparse_data, "deep": deep}


# --- reading a tree back ------------------------------------------------------------------------


@attrs.frozen
class Entry:
    kind: str
    mode: int  # the whole st_mode: type and permission bits
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    size: int | None  # not for folders (their size depends on their history)
    rdev: int
    target: bytes | None
    xattrs: tuple
    inode: int = attrs.field(eq=False)
    blocks: int = attrs.field(eq=False)
    digest: str | None = None


KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
         stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFSOCK: "socket"}


def read_xattrs(fd: int, name: bytes) -> tuple:
    path = proc_path(fd, name)
    return tuple(sorted((key, os.getxattr(path, key, follow_symlinks=False))
                        for key in os.listxattr(path, follow_symlinks=False)))


def scan(root: Path) -> dict[tuple, Entry]:
    """Every entry under ``root`` (itself as ``()``), by its names; stats first, bytes after,
    so that reading files cannot move what was recorded."""
    found: dict[tuple, Entry] = {}

    def entry(fd: int, name: bytes, parts: tuple):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        found[parts] = Entry(
            kind=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
            atime_ns=st.st_atime_ns, size=None if kind == "dir" else st.st_size, rdev=st.st_rdev,
            target=os.readlink(name, dir_fd=fd) if kind == "symlink" else None,
            xattrs=read_xattrs(fd, name), inode=st.st_ino, blocks=st.st_blocks)
        if kind == "dir":
            inner = os.open(name, FOLDER_FLAGS, dir_fd=fd)
            try:
                for child in sorted(os.fsencode(n) for n in os.listdir(inner)):
                    entry(inner, child, (*parts, child))
            finally:
                os.close(inner)

    with parent_of(root.parent, (os.fsencode(root.name),)) as (fd, name):
        entry(fd, name, ())
    for parts, found_entry in found.items():
        if found_entry.kind == "file":
            found[parts] = attrs.evolve(found_entry, digest=content_digest(root, parts))
    return found


def content_digest(root: Path, parts: tuple) -> str:
    with parent_of(root.parent, (os.fsencode(root.name), *parts)) as (fd, name):
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    hasher = blake3.blake3()
    with os.fdopen(file_fd, "rb") as f:
        while block := f.read(4 * MiB):
            hasher.update(block)
    return hasher.hexdigest()


def show(parts: tuple) -> str:
    text = "/".join(escape(p) for p in parts) or "."
    return text if len(text) < 120 else f"{text[:50]}...{text[-50:]} ({len(text)} characters)"


def link_groups(entries: dict[tuple, Entry]) -> set[frozenset]:
    """The hard-link groups among the entries: paths sharing an inode, two or more."""
    by_inode: dict[int, set] = {}
    for parts, entry in entries.items():
        if entry.kind != "dir":
            by_inode.setdefault(entry.inode, set()).add(parts)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def assert_same_entries(expected: dict[tuple, Entry], restored: dict[tuple, Entry]):
    missing = sorted(show(p) for p in set(expected) - set(restored))
    extra = sorted(show(p) for p in set(restored) - set(expected))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    problems = []
    for parts in sorted(expected):
        want, got = expected[parts], restored[parts]
        for field in attrs.fields(Entry):
            if field.eq and getattr(want, field.name) != getattr(got, field.name):
                shown = (oct if field.name == "mode" else repr)
                problems.append(f"  {show(parts)}: {field.name} {shown(getattr(want, field.name))} "
                                f"restored as {shown(getattr(got, field.name))}")
    assert not problems, "restored entries differ:\n" + "\n".join(problems)


# --- the test ----------------------------------------------------------------------------------------


def test_a_restore_as_root_is_a_faithful_copy_of_every_kind_of_entry(start_cluster, tmp_path):
    cluster = start_cluster()
    src = tmp_path / "src"
    facts = build(src, tmp_path / "outside link")
    deep_bytes = len(b"/".join(facts["deep"]))
    assert deep_bytes > 4096, deep_bytes
    expected = scan(src)
    socket_path = (b"special", b"socket.sock")
    assert expected.pop(socket_path).kind == "socket"
    sparse = expected[(b"sparse.img",)]
    assert sparse.size == SPARSE_SIZE and sparse.blocks * 512 <= 64 * 1024, sparse  # really sparse here
    assert len(next(iter(link_groups(expected)))) == 3

    backup = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)

    assert backup.returncode == 0, backup.describe()
    notes = [line for line in backup.stderr.splitlines() if line.strip()]
    assert notes and all("socket.sock" in line for line in notes), backup.describe()
    snapshot = cluster.snapshot_id(backup.stdout)

    target = tmp_path / "restored"
    restore = cluster.sdbackup("restore", snapshot, "--target", target, cwd=tmp_path, check=False)

    assert restore.returncode == 0, restore.describe()
    assert restore.stderr.strip() == "", restore.describe()
    restored = scan(target / "src")
    assert_same_entries(expected, restored)
    assert link_groups(restored) == link_groups(expected) == {
        frozenset({(b"links", b"one"), (b"links", b"two"), (b"other", b"three")})}
    assert restored[(b"partial",)].kind == "file"  # its other link was not backed up: a file alone
    for name, size in ((b"sparse.img", SPARSE_SIZE), (b"ends in a hole", 32 * MiB + 100)):
        allocated = restored[(name,)].blocks * 512
        assert restored[(name,)].size == size and allocated <= MiB, (
            f"{escape(name)}: {allocated} bytes allocated for {size}: the holes were written")
    with open(target / "src/sparse.img", "rb") as f:
        f.seek(SPARSE_DATA_AT)
        assert f.read(4096) == facts["sparse_data"]
    assert restored[(b"special", b"chardev")].rdev == os.makedev(1, 7)
    assert restored[(b"special", b"blockdev")].rdev == os.makedev(7, 200)
    assert stat.S_IMODE(restored[(b"modes", b"setuid")].mode) == 0o4755
    assert restored[(b"owners", b"nameless")].uid == NAMELESS_UID

    # ls shows every name on one line, escaped, folders with a "/" at the end.
    listing = cluster.sdbackup("ls", snapshot, cwd=tmp_path).stdout.splitlines()
    lines = {line.removeprefix("/") for line in listing}
    assert len(lines) == len(listing) == len(expected), f"{len(listing)} lines for {len(expected)} entries"
    for parts, entry in expected.items():
        path = "/".join(escape(p) for p in (b"src", *parts))
        if entry.kind == "dir":
            assert path + "/" in lines, path
        elif entry.kind == "symlink":
            assert f"{path} -> {escape(entry.target)}" in lines, path
        else:
            assert path in lines, path
    assert "src/names/new\\nline" in lines and "src/names/back\\\\slash" in lines
    assert "src/names/bad\\xffbyte" in lines
    long = cluster.sdbackup("ls", "-l", snapshot, "src/owners", cwd=tmp_path).stdout
    owners = {line.rsplit("/", 1)[-1].split(" -> ")[0]: line for line in long.splitlines()}
    assert " daemon " in owners["daemon"] and f" {NAMELESS_UID} " in owners["nameless"], long
