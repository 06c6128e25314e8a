"""Walk: the file system read into entries, one folder descriptor at a time.

The first stage of a backup (walk -> tree builder -> chunker -> packer ->
store). ``plan`` turns the paths to back up into the root of the snapshot:
the folders that lead to each path (``/usr/share`` and ``docs`` give a root
holding ``usr`` -> ``share`` and ``docs``), each taking the metadata of the
real folder, as restic does. ``Walker`` then reads the folders depth-first
and yields *events*: ``Enter`` a folder, its ``Entry`` objects, ``Leave`` it.

Every folder is opened relative to the one holding it (``O_NOFOLLOW``, so a
link swapped in is never followed) and every entry is looked at relative to
its folder's descriptor, never through a full path: paths deeper than
``PATH_MAX`` work, and names are bytes (any bytes but ``/`` and NUL). Folders
and files are opened with ``O_NOATIME`` where the kernel allows it, so
backing a folder up does not change it and an unchanged folder keeps its tree
id.

The walker blocks (``lstat``, ``listdir``, extended attributes): the tree
builder calls ``next_events`` in a thread, which returns many events per call,
so a thread hop is paid per thousand entries, not per entry. Memory holds
the names of the open folders only.

What the backup leaves out (``selection.BackupSelection``: exclude patterns,
tag files such as ``CACHEDIR.TAG``, other file systems) is dropped from each
folder's names as the folder is listed, so an excluded folder is never opened.
"""

import errno
import grp
import os
import posixpath
import pwd
import stat
from concurrent.futures import ThreadPoolExecutor

import attrs

from sdbackup.client.selection import BackupSelection
from sdbackup.client.session import ClientError
from sdbackup.names import escape
from sdbackup.paths import UnsafePath, snapshot_path

#: Names of a folder looked at (lstat) ahead of the walk, in slices of STAT_SLICE names
#: spread over STAT_THREADS threads.
STAT_AHEAD = 512
STAT_SLICE = 32
STAT_THREADS = 4
#: Events one ``next_events`` call returns at most, and folders it opens at most.
WALK_EVENTS = 2000
WALK_FOLDERS = 64

NOATIME = getattr(os, "O_NOATIME", 0)
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The folders above a backed-up path are only looked through, never listed.
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

#: Extended attribute errors that mean "none that we may read", not a problem.
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.ENODATA}

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
}


def open_at(name, flags: int, dir_fd: int | None = None) -> int:
    """``os.open`` with ``O_NOATIME``, or without it where the kernel refuses (not our file)."""
    try:
        return os.open(name, flags | NOATIME, dir_fd=dir_fd)
    except PermissionError as e:
        if e.errno != errno.EPERM or not NOATIME:
            raise
    return os.open(name, flags, dir_fd=dir_fd)


class Report:
    """What a backup tells the user besides its result: warnings (exit 3) and notes."""

    def __init__(self):
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def warn(self, text: str):
        self.warnings.append(text)

    def note(self, text: str):
        self.notes.append(text)


class Owners:
    """User and group names by number, looked up once each ("" when there is none)."""

    def __init__(self):
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        return _name_of(self._users, uid, lambda: pwd.getpwuid(uid).pw_name)

    def group(self, gid: int) -> str:
        return _name_of(self._groups, gid, lambda: grp.getgrgid(gid).gr_name)


def _name_of(known: dict, number: int, look_up) -> str:
    name = known.get(number)
    if name is None:
        try:
            name = look_up()
        except KeyError:
            name = ""
        known[number] = name
    return name


class Folder:
    """An open folder descriptor that entries are opened relative to.

    The walker holds it until it has listed the folder; the tree builder holds
    it again for each file still to be read, and closes it when the last one
    lets go (``release`` runs on the reactor only).
    """

    __slots__ = ("_open", "fd", "local", "path", "users")

    def __init__(self, fd: int, path: bytes, open_set: set, local: str = ""):
        self.fd = fd
        self.path = path  # for messages: the path as the user named it
        self.local = local  # its absolute path as exclude patterns see it, without a final /
        self.users = 1
        self._open = open_set
        open_set.add(self)

    def hold(self):
        self.users += 1

    def release(self):
        self.users -= 1
        if self.users == 0:
            self.close()

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._open.discard(self)


class Entry:
    """One entry of a folder as ``lstat`` saw it: everything its Node needs but a file's
    content (``fields`` are ``objects.Node`` arguments)."""

    __slots__ = ("fields", "folder", "name", "st", "type")

    def __init__(self, name: bytes, kind: str, st: os.stat_result, fields: dict, folder: Folder):
        self.name = name
        self.type = kind
        self.st = st
        self.fields = fields
        self.folder = folder

    @property
    def path(self) -> str:
        """The entry's path for messages, escaped."""
        return escape(posixpath.join(self.folder.path, self.name))


class Enter:
    """A folder of the snapshot begins (``entry`` None: the root). Its entries follow."""

    __slots__ = ("entry", "folder")

    def __init__(self, entry: Entry | None, folder: Folder | None):
        self.entry = entry
        self.folder = folder


class Leave:
    """The folder last entered ends; the walker lets go of its descriptor."""

    __slots__ = ("folder",)

    def __init__(self, folder: Folder | None):
        self.folder = folder


class Release:
    """The walker lets go of a folder it only looked a backed-up path up in."""

    __slots__ = ("folder",)

    def __init__(self, folder: Folder):
        self.folder = folder


# --- the root of the snapshot ------------------------------------------------------------


@attrs.define
class PlanFolder:
    """A folder of the snapshot above the backed-up paths (the root has no ``local``)."""

    local: str
    display: bytes
    children: dict = attrs.Factory(dict)  # name -> PlanFolder | PlanPath


@attrs.define
class PlanPath:
    """A path given to back up, walked whole."""

    local: str
    display: bytes


@attrs.define
class Plan:
    root: PlanFolder
    #: Each path as the snapshot names it, in the order given, once each.
    paths: tuple


def plan(paths: list[str], cwd: str | None = None) -> Plan:
    """The snapshot's root for ``paths``; a path that cannot be backed up is a ClientError."""
    cwd = cwd or os.getcwd()
    root = PlanFolder("", b"")
    names: dict[bytes, None] = {}
    for text in paths:
        try:
            name = os.fsencode(snapshot_path(text, cwd))
        except UnsafePath as e:
            raise ClientError(f"cannot back up {text}: {e}") from None
        local = os.path.abspath(os.path.join(cwd, text))
        try:
            os.lstat(local)
        except OSError as e:
            raise ClientError(f"cannot back up {text}: {e.strerror}") from e
        names[name] = None
        parts = name.split(b"/")
        # The folders above the path, outermost first: /usr for usr/share.
        locals_ = [local]
        for _ in parts[1:]:
            locals_.append(os.path.dirname(locals_[-1]))
        locals_.reverse()
        absolute = os.fsencode(local).lstrip(b"/") == name
        here = root
        for i, part in enumerate(parts):
            display = (b"/" if absolute else b"") + b"/".join(parts[: i + 1])
            last = i == len(parts) - 1
            found = here.children.get(part)
            if found is not None and found.local != locals_[i]:
                raise ClientError(f"cannot back up {text}: {found.local} is also named "
                                  f"{escape(display.lstrip(b'/'))} in the snapshot")
            if isinstance(found, PlanPath):
                break  # inside a path backed up whole already
            if last:
                here.children[part] = PlanPath(locals_[i], display)
                break
            if found is None:
                found = here.children[part] = PlanFolder(locals_[i], display)
            here = found
    return Plan(root, tuple(names))


# --- walking --------------------------------------------------------------------------------


class _Frame:
    """A folder being walked: the names still to look at, and the next ones' lstat results
    (or the OSError of each), looked at ahead."""

    __slots__ = ("dev", "folder", "index", "names", "plan", "snapshot_folder", "stats")

    def __init__(self, folder, names, plan=None, snapshot_folder=True, dev=None):
        self.folder = folder
        self.names = names
        self.index = 0
        self.plan = plan
        self.snapshot_folder = snapshot_folder
        #: The device of the backed-up path it is in (None above the backed-up paths).
        self.dev = dev
        self.stats: dict = {}


def _lstat_all(dir_fd: int, names: list) -> list:
    found = []
    for name in names:
        try:
            found.append(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        except OSError as e:
            found.append(e)
    return found


class Walker:
    """Depth-first events for a ``Plan``; ``next_events`` blocks (call it in a thread)."""

    def __init__(self, plan: Plan, report: Report, owners: Owners | None = None,
                 selection: BackupSelection | None = None):
        self.plan = plan
        self.report = report
        self.owners = owners or Owners()
        self.selection = selection or BackupSelection()
        self._stack: list[_Frame] = []
        self._started = False
        #: Folders opened and not closed yet: ``close`` closes them after a failure.
        self._open: set[Folder] = set()
        self._stat_pool: ThreadPoolExecutor | None = None

    def next_events(self) -> list:
        """The next events, in order; ``[]`` once the walk is over."""
        events: list = []
        if not self._started:
            self._started = True
            events.append(Enter(None, None))
            root = self.plan.root
            self._stack.append(_Frame(None, sorted(root.children), root))
        opened = 0
        while self._stack and len(events) < WALK_EVENTS and opened < WALK_FOLDERS:
            frame = self._stack[-1]
            if frame.index == len(frame.names):
                self._stack.pop()
                events.append(Leave(frame.folder) if frame.snapshot_folder else Release(frame.folder))
                continue
            name = frame.names[frame.index]
            frame.index += 1
            if frame.plan is not None:
                opened += self._visit_planned(frame, name, events)
            else:
                opened += self._visit(frame.folder, name, events, self._lstat(frame, name), frame.dev)
        return events

    def close(self):
        """Close every folder still open (after the walk, or when the backup failed)."""
        for folder in list(self._open):
            folder.close()
        self._stack.clear()
        if self._stat_pool is not None:
            self._stat_pool.shutdown()
            self._stat_pool = None

    def _lstat(self, frame: _Frame, name: bytes):
        """``name``'s lstat result (or OSError), the next ``STAT_AHEAD`` names of its folder
        looked at together in ``STAT_THREADS`` threads: with the inodes not in memory, the
        disk is asked for several at once rather than one after the other (measured on
        50,000 files, cold: the lstat calls were half of the walk's time)."""
        found = frame.stats.pop(name, None)
        if found is not None:
            return found
        start = frame.index - 1
        ahead = frame.names[start : start + STAT_AHEAD]
        if len(ahead) < 2 * STAT_SLICE:
            return _lstat_all(frame.folder.fd, [name])[0]
        if self._stat_pool is None:
            self._stat_pool = ThreadPoolExecutor(STAT_THREADS, "sdbackup-lstat")
        slices = [ahead[i : i + STAT_SLICE] for i in range(0, len(ahead), STAT_SLICE)]
        fd = frame.folder.fd
        results = self._stat_pool.map(lambda names: _lstat_all(fd, names), slices)
        frame.stats = dict(zip(ahead, (r for part in results for r in part), strict=True))
        return frame.stats.pop(name)

    # --- one entry ---------------------------------------------------------------

    def _visit(self, folder: Folder, name: bytes, events: list, st=None, dev=None) -> int:
        """Look at ``name`` in ``folder`` (``st``: its lstat result or OSError, if known; ``dev``:
        the device of the backed-up path it is in, None for a backed-up path itself); the
        number of folders opened (0 or 1)."""
        if st is None:
            st = _lstat_all(folder.fd, [name])[0]
        if isinstance(st, OSError):
            self.report.warn(f"cannot read {escape(posixpath.join(folder.path, name))}: {st.strerror}")
            return 0
        if (dev is not None and st.st_dev != dev and self.selection.one_file_system
                and not stat.S_ISDIR(st.st_mode)):
            return 0  # a file mounted over another (a folder is kept, empty: a mount point)
        entry = self._entry(folder, name, st)
        if entry is None:
            return 0
        if entry.type != "dir":
            events.append(entry)
            return 0
        return self._enter(entry, events, st.st_dev if dev is None else dev)

    def _enter(self, entry: Entry, events: list, dev: int) -> int:
        """Open and list the folder ``entry``; it is skipped with a warning if it cannot be."""
        path = posixpath.join(entry.folder.path, entry.name)
        try:
            fd = open_at(entry.name, FOLDER_FLAGS, dir_fd=entry.folder.fd)
        except OSError as e:
            self.report.warn(f"cannot read folder {escape(path)}: {e.strerror}")
            return 0
        folder = Folder(fd, path, self._open, f"{entry.folder.local}/{os.fsdecode(entry.name)}")
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        except OSError as e:
            folder.close()
            self.report.warn(f"cannot list folder {escape(path)}: {e.strerror}")
            return 1
        names = self._selected(folder, names, entry.st.st_dev != dev)
        events.append(Enter(entry, folder))
        self._stack.append(_Frame(folder, names, dev=dev))
        return 1

    def _selected(self, folder: Folder, names: list, other_device: bool) -> list:
        """The names of ``folder`` the backup takes: none in a mount point (with
        ``one_file_system``), the tag files alone in a folder they tag, else those no
        exclude pattern matches."""
        selection = self.selection
        if other_device and selection.one_file_system:
            return []
        if selection.tag_files:
            present = set(names)
            tags = [name for name, header in selection.tag_files
                    if name in present and _has_header(folder.fd, name, header)]
            if tags:
                return sorted(set(tags))
        excludes = selection.excludes
        if excludes:
            local = folder.local
            names = [name for name in names if not excludes.excluded_in(local, os.fsdecode(name))]
        return names

    def _visit_planned(self, frame: _Frame, name: bytes, events: list) -> int:
        """A folder above the backed-up paths, or one of the paths."""
        child = frame.plan.children[name]
        folder = frame.folder
        opened = 0
        if folder is None:
            # Top level: look the child up in its real parent folder, held until it is done.
            above = os.path.dirname(child.local)
            folder = self._open_path(above, None, posixpath.dirname(child.display), above)
            self._stack.append(_Frame(folder, [], snapshot_folder=False))
            opened = 1
        if isinstance(child, PlanPath):
            excludes = self.selection.excludes
            if excludes and excludes.excluded(child.local):
                return opened
            return opened + self._visit(folder, name, events)
        # A folder that leads to a backed-up path: the real folder's metadata, links followed.
        inner = self._open_path(name, folder.fd, child.display, child.local)
        st = os.fstat(inner.fd)
        entry = self._entry(folder, name, st, xattrs_of=f"/proc/self/fd/{inner.fd}".encode(),
                            follow=True)
        events.append(Enter(entry, inner))
        self._stack.append(_Frame(inner, sorted(child.children), child))
        return opened + 1

    def _open_path(self, name, dir_fd: int | None, display: bytes, local: str) -> Folder:
        try:
            return Folder(os.open(name, PATH_FLAGS, dir_fd=dir_fd), display, self._open,
                          local.rstrip("/"))
        except OSError as e:
            raise ClientError(f"cannot back up {escape(display)}: {e.strerror}") from e

    def _entry(self, folder: Folder, name: bytes, st: os.stat_result, xattrs_of: bytes = b"",
               follow: bool = False) -> Entry | None:
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            what = "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file, folder, link or device"
            self.report.note(f"skipped {escape(posixpath.join(folder.path, name))}: {what}")
            return None
        owners = self.owners
        fields = {
            "name": name, "type": kind, "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid, "gid": st.st_gid,
            "user": owners.user(st.st_uid), "group": owners.group(st.st_gid),
            "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "links": st.st_nlink,
        }
        if kind == "file":
            fields["size"] = st.st_size
        if kind != "dir" and st.st_nlink > 1:
            # The device only for hard links: it tells link groups apart, and a device number
            # that changes after a reboot must not change every tree.
            fields["dev"] = st.st_dev
        if kind in ("chardev", "blockdev"):
            fields["rdev"] = st.st_rdev
        try:
            if kind == "symlink":
                fields["target"] = os.readlink(name, dir_fd=folder.fd)
            # A regular file's are read with its content, or taken from the parent snapshot.
            xattrs = () if kind == "file" else read_xattrs(
                xattrs_of or b"/proc/self/fd/%d/%s" % (folder.fd, name), follow)
        except OSError as e:
            self.report.warn(f"cannot read {escape(posixpath.join(folder.path, name))}: {e.strerror}")
            return None
        if xattrs:
            fields["xattrs"] = xattrs
        return Entry(name, kind, st, fields, folder)


def _has_header(dir_fd: int, name: bytes, header: bytes) -> bool:
    """True when ``name`` in the folder is a tag file: a regular file that begins with
    ``header`` (any entry of that name, when ``header`` is empty)."""
    if not header:
        return True
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(header), 0) == header
    except OSError:
        return False
    finally:
        os.close(fd)


def read_xattrs(path: bytes | int, follow: bool = False) -> tuple:
    """Every extended attribute we may read, ``((name, value), ...)`` sorted by name.

    ``/proc/self/fd/<folder>/<name>`` reaches an entry through its folder's
    descriptor (whatever the depth), without following the entry if it is a link.
    ``path`` may be an open file's descriptor (then ``follow`` must be True).
    """
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return ()
        raise
    pairs = []
    for attribute in names:
        try:
            value = os.getxattr(path, attribute, follow_symlinks=follow)
        except OSError as e:
            if e.errno in _NO_XATTRS:
                continue
            raise
        pairs.append((os.fsencode(attribute), value))
    pairs.sort()
    return tuple(pairs)
