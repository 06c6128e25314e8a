"""Restoring: fetch every chunk from any server that holds it, verify, write, rename.

Each chunk is checked against its checksum as it arrives; a bad or missing copy
makes the restore try the next holder. A file is written to a temporary name in
its folder and renamed into place only when its whole-file hash matches, so a
restore never leaves a corrupt file under its real name. Nothing is written
outside the target: names are checked, and every folder a file lands in must
resolve inside the target. Links are created last, so no write goes through one.
"""

import contextlib
import ctypes
import os
from collections import deque

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from sdbackup import hashing
from sdbackup.client.progress import Progress
from sdbackup.client.session import ClientError, Session
from sdbackup.paths import TargetFolder, UnsafePath, path_in_include
from sdbackup.protocols.messages import ChunkRef, FetchChunk, FileEntry, ListChunks, ListFiles

#: Chunks being fetched at once, across all files: bounds memory.
CHUNKS_IN_FLIGHT = 16
#: Chunks fetched ahead within one file.
FILE_WINDOW = 8
#: Files restored at once (many small files are bound by round trips, not bytes).
FILES_AT_ONCE = 16
PAGE = 1000
#: Files of at most this size (all their chunks listed) are fetched whole, then written
#: in one thread hop.
SMALL_FILE = 1024 * 1024


@attrs.define
class RestoreResult:
    snapshot_id: str
    entries: int = 0  # files, folders and links restored
    bytes: int = 0
    errors: list = attrs.Factory(list)


class ChunkUnavailable(ClientError):
    pass


async def list_snapshot(session: Session, ref: str):
    """Yield pages ``(snapshot_id, files, holders)`` of a snapshot, in path order."""
    after = ""
    while True:
        page = await session.ask(ListFiles(snapshot=ref, after=after, limit=PAGE))
        ref = page.snapshot_id  # stay on the same snapshot even if a newer one lands
        yield page
        if not page.more or not page.files:
            return
        after = page.files[-1].path


def _write_chunk(f, hasher, data: bytes):
    f.write(data)
    hasher.update(data)


def _write_small_file(temp: str, destination: str, entry: FileEntry, pieces: list[bytes]):
    """A whole small file in one thread hop: write, check its hash, put it in place."""
    hasher = hashing.file_hasher()
    with open(temp, "wb") as f:
        for piece in pieces:
            _write_chunk(f, hasher, piece)
    _finish_file(f, temp, destination, entry, hasher.hexdigest())


def _finish_file(f, temp: str, destination: str, entry: FileEntry, digest: str):
    """Check the whole file's hash, then set its metadata and rename it into place.

    No fsync per file (thousands of small files would wait on the disk one by
    one): the restore syncs the target's file system once, at its end.
    """
    f.close()
    if digest != entry.file_hash:
        os.unlink(temp)
        raise ClientError(f"{entry.path}: restored bytes do not match the file's hash; not written")
    os.chmod(temp, entry.mode)
    os.utime(temp, ns=(entry.mtime_ns, entry.mtime_ns))
    os.replace(temp, destination)


def _sync_file_system(path: str):
    """Flush everything written under ``path`` to disk (``syncfs``, else a global sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (AttributeError, OSError):
        os.sync()
    finally:
        os.close(fd)


def _verify(ref: ChunkRef, checksum: str, payload: bytes) -> bool:
    return checksum == ref.checksum and len(payload) == ref.size and (
        hashing.checksum(payload) == ref.checksum)


class Restore:
    def __init__(self, session: Session, snapshot: str, target: str, includes=(),
                 progress: Progress | None = None):
        self.session = session
        self.snapshot = snapshot
        self.target = os.path.abspath(target)
        self.folder: TargetFolder | None = None
        self._made: set[str] = set()  # folders known to exist
        self.includes = [i.strip("/") for i in includes]
        self.progress = progress
        self.chunk_slots = defer.DeferredSemaphore(CHUNKS_IN_FLIGHT)
        self.file_slots = defer.DeferredSemaphore(FILES_AT_ONCE)
        self._turn = 0

    async def run(self) -> RestoreResult:
        os.makedirs(self.target, exist_ok=True)
        self.folder = TargetFolder(self.target)
        result = RestoreResult(snapshot_id="")
        folders: list[FileEntry] = []
        links: list[FileEntry] = []
        running: list[defer.Deferred] = []
        async for page in list_snapshot(self.session, self.snapshot):
            result.snapshot_id = page.snapshot_id
            for entry in page.files:
                if not path_in_include(entry.path, self.includes):
                    continue
                try:
                    destination = self.folder.path_for(entry.path)
                except UnsafePath as e:
                    result.errors.append(str(e))
                    continue
                if entry.kind == "dir":
                    os.makedirs(destination, exist_ok=True)
                    folders.append(entry)
                    result.entries += 1
                elif entry.kind == "symlink":
                    links.append(entry)
                else:
                    await self.file_slots.acquire()
                    d = defer.ensureDeferred(self._restore_file(page.snapshot_id, entry, page.holders))
                    d.addBoth(self._file_done, entry, result)
                    running.append(d)
            running = [d for d in running if not d.called]
        await defer.DeferredList(running)
        for entry in links:
            self._restore_link(entry, result)
        # Folders last and deepest first: writing into a folder changes its mtime.
        for entry in sorted(folders, key=lambda e: e.path.count("/"), reverse=True):
            destination = self.folder.path_for(entry.path)
            os.chmod(destination, entry.mode)
            os.utime(destination, ns=(entry.mtime_ns, entry.mtime_ns))
        if not result.snapshot_id:
            raise ClientError(f"snapshot {self.snapshot} is empty")
        await deferToThread(_sync_file_system, self.target)  # durable before we say it is done
        return result

    def _file_done(self, outcome, entry: FileEntry, result: RestoreResult):
        self.file_slots.release()
        if isinstance(outcome, Failure):
            if outcome.check(ClientError, OSError, UnsafePath):
                result.errors.append(f"{entry.path}: {outcome.getErrorMessage()}")
            else:
                result.errors.append(f"{entry.path}: {outcome.type.__name__}: "
                                     f"{outcome.getErrorMessage()}")
        else:
            result.entries += 1
            result.bytes += entry.size
        if self.progress is not None:
            self.progress.advance(files=1)

    async def _chunks_of(self, snapshot_id: str, entry: FileEntry, holders: dict):
        """Each chunk of the file with its holders; a long list comes a page at a time."""
        for ref in entry.chunks:
            yield ref, holders.get(ref.chunk_id, [])
        seq = len(entry.chunks)
        while seq < entry.chunk_count:
            page = await self.session.ask(ListChunks(snapshot_id=snapshot_id, path=entry.path,
                                                     first_chunk=seq))
            if not page.chunks:
                raise ClientError(f"{entry.path}: the catalog lists {seq} of "
                                  f"{entry.chunk_count} chunks")
            for ref in page.chunks:
                yield ref, page.holders.get(ref.chunk_id, [])
            seq += len(page.chunks)

    async def _restore_file(self, snapshot_id: str, entry: FileEntry, holders: dict):
        destination = self.folder.path_for(entry.path)
        parent = os.path.dirname(destination)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        temp = os.path.join(parent, f".{os.path.basename(destination)}.sdbackup-{os.getpid()}")
        if entry.size <= SMALL_FILE and entry.chunk_count == len(entry.chunks):
            await self._restore_small_file(entry, holders, temp, destination)
            return
        f = await deferToThread(open, temp, "wb")
        hasher = hashing.file_hasher()
        pending: deque[defer.Deferred] = deque()
        try:
            async for ref, servers in self._chunks_of(snapshot_id, entry, holders):
                # Never wait for a slot while holding fetched chunks: write them instead, so
                # files that share the slots cannot all wait for each other.
                while pending and not self.chunk_slots.tokens:
                    await self._write_next(pending, f, hasher)
                await self.chunk_slots.acquire()
                pending.append(defer.ensureDeferred(self._fetch(ref, servers)))
                while pending and (len(pending) >= FILE_WINDOW or pending[0].called):
                    await self._write_next(pending, f, hasher)
            while pending:
                await self._write_next(pending, f, hasher)
            await deferToThread(_finish_file, f, temp, destination, entry, hasher.hexdigest())
        except BaseException:
            for d in pending:
                d.addBoth(lambda _: self.chunk_slots.release())
            if not f.closed:
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    async def _restore_small_file(self, entry: FileEntry, holders: dict, temp: str,
                                  destination: str):
        pieces = []
        for ref in entry.chunks:
            await self.chunk_slots.acquire()
            try:
                pieces.append(await self._fetch(ref, holders.get(ref.chunk_id, [])))
            finally:
                self.chunk_slots.release()
        try:
            await deferToThread(_write_small_file, temp, destination, entry, pieces)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        if self.progress is not None:
            self.progress.advance(size=entry.size)

    async def _write_next(self, pending: deque, f, hasher):
        d = pending.popleft()
        try:
            data = await d
            await deferToThread(_write_chunk, f, hasher, data)
        finally:
            self.chunk_slots.release()
        if self.progress is not None:
            self.progress.advance(size=len(data))

    async def _fetch(self, ref: ChunkRef, holders: list[str]) -> bytes:
        """The chunk's bytes from the first holder whose copy verifies."""
        if not holders:
            raise ChunkUnavailable(f"no server holds chunk {ref.chunk_id[:16]}")
        # Start at a different holder for each chunk, so reads spread over the servers.
        self._turn += 1
        start = self._turn % len(holders)
        reasons = []
        for server in holders[start:] + holders[:start]:
            try:
                reply = await self.session.servers.request(server, FetchChunk(chunk_id=ref.chunk_id))
            except Exception as e:
                reasons.append(f"{server}: {getattr(e, 'reason', None) or e}")
                continue
            # Hashing a small payload costs less than a thread hop.
            verified = (_verify(ref, reply.checksum, reply.payload) if ref.size <= 256 * 1024
                        else await deferToThread(_verify, ref, reply.checksum, reply.payload))
            if verified:
                return reply.payload
            reasons.append(f"{server}: copy does not match its checksum")
        raise ChunkUnavailable(
            f"no good copy of chunk {ref.chunk_id[:16]}: " + "; ".join(reasons))

    def _restore_link(self, entry: FileEntry, result: RestoreResult):
        try:
            destination = self.folder.path_for(entry.path)
            if os.path.lexists(destination) and not os.path.isdir(destination):
                os.unlink(destination)
            os.symlink(entry.link_target, destination)
            os.utime(destination, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            result.entries += 1
        except (OSError, UnsafePath) as e:
            result.errors.append(f"{entry.path}: {e}")
