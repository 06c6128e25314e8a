"""Writing a snapshot's entries into a folder, one name at a time, relative to folder descriptors.

This module owns the restore's side effects on the file system and nothing
else: it is given nodes and already verified chunk bytes and never talks to
the cluster, so tests drive it with real files and no servers. Its calls block
(the restore runs them in threads).

Safety comes from how every entry is reached, not from checking paths: a
folder is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the descriptor
of the folder that holds it, and everything else is created by a single name
(checked: no ``/``, not ``.`` or ``..``) relative to its folder's descriptor.
A link a snapshot holds is created as a link and never followed, so no entry
can land outside the target, and paths of any length restore (no call ever
sees more than one name).

Files are written nameless (``O_TMPFILE``; where the file system cannot, under
a short temporary name, ``.sdbackup-<pid>-<n>.tmp``, that fits any folder,
whatever the length of the real name), runs of zero blocks are not written
(the file stays sparse), the whole-file hash is checked, the metadata set,
and only then is the file linked (or renamed) to its name: a restore never
leaves a partial file under a real name, and the temporary names a killed one
left are removed by the next restore that enters their folder. Metadata goes on after the content
and in this order: owner (root only; by name where that name exists here),
extended attributes, mode (after chown, which clears setuid; after the ACL,
whose mask it sets; setuid and setgid only as root, else dropped with a note),
then times to the nanosecond. Folders get theirs when
everything inside them is done, since writing in a folder changes its mtime.

A folder that was already there is surveyed when it is opened (one ``lstat``
of each entry, never following links), so the restore can leave what is
unchanged (``--overwrite``) and remove what the snapshot does not hold
(``--delete``): removal too goes one name at a time relative to folder
descriptors, so it never follows a link out of the target. A dry run opens
existing folders to survey them and creates, writes and removes nothing.
"""

import contextlib
import ctypes
import errno
import grp
import itertools
import os
import pwd
import re
import resource
import stat

import attrs
import blake3

from sdbackup.client.overwrite import Existing
from sdbackup.names import escape
from sdbackup.objects import Node
from sdbackup.paths import UnsafePath, check_name, display_path

#: Zero runs are skipped in blocks of this size, aligned to the file's offsets.
SPARSE_BLOCK = 4096
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
#: Zeros hashed at once for a chunk known to be all zeros.
_ZEROS = bytes(4 * 1024 * 1024)

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_SET_ID = stat.S_ISUID | stat.S_ISGID
_TMPFILE_FLAGS = os.O_WRONLY | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: setxattr failures that mean "this file system or process cannot keep that attribute".
_XATTR_REFUSED = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL,
                  errno.E2BIG, errno.ERANGE, errno.ENOSPC, errno.EDQUOT}


class RestoreError(Exception):
    """One entry could not be restored; the message says why, the rest goes on."""


@attrs.define(eq=False)
class Folder:
    """A folder of the restore, open as a descriptor (``fd`` is None once closed).

    ``path`` is its names from the target, used for messages and to open it
    again (one name at a time) when a hard link needs it after it was closed.
    ``existing`` is what the folder held before the restore (name -> ``Existing``),
    when the writer surveys (None: not surveyed; a new folder holds nothing).
    """

    fd: int | None
    path: tuple
    node: Node | None = None
    existing: dict | None = None

    def display(self, name: bytes | None = None) -> str:
        return display_path(self.path + ((name,) if name is not None else ())) or "."


def nonzero_runs(data, offset: int, block: int = SPARSE_BLOCK) -> list[tuple[int, int]]:
    """The ``(start, end)`` ranges of ``data`` to write: all but its all-zero blocks.

    Blocks are aligned to the file (``data`` starts at ``offset``), so skipped
    blocks are whole blocks of the file and stay unallocated. ``[]`` means the
    data is all zeros.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()  # comparing bytes is a memcmp; comparing memoryviews is not
    size = len(data)
    zero = _ZERO_BLOCK if block == SPARSE_BLOCK else bytes(block)
    if data.find(zero) < 0:
        # No zero run as long as a block: no aligned zero block either.
        return [(0, size)] if size else []
    runs: list[tuple[int, int]] = []
    start = None
    edge = (-offset) % block or block
    begin = 0
    while begin < size:
        end = min(edge, size)
        piece = data[begin:end]
        is_zero = piece == zero if end - begin == block else piece == bytes(end - begin)
        if is_zero:
            if start is not None:
                runs.append((start, begin))
                start = None
        elif start is None:
            start = begin
        begin, edge = end, end + block
    if start is not None:
        runs.append((start, size))
    return runs


class Owners:
    """uid and gid for a node: by the user and group *name* where that name exists here.

    Restic does the same: a backup restored on another machine gets the owner
    of the same name there, and the number saved when no such name exists.
    """

    def __init__(self):
        self._users: dict[str, int | None] = {}
        self._groups: dict[str, int | None] = {}

    def uid(self, node: Node) -> int:
        return self._lookup(self._users, node.user, node.uid, lambda n: pwd.getpwnam(n).pw_uid)

    def gid(self, node: Node) -> int:
        return self._lookup(self._groups, node.group, node.gid, lambda n: grp.getgrnam(n).gr_gid)

    @staticmethod
    def _lookup(cache: dict, name: str, number: int, find) -> int:
        if not name:
            return number
        if name not in cache:
            try:
                cache[name] = find(name)
            except (KeyError, UnicodeError, ValueError):
                cache[name] = None
        found = cache[name]
        return number if found is None else found


class FileSystemWriter:
    """Creates a snapshot's entries under ``target``; every call works relative to a ``Folder``."""

    def __init__(self, target: str, as_root: bool | None = None, survey: bool = False,
                 dry_run: bool = False):
        #: List what existing folders hold (for ``--overwrite`` and ``--delete``).
        self.survey = survey or dry_run
        #: Create, write and remove nothing; existing folders are only opened and surveyed.
        self.dry_run = dry_run
        # The target itself may be reached through links: the user named it.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        if dry_run:
            try:
                fd = os.open(target, flags)
            except FileNotFoundError:
                fd = None  # nothing there: everything would be new
        else:
            os.makedirs(target, exist_ok=True)
            fd = os.open(target, flags)
        self.root = Folder(fd, ())
        if fd is not None and not dry_run:
            _remove_leftovers(fd)
        if self.survey:
            self.root.existing = _survey(fd) if fd is not None else {}
        self.target = target
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self.owners = Owners()
        self._pid = os.getpid()
        self._temps = itertools.count()
        #: Files are written nameless (no temporary name to create, rename and clean up).
        self._tmpfile = hasattr(os, "O_TMPFILE")

    # --- folders -----------------------------------------------------------------------

    def make_folder(self, parent: Folder, node: Node) -> Folder:
        """Create (or reuse) the folder ``node`` in ``parent`` and open it without following links
        (surveyed when it was there already). A dry run only opens a folder that exists."""
        name = _name(node)
        path = (*parent.path, name)
        existed = True
        if self.dry_run:
            if parent.fd is None or name not in (parent.existing or {}):
                return Folder(None, path, node, {})
        else:
            try:
                os.mkdir(name, 0o700, dir_fd=parent.fd)
                existed = False
            except FileExistsError:
                pass
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RestoreError(f"{parent.display(name)}: exists and is not a folder (a link or a "
                                   f"file); nothing is restored through it") from None
            raise
        existing = None
        if existed and not self.dry_run:
            _remove_leftovers(fd)
        if self.survey:
            try:
                existing = _survey(fd) if existed else {}
            except BaseException:
                os.close(fd)
                raise
        return Folder(fd, path, node, existing)

    def finish_folder(self, folder: Folder) -> list[str]:
        """Set a folder's metadata (everything inside it is done) and close it; notes."""
        notes: list[str] = []
        try:
            if folder.node is not None and not self.dry_run:
                self._metadata(folder.fd, folder.node, notes, folder)
        finally:
            self.close_folder(folder)
        return notes

    def remove_entries(self, folder: Folder, names) -> tuple[list, list]:
        """Remove ``names`` from ``folder``, a folder with everything in it (``--delete``).

        Each is reached by its name relative to its folder's descriptor, a folder opened
        with ``O_NOFOLLOW``: a link is removed, never followed. A dry run removes nothing
        and counts the same. Returns ``[(path, entries removed)]`` and the errors (text).
        """
        removed, errors = [], []
        for name in names:
            try:
                removed.append(((*folder.path, name), self._remove(folder.fd, name)))
            except OSError as e:
                errors.append(f"{folder.display(name)}: not deleted: {e.strerror or e}")
        return removed, errors

    def _remove(self, parent_fd: int, name: bytes) -> int:
        """Remove ``name`` (depth first when a folder, without recursion: trees are deep);
        the number of entries removed."""
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            if not self.dry_run:
                os.unlink(name, dir_fd=parent_fd)
            return 1
        count = 0
        # (the folder's parent descriptor, its name, its descriptor, names left in it)
        stack = [(parent_fd, name, os.open(name, _FOLDER_FLAGS, dir_fd=parent_fd), None)]
        try:
            while stack:
                up_fd, folder_name, fd, left = stack[-1]
                if left is None:
                    left = iter([os.fsencode(n) for n in os.listdir(fd)])
                    stack[-1] = (up_fd, folder_name, fd, left)
                child = next(left, None)
                if child is None:
                    stack.pop()
                    os.close(fd)
                    if not self.dry_run:
                        os.rmdir(folder_name, dir_fd=up_fd)
                    count += 1
                elif stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                    stack.append((fd, child, os.open(child, _FOLDER_FLAGS, dir_fd=fd), None))
                else:
                    if not self.dry_run:
                        os.unlink(child, dir_fd=fd)
                    count += 1
        finally:
            for _, _, fd, _ in stack:
                os.close(fd)
        return count

    def close_folder(self, folder: Folder):
        if folder.fd is not None:
            fd, folder.fd = folder.fd, None
            os.close(fd)

    # --- files -------------------------------------------------------------------------

    def open_file(self, folder: Folder, node: Node) -> "FileOut":
        """A file to write chunk by chunk, nameless (``O_TMPFILE``) or under a temporary name
        until ``finish``."""
        name = _name(node)
        if node.type != "file":
            raise RestoreError(f"{folder.display(name)}: a {node.type} has no content to write")
        if self._tmpfile:
            try:
                fd = os.open(b".", _TMPFILE_FLAGS, 0o600, dir_fd=folder.fd)
                return FileOut(self, folder, node, None, fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile = False  # this file system cannot: temporary names from now on
        while True:
            temp = self._temp_name()
            try:
                fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=folder.fd)
                break
            except FileExistsError:
                continue  # left by an earlier restore with the same pid: take the next name
        return FileOut(self, folder, node, temp, fd)

    def write_file(self, folder: Folder, node: Node, pieces) -> list[str]:
        """A whole file from its chunks' bytes in one call (small files: one thread hop)."""
        out = self.open_file(folder, node)
        try:
            for piece in pieces:
                out.write(piece)
        except BaseException:
            out.abort()
            raise
        return out.finish()

    def write_entries(self, entries) -> list:
        """Many small files (``(folder, node, pieces)``) and links, FIFOs and devices
        (``(folder, node, None)``) in one call, so a restore of many small entries makes a
        thread hop per batch, not per entry. Each entry's notes, or the error that stopped
        it: one entry's failure does not stop the others.
        """
        outcomes: list = []
        for folder, node, pieces in entries:
            try:
                if pieces is None:
                    outcomes.append(self.make_special(folder, node))
                else:
                    outcomes.append(self.write_file(folder, node, pieces))
            except Exception as e:
                outcomes.append(e)
        return outcomes

    # --- links, FIFOs, devices ----------------------------------------------------------

    def make_special(self, folder: Folder, node: Node) -> list[str]:
        """A symbolic link, FIFO or device, with its metadata; notes."""
        name = _name(node)
        fd = folder.fd
        if node.type == "symlink":
            self._place(folder, name, lambda n: os.symlink(node.target, n, dir_fd=fd))
        elif node.type == "fifo":
            self._place(folder, name, lambda n: os.mkfifo(n, 0o600, dir_fd=fd))
        elif node.type in ("chardev", "blockdev"):
            if not self.as_root:
                raise RestoreError(f"{folder.display(name)}: a {node.type} can only be made by root; "
                                   f"not restored")
            kind = stat.S_IFCHR if node.type == "chardev" else stat.S_IFBLK
            self._place(folder, name, lambda n: os.mknod(n, kind | 0o600, node.rdev, dir_fd=fd))
        else:
            raise RestoreError(f"{folder.display(name)}: a {node.type} is not made this way")
        notes: list[str] = []
        if node.type == "symlink":
            self._symlink_metadata(folder, name, node, notes)
        else:
            path_fd = os.open(name, _PATH_FLAGS, dir_fd=fd)
            try:
                self._metadata(f"/proc/self/fd/{path_fd}", node, notes, folder, name)
            finally:
                os.close(path_fd)
        return notes

    def link(self, folder: Folder, node: Node, source: Folder, source_name: bytes):
        """``node`` as a hard link to ``source_name`` in ``source`` (already restored there).

        The source folder's descriptor is used while it is open; once closed,
        it is opened again one name at a time from the target, never following
        a link, so a hard link cannot reach outside either.
        """
        name = _name(node)
        source_fd, opened = (source.fd, False) if source.fd is not None else (self._reopen(source), True)
        try:
            self._place(folder, name, lambda n: os.link(
                source_name, n, src_dir_fd=source_fd, dst_dir_fd=folder.fd, follow_symlinks=False))
        finally:
            if opened:
                os.close(source_fd)

    # --- the end ------------------------------------------------------------------------

    def sync(self):
        """Flush everything written under the target to disk (``syncfs``, else a global sync).

        Once per restore rather than an fsync per file: thousands of small files
        would otherwise wait on the disk one by one.
        """
        if self.dry_run or self.root.fd is None:
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(self.root.fd) != 0:
                os.sync()
        except (AttributeError, OSError):
            os.sync()

    def close(self):
        self.close_folder(self.root)

    # --- helpers ------------------------------------------------------------------------

    def _temp_name(self) -> bytes:
        return f".sdbackup-{self._pid}-{next(self._temps)}.tmp".encode()

    def _place(self, folder: Folder, name: bytes, create):
        """``create(name)``; when the name is taken, create under a temporary name and rename
        over it (a folder of that name is not replaced: the rename fails)."""
        try:
            create(name)
            return
        except FileExistsError:
            pass
        temp = self._temp_name()
        create(temp)
        try:
            os.rename(temp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder.fd)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise RestoreError(f"{folder.display(name)}: a folder of that name is in the way; "
                                   f"not replaced") from None
            raise

    def _reopen(self, folder: Folder) -> int:
        fd = os.dup(self.root.fd)
        try:
            for name in folder.path:
                next_fd = os.open(name, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _owner(self, node: Node) -> tuple[int, int]:
        return self.owners.uid(node), self.owners.gid(node)

    def _metadata(self, target, node: Node, notes: list, folder: Folder, name: bytes | None = None):
        """Owner, xattrs, mode, times of an open file or folder (``target`` its descriptor),
        or of a FIFO or device through ``/proc/self/fd/N`` of an ``O_PATH`` descriptor
        (opening those for real could block or touch hardware). ``folder`` and ``name`` say
        where it is, in a note (made only when there is one)."""
        mode = stat.S_IMODE(node.mode)
        if self.as_root:
            os.chown(target, *self._owner(node))
        elif mode & _SET_ID:
            # The entry belongs to whoever restores: setuid or setgid would give their rights
            # to a program from the snapshot.
            mode &= ~_SET_ID
            notes.append(f"{folder.display(name)}: setuid and setgid bits not restored (only root "
                         f"restores them)")
        for key, value in node.xattrs:
            _set_xattr(target, key, value, notes, folder, name, follow=True)
        os.chmod(target, mode)
        os.utime(target, ns=(node.atime_ns, node.mtime_ns))

    def _symlink_metadata(self, folder: Folder, name: bytes, node: Node, notes: list):
        """A link's own owner, xattrs and times (Linux links have no mode)."""
        if self.as_root:
            os.chown(name, *self._owner(node), dir_fd=folder.fd, follow_symlinks=False)
        if node.xattrs:
            path = f"/proc/self/fd/{folder.fd}/".encode() + name
            for key, value in node.xattrs:
                _set_xattr(path, key, value, notes, folder, name, follow=False)
        os.utime(name, ns=(node.atime_ns, node.mtime_ns), dir_fd=folder.fd, follow_symlinks=False)


class FileOut:
    """A file being restored: sequential writes that skip zero blocks, then ``finish``."""

    def __init__(self, writer: FileSystemWriter, folder: Folder, node: Node, temp: bytes | None,
                 fd: int):
        self.writer = writer
        self.folder = folder
        self.node = node
        self.temp = temp
        self.fd: int | None = fd
        self.offset = 0
        #: The end of the last bytes written: short of ``offset`` when zeros ended the file.
        self.written_to = 0
        self.hasher = blake3.blake3()

    def write(self, data) -> bool:
        """Append ``data`` (hashed whole, written but for its zero blocks); True if all zeros."""
        self.hasher.update(data)
        runs = nonzero_runs(data, self.offset)
        view = memoryview(data)
        for start, end in runs:
            _pwrite_all(self.fd, view[start:end], self.offset + start)
        if runs:
            self.written_to = self.offset + runs[-1][1]
        self.offset += len(data)
        return not runs

    def write_zeros(self, size: int):
        """Append ``size`` zero bytes without writing them (a chunk known to be all zeros)."""
        left = size
        while left:
            step = min(left, len(_ZEROS))
            self.hasher.update(memoryview(_ZEROS)[:step])
            left -= step
        self.offset += size

    def finish(self) -> list[str]:
        """Check size and hash, set the metadata, rename into place; notes.

        A mismatch removes the temporary file and raises: nothing wrong ever
        lands under the real name.
        """
        node = self.node
        notes: list[str] = []
        try:
            if self.offset != node.size:
                raise RestoreError(f"{self.folder.display(node.name)}: restored {self.offset} "
                                   f"bytes, the snapshot says {node.size}; not written")
            if node.hash and self.hasher.digest() != node.hash:
                raise RestoreError(f"{self.folder.display(node.name)}: restored bytes do not match "
                                   f"the file's hash; not written")
            if self.written_to != node.size:
                os.ftruncate(self.fd, node.size)  # the skipped zeros at the end
            self.writer._metadata(self.fd, node, notes, self.folder, node.name)
            if self.temp is None:  # nameless: link it in by its descriptor
                self.writer._place(self.folder, node.name, lambda n: os.link(
                    f"/proc/self/fd/{self.fd}", n, dst_dir_fd=self.folder.fd, follow_symlinks=True))
            fd, self.fd = self.fd, None
            os.close(fd)
            if self.temp is not None:
                self.writer._place(self.folder, node.name, lambda n: os.rename(
                    self.temp, n, src_dir_fd=self.folder.fd, dst_dir_fd=self.folder.fd))
        except BaseException:
            self.abort()
            raise
        return notes

    def abort(self):
        """Close and remove the temporary file (a nameless one goes with its descriptor)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.folder.fd)


#: A temporary name of a restore (``_temp_name``), with the pid of the process that made it.
_TEMP_NAME = re.compile(r"\.sdbackup-(\d+)-\d+\.tmp\Z")


def _remove_leftovers(fd: int):
    """Remove the temporary files a killed restore left in a folder (on a file system without
    ``O_TMPFILE``): those of a process that is gone; a live one's may be under way."""
    with os.scandir(fd) as entries:
        names = [e.name for e in entries if _TEMP_NAME.match(e.name)]
    for name in names:
        pid = int(_TEMP_NAME.match(name).group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(name, dir_fd=fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _survey(fd: int) -> dict:
    """What a folder holds: name -> ``Existing``, from ``lstat`` of each entry."""
    with os.scandir(fd) as entries:
        return {os.fsencode(e.name): Existing.of(e.stat(follow_symlinks=False)) for e in entries}


def _name(node: Node) -> bytes:
    try:
        return check_name(node.name)
    except UnsafePath as e:
        raise RestoreError(str(e)) from None


def _pwrite_all(fd: int, data: memoryview, offset: int):
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _set_xattr(target, key: bytes, value: bytes, notes: list, folder: Folder, name: bytes | None,
               follow: bool):
    """Set one extended attribute; one the file system or the kernel refuses becomes a note
    (the entry's path is made only then: a restore sets thousands)."""
    try:
        os.setxattr(target, key, value, follow_symlinks=follow)
    except OSError as e:
        if e.errno not in _XATTR_REFUSED:
            raise
        notes.append(f"{folder.display(name)}: extended attribute {escape(key)} not restored: "
                     f"{e.strerror}")


def raise_open_files_limit():
    """Raise the soft limit on open files to the hard one: a restore keeps a descriptor open
    per folder level it is in, and deep trees are deep."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
