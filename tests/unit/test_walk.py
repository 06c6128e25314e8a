"""The walk: every kind of entry, odd names, deep paths, xattrs, hard links, the snapshot's root."""

import errno
import os
import pwd
import socket
import stat
import struct

import pytest

from sdbackup.chunking import FileReader, read_small_files
from sdbackup.client import walk as walk_module
from sdbackup.client.session import ClientError
from sdbackup.client.walk import Enter, Entry, Leave, Release, Report, Walker, plan

ROOT = os.geteuid() == 0


def walk_all(paths, cwd=None):
    """The whole walk as nested dicts ``{"entry": Entry, "children": {name: ...}}``."""
    report = Report()
    walker = Walker(plan([str(p) for p in paths], cwd and str(cwd)), report)
    stack, root = [], None
    try:
        while events := walker.next_events():
            for event in events:
                if type(event) is Enter:
                    node = {"entry": event.entry, "children": {}}
                    if stack:
                        stack[-1]["children"][event.entry.name] = node
                    stack.append(node)
                elif type(event) is Leave:
                    root = stack.pop()
                    if event.folder is not None:
                        event.folder.release()
                elif type(event) is Release:
                    event.folder.release()
                else:
                    assert type(event) is Entry
                    stack[-1]["children"][event.name] = {"entry": event}
    finally:
        walker.close()
    assert stack == []
    return root, report


def at(root, *names):
    node = root
    for name in names:
        node = node["children"][name]
    return node


def local_parts(path) -> list[bytes]:
    return os.fsencode(os.path.abspath(path)).strip(b"/").split(b"/")


def test_a_large_folder_looked_at_ahead_gives_each_entry_its_own_metadata(tmp_path):
    """Folders with more names than a slice are lstat'ed ahead, in threads: each entry still
    gets its own type, size and inode, in name order."""
    src = tmp_path / "src"
    src.mkdir()
    count = walk_module.STAT_AHEAD + 3 * walk_module.STAT_SLICE
    for i in range(count):
        if i % 7 == 0:
            (src / f"e{i:04}").mkdir()
        elif i % 5 == 0:
            os.symlink(f"target-{i}", src / f"e{i:04}")
        else:
            (src / f"e{i:04}").write_bytes(b"x" * i)
    root, report = walk_all([src])
    children = at(root, *local_parts(src))["children"]
    assert list(children) == sorted(children) and len(children) == count
    for name, child in children.items():
        st = os.lstat(src / os.fsdecode(name))
        entry = child["entry"]
        assert (entry.st.st_ino, entry.st.st_size, entry.type) == (st.st_ino, st.st_size, {
            stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFREG: "file"}[stat.S_IFMT(st.st_mode)])
    assert report.warnings == []


def test_every_kind_of_entry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"hello")
    os.chmod(src / "file", 0o4755)
    (src / "sub").mkdir()
    os.chmod(src / "sub", 0o1777)
    os.symlink("file", src / "link")
    os.mkfifo(src / "fifo")
    os.link(src / "file", src / "hard")
    if ROOT:
        os.mknod(src / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    root, report = walk_all([src])
    folder = at(root, *local_parts(src))
    kinds = {name: child["entry"].type for name, child in folder["children"].items()}
    assert kinds == {b"file": "file", b"sub": "dir", b"link": "symlink", b"fifo": "fifo",
                     b"hard": "file", **({b"chr": "chardev", b"blk": "blockdev"} if ROOT else {})}
    file = folder["children"][b"file"]["entry"].fields
    st = os.lstat(src / "file")
    assert file["mode"] == 0o4755 and file["size"] == 5
    assert (file["mtime_ns"], file["atime_ns"], file["ctime_ns"]) == (
        st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns)
    assert (file["uid"], file["gid"], file["user"]) == (st.st_uid, st.st_gid,
                                                        pwd.getpwuid(st.st_uid).pw_name)
    # Hard links: one inode, two links, the device to tell groups apart.
    hard = folder["children"][b"hard"]["entry"].fields
    assert (hard["inode"], hard["dev"], hard["links"]) == (file["inode"], file["dev"], 2)
    assert file["dev"] == st.st_dev
    assert folder["children"][b"sub"]["entry"].fields["mode"] == 0o1777
    assert folder["children"][b"sub"]["children"] == {}
    assert folder["children"][b"link"]["entry"].fields["target"] == b"file"
    assert "dev" not in folder["children"][b"fifo"]["entry"].fields  # one link: no device
    if ROOT:
        assert folder["children"][b"chr"]["entry"].fields["rdev"] == os.makedev(1, 3)
        assert folder["children"][b"blk"]["entry"].fields["rdev"] == os.makedev(7, 0)
    assert report.warnings == [] and report.notes == []


def test_a_socket_is_skipped_with_a_note(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "keep").write_bytes(b"x")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(src / "sock"))
        root, report = walk_all([src])
    finally:
        server.close()
    assert set(at(root, *local_parts(src))["children"]) == {b"keep"}
    assert report.warnings == []
    assert len(report.notes) == 1 and "sock" in report.notes[0] and "socket" in report.notes[0]


def test_odd_names_come_back_as_the_same_bytes(tmp_path):
    odd = [b"bad \xff\xfe utf-8", b"new\nline", b"back\\slash", b"n" * 255, b"tab\there"]
    base = os.fsencode(tmp_path / "odd")
    os.mkdir(base)
    for i, name in enumerate(odd):
        with open(base + b"/" + name, "wb") as f:
            f.write(b"%d" % i)
    os.mkdir(base + b"/" + b"\xff folder")
    root, report = walk_all([tmp_path / "odd"])
    children = at(root, *local_parts(tmp_path / "odd"))["children"]
    assert set(children) == {*odd, b"\xff folder"}
    assert report.warnings == []


def make_deep(base: bytes, levels: int, name: bytes) -> None:
    """Folders nested past PATH_MAX, made through folder descriptors; a file at the bottom."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    leaf = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"deep down")
    os.close(leaf)
    os.close(fd)


def test_paths_deeper_than_path_max(tmp_path):
    base = tmp_path / "deep"
    base.mkdir()
    name = b"d" * 200
    make_deep(os.fsencode(base), 25, name)  # over 5,000 bytes of path
    root, report = walk_all([base])
    node = at(root, *local_parts(base))
    for _ in range(25):
        node = node["children"][name]
    leaf = node["children"][b"leaf"]["entry"]
    assert leaf.type == "file" and leaf.fields["size"] == 9
    assert len(leaf.folder.path) > 5000
    assert report.warnings == []


def posix_acl(user_id: int) -> bytes:
    """A POSIX access ACL as the kernel keeps it: rw for the owner, r for one more user."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, user_id), (0x04, 4, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_extended_attributes_and_acls_come_along_sorted(tmp_path):
    src = tmp_path / "x"
    src.mkdir()
    target = src / "file"
    target.write_bytes(b"data")
    os.setxattr(target, "user.zeta", b"last")
    os.setxattr(target, "user.alpha", b"\x00binary\xff")
    os.setxattr(src, "user.on-folder", b"yes")
    try:
        os.setxattr(target, "system.posix_acl_access", posix_acl(1234))
        acl = True
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        acl = False
    if ROOT:
        os.symlink("file", src / "link")
        os.setxattr(src / "link", "trusted.on-link", b"L", follow_symlinks=False)
    root, report = walk_all([src])
    folder = at(root, *local_parts(src))
    # A regular file's are read with its content (or taken from the parent snapshot).
    assert "xattrs" not in folder["children"][b"file"]["entry"].fields
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        [small] = read_small_files([(fd, b"file", os.lstat(target))])
        large = FileReader(fd, b"file", os.lstat(target))
        large.open()
        while large.next_pieces():
            pass
        assert large.finish().xattrs == small.xattrs
        large.close()
    finally:
        os.close(fd)
    xattrs = dict(small.xattrs)
    assert xattrs[b"user.alpha"] == b"\x00binary\xff" and xattrs[b"user.zeta"] == b"last"
    names = [n for n, _ in small.xattrs]
    assert names == sorted(names)
    if acl:
        assert xattrs[b"system.posix_acl_access"] == posix_acl(1234)
    assert dict(folder["entry"].fields["xattrs"])[b"user.on-folder"] == b"yes"
    if ROOT:
        assert folder["children"][b"link"]["entry"].fields["xattrs"] == ((b"trusted.on-link", b"L"),)
    assert report.warnings == []


def as_unprivileged_user(f):
    """``f()`` in a child process that, when this one is root, runs as ``nobody`` (root reads
    every folder, so a permission error needs another user); its result comes back pickled."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read)
            if ROOT:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            result = pickle.dumps(f())
        except BaseException as e:
            result, status = pickle.dumps(repr(e)), 1
        with os.fdopen(write, "wb") as out:
            out.write(result)
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as incoming:
        result = pickle.loads(incoming.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def test_an_unreadable_folder_is_skipped_with_a_warning():
    import shutil
    import tempfile

    # Under a folder every user may enter: the walk runs as nobody.
    base = tempfile.mkdtemp(prefix="sdbackup-walk-")
    try:
        os.chmod(base, 0o755)
        src = os.path.join(base, "u")
        for name in ("closed", "open"):
            os.makedirs(os.path.join(src, name))
        os.chmod(os.path.join(src, "closed"), 0)

        def walk():
            root, report = walk_all([src])
            return set(at(root, *local_parts(src))["children"]), report.warnings

        children, warnings = as_unprivileged_user(walk)
    finally:
        os.chmod(os.path.join(base, "u", "closed"), 0o755)
        shutil.rmtree(base)
    assert children == {b"open"}
    assert len(warnings) == 1 and "closed" in warnings[0]


def test_the_root_leads_to_every_path_through_real_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"1")
    (tmp_path / "a" / "other").write_bytes(b"not backed up")
    (tmp_path / "docs").mkdir()
    os.chmod(tmp_path / "a", 0o750)
    root, report = walk_all(["a/b", "docs", str(tmp_path / "docs" / ".." / "a" / "b" / "f")],
                            cwd=tmp_path)
    assert root["entry"] is None
    assert set(root["children"]) == {b"a", b"docs", local_parts(tmp_path)[0]}
    a = at(root, b"a")
    # The folder above a backed-up path: the real folder's metadata, only the path inside.
    assert a["entry"].type == "dir" and a["entry"].fields["mode"] == 0o750
    assert a["entry"].fields["mtime_ns"] == os.stat(tmp_path / "a").st_mtime_ns
    assert set(a["children"]) == {b"b"}
    assert set(at(root, b"a", b"b")["children"]) == {b"f"}
    # An absolute path keeps its full name, without the leading slash.
    assert at(root, *local_parts(tmp_path / "a" / "b" / "f"))["entry"].type == "file"
    assert report.warnings == []


def test_plan_names_each_path_once_and_drops_paths_inside_others(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    found = plan(["a", "a/b", "a/", "./a"], str(tmp_path))
    assert found.paths == (b"a", b"a/b")  # as given, each once
    assert list(found.root.children) == [b"a"]  # a/b is inside a: walked once
    root, _ = walk_all(["a", "a/b"], cwd=tmp_path)
    assert set(at(root, b"a")["children"]) == {b"b"}


def test_plan_refuses_missing_paths_and_two_folders_with_one_name(tmp_path):
    with pytest.raises(ClientError, match="cannot back up nothing-here"):
        plan(["nothing-here"], str(tmp_path))
    top = local_parts(tmp_path)[0].decode()
    # From "/", the relative and the absolute path are one folder: named once.
    assert plan([top, "/" + top], "/").paths == (top.encode(),)
    # From tmp_path, a relative "tmp" and the absolute tmp_path (under /tmp) would give two
    # different folders one name in the snapshot.
    (tmp_path / top).mkdir()
    with pytest.raises(ClientError, match="is also named"):
        plan([top, str(tmp_path)], str(tmp_path))
