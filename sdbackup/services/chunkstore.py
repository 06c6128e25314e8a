"""A storage server's chunk files on disk.

Layout under the data folder::

    identity              this folder's random identity (32 hex digits), made on first start
    incoming/             chunks being written (a crash leaves only these)
    chunks/ab/abcdef...   data chunks, tree and chunk list objects, sharded by the id's first byte
    snapshots/abcdef...   snapshot objects: a server lists them without opening any chunk
    quarantine/           copies that failed verification, kept for inspection

A chunk file is ``MAGIC | kind (1 byte) | checksum (32 bytes) | payload``: the
checksum of the bytes held travels with them, so a server can verify a chunk
without asking anyone, even once chunk ids are keyed hashes that it cannot
recompute. The kind says what the payload is (``sdbackup.objects.Kind``); an
object's payload is an envelope of that kind, checked before it is stored.

Every method here blocks: the storage service calls them in a thread pool.
"""

import ctypes
import fcntl
import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterator

from sdbackup import hashing, objects
from sdbackup.objects import Kind

MAGIC = b"SDBCHNK2"
#: Kind codes a single flipped bit can never turn into one another (pairwise two bits apart),
#: so a damaged kind byte reads as a damaged header, not as another kind.
KIND_CODES = {Kind.DATA: 0x00, Kind.TREE: 0x03, Kind.LIST: 0x05, Kind.SNAPSHOT: 0x06,
              Kind.KEY: 0x09}
#: Kinds kept in ``snapshots/``: the roots an inventory names without opening a chunk (key
#: objects, found by the manager's indexer as snapshots are).
ROOT_KINDS = (Kind.SNAPSHOT, Kind.KEY)
_KIND_NAMES = {code: kind for kind, code in KIND_CODES.items()}
HEADER_SIZE = len(MAGIC) + 1 + hashing.DIGEST_SIZE
#: Fewer new chunks than this in one store are fsynced one by one; more, with one syncfs.
SYNC_EACH_BELOW = 4
_LIBC = ctypes.CDLL(None, use_errno=True)


class ChunkStoreError(Exception):
    code = "store-error"


class InvalidChunkId(ChunkStoreError):
    code = "invalid-chunk-id"


class ChecksumMismatch(ChunkStoreError):
    code = "checksum-mismatch"


class BadObject(ChunkStoreError):
    """An object whose bytes are not an envelope of the kind it was sent as."""

    code = "bad-object"


class KindConflict(ChunkStoreError):
    """An id already held here as another kind."""

    code = "kind-conflict"


class FolderInUse(ChunkStoreError):
    """Another process holds the data folder."""

    code = "folder-in-use"


def lock_folder(root: str):
    """Hold ``root/lock`` for as long as the returned file is open.

    Two servers on one folder would be counted by the manager as two copies of
    every chunk on one disk, and each would clear the other's ``incoming/``.
    """
    os.makedirs(root, exist_ok=True)
    lock = open(os.path.join(root, "lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(32).strip() or "?"
        lock.close()
        raise FolderInUse(f"the data folder {root} is in use by another sdbackup-server "
                          f"(pid {holder})") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class DiskFull(ChunkStoreError):
    """A store refused: it would leave less free space than the server's reserve."""

    code = "disk-full"


#: The identity file of a data folder, and the length of the identity (hex digits).
IDENTITY_FILE = "identity"
IDENTITY_LENGTH = 32


def folder_identity(root: str) -> str:
    """The data folder's identity, made (random, written durably) the first time.

    The manager counts copies per identity, not per address: a folder copied, or
    moved to a server at another address, is the same disk and never a second copy.
    """
    path = os.path.join(root, IDENTITY_FILE)
    try:
        with open(path) as f:
            identity = f.read(IDENTITY_LENGTH + 2).strip()
    except FileNotFoundError:
        identity = ""
    if len(identity) == IDENTITY_LENGTH and all(c in "0123456789abcdef" for c in identity):
        return identity
    if identity:
        raise ChunkStoreError(f"{path} is damaged (not {IDENTITY_LENGTH} hex digits): move it "
                              f"aside to give the folder a new identity")
    identity = uuid.uuid4().hex
    temp = f"{path}.{uuid.uuid4().hex}"
    with open(temp, "w") as f:
        f.write(identity + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_dir(root)
    return identity


class ChunkMissing(ChunkStoreError):
    code = "chunk-missing"


class ChunkCorrupt(ChunkStoreError):
    code = "chunk-corrupt"


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fully(fd: int, parts: list):
    """Write ``parts`` in order, in one system call unless the kernel takes less."""
    written = os.writev(fd, parts)
    rest = memoryview(b"".join(parts))[written:] if written < sum(map(len, parts)) else b""
    while rest:
        rest = rest[os.write(fd, rest):]


def _sync_file_system(path: str):
    """Flush every write of the file system holding ``path`` (``syncfs``; else fsync-all)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs failed: {os.strerror(error)}")
    finally:
        os.close(fd)


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


def _check_id(chunk_id: str):
    if not hashing.is_hex_digest(chunk_id):
        raise InvalidChunkId(f"not a chunk id: {chunk_id!r}")


class ChunkStore:
    """Verified, durable, content-addressed chunk files in one folder."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.incoming = os.path.join(self.root, "incoming")
        self.chunks = os.path.join(self.root, "chunks")
        self.snapshots = os.path.join(self.root, "snapshots")
        self.quarantine = os.path.join(self.root, "quarantine")
        self._folder_lock = lock_folder(self.root)
        #: Which disk this is, whatever address its server has (``folder_identity``).
        self.identity = folder_identity(self.root)
        for folder in (self.root, self.incoming, self.chunks, self.snapshots, self.quarantine):
            os.makedirs(folder, exist_ok=True)
        # Anything left in incoming/ was never renamed into place: never acknowledged.
        for leftover in os.listdir(self.incoming):
            os.unlink(os.path.join(self.incoming, leftover))
        self._lock = threading.Lock()
        #: Temporary names in ``incoming/`` (emptied above, and the folder is this store's).
        self._temps = itertools.count()
        #: Bytes of free space no store may take (the server's ``--reserve``).
        self.reserve = 0
        self._count = sum(1 for _ in self.chunk_ids())

    def close(self):
        """Let another process (or a new store) take the folder."""
        self._folder_lock.close()

    # --- where chunks live ---------------------------------------------------------

    def _home(self, kind: str, chunk_id: str) -> str:
        """Where a chunk of ``kind`` is kept."""
        _check_id(chunk_id)
        if kind in ROOT_KINDS:
            return os.path.join(self.snapshots, chunk_id)
        return os.path.join(self.chunks, chunk_id[:2], chunk_id)

    def _find(self, chunk_id: str) -> str | None:
        """The file holding ``chunk_id``, whatever its kind; None when none does."""
        for kind in (Kind.DATA, Kind.SNAPSHOT):
            path = self._home(kind, chunk_id)
            if os.path.exists(path):
                return path
        return None

    def path_for(self, chunk_id: str) -> str:
        """The file of ``chunk_id`` (where a data chunk would be, when it is not held);
        refuses anything that is not a hex digest."""
        return self._find(chunk_id) or self._home(Kind.DATA, chunk_id)

    def has(self, chunk_id: str) -> bool:
        return self._find(chunk_id) is not None

    # --- storing --------------------------------------------------------------------

    def put(self, kind: str, chunk_id: str, checksum: str, payload: bytes) -> bool:
        """Verify and store one chunk durably. False when it was already held."""
        return bool(self.put_many(kind, [(chunk_id, checksum, payload)]))

    def put_many(self, kind: str, chunks: list[tuple[str, str, bytes]]) -> list[tuple[str, int]]:
        """Verify every chunk of ``kind``, then store them all; ``(id, size)`` of those not
        held before.

        One bad checksum, malformed object or id held as another kind refuses the whole lot
        before anything is written.
        """
        self.verify_many(kind, chunks)
        return self.put_verified(kind, chunks)

    def verify_many(self, kind: str, chunks: list[tuple[str, str, bytes]]):
        """Refuse the lot when one chunk's checksum, object or id is not what it claims."""
        if kind not in KIND_CODES:
            raise BadObject(f"unknown chunk kind {kind!r}")
        for chunk_id, checksum, payload in chunks:
            self._check(kind, chunk_id, checksum, payload)

    def put_verified(self, kind: str, chunks: list[tuple[str, str, bytes]]) -> list[tuple[str, int]]:
        """``put_many`` of chunks ``verify_many`` passed."""
        held = set()
        for chunk_id, _, _ in chunks:
            if self._held_already(kind, chunk_id):  # (held as another kind: refuses the lot)
                held.add(chunk_id)
        new = [c for c in chunks if c[0] not in held or not self._touch(kind, c[0])]
        if new and self.reserve:
            self._check_room(sum(HEADER_SIZE + len(payload) for _, _, payload in new))
        return self._write_all(kind, new)

    def _check_room(self, size: int):
        """``DiskFull`` when writing ``size`` bytes would leave less than the reserve free."""
        free = self.free_bytes()
        if free - size < self.reserve:
            raise DiskFull(f"the disk is full: {_mib(free)} free, {_mib(self.reserve)} kept in "
                           f"reserve (--reserve), {_mib(size)} to store")

    def _check(self, kind: str, chunk_id: str, checksum: str, payload: bytes):
        _check_id(chunk_id)
        if not hashing.is_hex_digest(checksum):
            raise ChecksumMismatch(f"not a checksum: {checksum!r}")
        actual = hashing.checksum(payload)
        if actual != checksum:
            raise ChecksumMismatch(
                f"chunk {chunk_id[:16]}: received bytes hash to {actual[:16]}, "
                f"expected {checksum[:16]}"
            )
        if kind != Kind.DATA:
            try:
                objects.open_envelope(payload, kind)
            except objects.ObjectFormatError as e:
                raise BadObject(f"{kind} object {chunk_id[:16]} is not valid: {e}") from None
        # Ids are plain hashes of the bytes: a chunk stored under another id would be taken
        # by later backups for data it is not.
        if chunk_id != (actual if kind == Kind.DATA else hashing.object_id(kind, payload)):
            raise InvalidChunkId(f"{kind} {chunk_id[:16]}: the id is not the hash of the bytes")

    def _write_all(self, kind: str, chunks: list[tuple[str, str, bytes]]) -> list[tuple[str, int]]:
        """Each chunk written to ``incoming/``, the lot made durable, each renamed into place,
        and the renames made durable: a crash at any point leaves no chunk or a whole one.

        A pack of many small chunks is made durable with one ``syncfs`` before the renames and
        one after, rather than one fsync per chunk and one per folder touched (a pack's chunks
        land in as many folders as it has chunks, nearly: measured on a 50,000-file first
        backup, the folders' fsyncs took two thirds of each server's time).
        """
        written = []
        each = len(chunks) < SYNC_EACH_BELOW
        try:
            for chunk_id, checksum, payload in chunks:
                written.append((chunk_id, self._write_temp(kind, chunk_id, checksum, payload, each),
                                len(payload)))
            if not each:
                _sync_file_system(self.incoming)
        except BaseException:
            for _, temp, _ in written:
                os.unlink(temp)
            raise
        added, folders, made = [], set(), False
        for index, (chunk_id, temp, size) in enumerate(written):
            path = self._home(kind, chunk_id)
            folder = os.path.dirname(path)
            if folder not in folders and not os.path.isdir(folder):
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError:  # (a full disk has no room for a folder either)
                    for _, left, _ in written[index:]:
                        os.unlink(left)
                    raise
                made = True
            with self._lock:
                if os.path.exists(path):
                    os.unlink(temp)
                    continue
                os.replace(temp, path)
                self._count += 1
            folders.add(folder)
            added.append((chunk_id, size))
        if not added:
            return added
        if each:
            if made:
                _fsync_dir(self.chunks)
            for folder in folders:
                _fsync_dir(folder)
        else:
            _sync_file_system(self.chunks)
        return added

    def _write_temp(self, kind: str, chunk_id: str, checksum: str, payload: bytes,
                    sync: bool) -> str:
        temp = os.path.join(self.incoming, f"{chunk_id[:16]}.{next(self._temps)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_fully(fd, [MAGIC, bytes((KIND_CODES[kind],)), bytes.fromhex(checksum), payload])
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _touch(self, kind: str, chunk_id: str) -> bool:
        """Make the time of a held chunk's file now: a prune deletes no file written or stored
        again less than its grace ago (``delete_chunks``). False when it was just deleted."""
        with self._lock:  # (one with delete_chunks: a file deleted is stored again)
            try:
                os.utime(self._home(kind, chunk_id))
            except FileNotFoundError:
                return False
        return True

    def _held_already(self, kind: str, chunk_id: str) -> bool:
        """True when the chunk is held as ``kind``; ``KindConflict`` when it is held as another."""
        path = self._find(chunk_id)
        if path is None:
            return False
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 1)
        except FileNotFoundError:
            return False  # quarantined meanwhile
        held = _KIND_NAMES.get(head[-1]) if len(head) == len(MAGIC) + 1 else None
        if head.startswith(MAGIC) and held is not None and held != kind:
            raise KindConflict(f"chunk {chunk_id[:16]} is held here as {held}, not {kind}")
        return True  # a damaged copy is found bad by the next read or scrub, then stored again

    # --- reading ---------------------------------------------------------------------

    def get(self, chunk_id: str) -> tuple[str, str, bytes]:
        """The kind, checksum and payload of a chunk, verified; a bad copy is quarantined."""
        path = self._find(chunk_id)
        if path is None:
            raise ChunkMissing(f"chunk {chunk_id[:16]} is not held here")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk_id[:16]} is not held here") from None
        kind, checksum = self._verify(path, chunk_id, data)
        return kind, checksum, data[HEADER_SIZE:]

    def get_many(self, chunk_ids: list[str], max_bytes: int) -> list[tuple[str, object]]:
        """``(chunk_id, (kind, checksum, payload) or ChunkMissing or ChunkCorrupt)`` for the
        first of ``chunk_ids`` whose payloads fit in ``max_bytes`` (at least one), in order.

        One call reads many small chunks: a restore's thousands of small files
        cost a thread hop per batch, not per chunk. Bad copies are quarantined.
        """
        found: list[tuple[str, object]] = []
        total = 0
        for chunk_id in chunk_ids:
            opened = None
            for kind in (Kind.DATA, Kind.SNAPSHOT):  # no stat first: the open is the check
                path = self._home(kind, chunk_id)
                try:
                    opened = open(path, "rb")  # closed by the with below
                    break
                except FileNotFoundError:
                    continue
            if opened is None:
                found.append((chunk_id, ChunkMissing(f"chunk {chunk_id[:16]} is not held here")))
                continue
            with opened as f:
                size = max(os.fstat(f.fileno()).st_size - HEADER_SIZE, 0)
                if total and total + size > max_bytes:
                    break
                data = f.read()
            try:
                kind, checksum = self._verify(path, chunk_id, data)
            except ChunkCorrupt as e:
                found.append((chunk_id, e))
                continue
            total += len(data) - HEADER_SIZE
            found.append((chunk_id, (kind, checksum, data[HEADER_SIZE:])))
        return found

    def _verify(self, path: str, chunk_id: str, data: bytes) -> tuple[str, str]:
        kind = _KIND_NAMES.get(data[len(MAGIC)]) if len(data) >= HEADER_SIZE else None
        if kind is None or not data.startswith(MAGIC) or self._home(kind, chunk_id) != path:
            self._quarantine(path, chunk_id)
            raise ChunkCorrupt(f"chunk {chunk_id[:16]} has a damaged header")
        expected = data[len(MAGIC) + 1 : HEADER_SIZE].hex()
        payload = memoryview(data)[HEADER_SIZE:]
        if hashing.checksum(payload) != expected:
            self._quarantine(path, chunk_id)
            raise ChunkCorrupt(f"chunk {chunk_id[:16]} does not match its checksum")
        return kind, expected

    def _quarantine(self, path: str, chunk_id: str):
        """Move a bad copy aside: never served again, never silently deleted."""
        try:
            os.replace(path, os.path.join(self.quarantine, f"{chunk_id}.{uuid.uuid4().hex}"))
        except FileNotFoundError:
            return
        with self._lock:
            self._count -= 1

    # --- forgetting ---------------------------------------------------------------------

    def delete_snapshots(self, snapshot_ids: list[str]) -> list[str]:
        """Delete these snapshot objects durably (the folder's entry is synced); the ids of
        those that were held. Nothing but snapshot objects is touched (``forget``: the data
        they reference stays until a prune)."""
        deleted = []
        for snapshot_id in snapshot_ids:
            path = self._home(Kind.SNAPSHOT, snapshot_id)
            with self._lock:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                self._count -= 1
            deleted.append(snapshot_id)
        if deleted:
            _fsync_dir(self.snapshots)
        return deleted

    def delete_chunks(self, chunk_ids: list[str], min_age: float
                      ) -> tuple[list[tuple[str, int]], list[str]]:
        """A prune: delete these chunks durably, but those written or stored again less
        than ``min_age`` seconds ago, and snapshot or key objects (roots, which only
        ``forget`` deletes). ``(id, bytes freed)`` of those deleted, and the ids kept; unheld
        ones are in neither."""
        deleted, kept, folders = [], [], set()
        now = time.time()
        for chunk_id in chunk_ids:
            path = self._home(Kind.DATA, chunk_id)
            with self._lock:
                try:
                    stat = os.stat(path)
                    if now - stat.st_mtime < min_age:
                        kept.append(chunk_id)
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    if os.path.exists(self._home(Kind.SNAPSHOT, chunk_id)):
                        kept.append(chunk_id)
                    continue
                self._count -= 1
            deleted.append((chunk_id, stat.st_size))
            folders.add(os.path.dirname(path))
        for folder in folders:
            _fsync_dir(folder)
        return deleted, kept

    # --- listing ----------------------------------------------------------------------

    def _scan(self, folder: str) -> Iterator[os.DirEntry]:
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                if hashing.is_hex_digest(entry.name) and entry.is_file(follow_symlinks=False):
                    yield entry

    def _entries(self) -> Iterator[tuple[os.DirEntry, bool]]:
        """Every chunk file, and whether it is a snapshot object."""
        with os.scandir(self.chunks) as shards:
            folders = sorted(e.path for e in shards if e.is_dir(follow_symlinks=False))
        for folder in folders:
            for entry in self._scan(folder):
                yield entry, False
        for entry in self._scan(self.snapshots):
            yield entry, True

    def chunk_ids(self) -> Iterator[str]:
        """The id of every chunk held (snapshot objects included)."""
        for entry, _ in self._entries():
            yield entry.name

    def listing_pages(self, size: int) -> Iterator[list[tuple[str, int, bool]]]:
        """``(id, payload size, is a snapshot object)`` of every chunk held, ``size`` at a
        time (each page read when asked for, so call it in a thread): telling the manager
        what it holds costs a server a page of memory, whatever it holds."""
        page = []
        for entry, is_snapshot in self._entries():
            try:
                file_size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # quarantined since the folder was read
            page.append((entry.name, max(file_size - HEADER_SIZE, 0), is_snapshot))
            if len(page) == size:
                yield page
                page = []
        if page:
            yield page

    def snapshot_ids(self) -> list[str]:
        return [entry.name for entry in self._scan(self.snapshots)]

    def count(self) -> int:
        return self._count

    def disk_space(self) -> tuple[int, int]:
        """Bytes free (to this process) and in all on the data folder's file system."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize

    def free_bytes(self) -> int:
        return self.disk_space()[0]
