"""Backing up: walk the paths, cut files into chunks, store new chunks, commit files.

Chunks are gathered into batches (at most ``BATCH_BYTES`` or ``BATCH_CHUNKS``).
For each batch the manager says which chunks it already holds and where the
others go; the new ones are sent to their primaries, which answer only once
every replica confirmed them; then the files the batch completes are committed
to the catalog. At most ``BATCHES_IN_FLIGHT`` batches are under way, so memory
stays bounded whatever the size of the files, and commits follow batch order,
so a file is committed only after all its chunks are confirmed.
"""

import os
import socket
import stat
from collections.abc import Iterator

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup import hashing
from sdbackup.chunking import FileChunker
from sdbackup.client.progress import Progress
from sdbackup.client.restore import list_snapshot
from sdbackup.client.session import ClientError, Session
from sdbackup.paths import snapshot_path
from sdbackup.protocols.messages import (
    BeginSnapshot,
    ChunkNeed,
    ChunkRef,
    CommitFiles,
    FileEntry,
    FinishSnapshot,
    HasChunks,
    ListSnapshots,
    PlacementRequest,
    StageChunks,
    StoreChunks,
    StoredChunk,
)
from sdbackup.protocols.peer import RemoteError

BATCH_BYTES = 8 * 1024 * 1024
BATCH_CHUNKS = 256
BATCHES_IN_FLIGHT = 2
#: Chunks sent in one StoreChunks: at most this many bytes (a larger chunk goes alone) ...
PACK_BYTES = 1024 * 1024
#: ... and this many chunks.
PACK_CHUNKS = 128
#: Files up to this size are read many at a time, up to SMALL_FILES_AT_ONCE to a thread hop.
SMALL_FILE = 1024 * 1024
SMALL_FILES_AT_ONCE = 64
SMALL_FILES_BYTES = 4 * 1024 * 1024
#: Chunk ids asked about at once when checking what the previous snapshot still has.
HAS_CHUNKS_PAGE = 50_000
#: Placements a chunk gets before the backup gives up on it.
STORE_ATTEMPTS = 4
#: Refusals that another server may not have: the chunk is placed elsewhere.
RETRYABLE = {"replication-failed", "disk-full", "io-error", "checksum-mismatch", "internal"}
#: A file's chunk list goes to the catalog in parts of this many chunks.
STAGE_CHUNKS = 4096
#: Files per commit when a batch completes many small files.
COMMIT_FILES = 2000


@attrs.define
class Item:
    """Something to back up: where it is here and what it is called in the snapshot."""

    local: str
    name: str
    st: os.stat_result


def walk(paths: list[str], warn) -> Iterator[Item]:
    """Every file, folder and link under ``paths``, folders before their contents."""
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise ClientError(f"cannot back up {path}: {e.strerror}") from e
        yield from _walk_one(path, snapshot_path(path), st, warn)


def _walk_one(local: str, name: str, st: os.stat_result, warn) -> Iterator[Item]:
    if stat.S_ISDIR(st.st_mode):
        yield Item(local, name, st)
        try:
            children = sorted(os.listdir(local))
        except OSError as e:
            warn(f"cannot list {local}: {e.strerror}")
            return
        for child in children:
            child_local = os.path.join(local, child)
            try:
                child_st = os.lstat(child_local)
            except OSError as e:
                warn(f"cannot read {child_local}: {e.strerror}")
                continue
            yield from _walk_one(child_local, f"{name}/{child}", child_st, warn)
    elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        yield Item(local, name, st)
    else:
        warn(f"skipping {local}: not a regular file, folder or link")


def _metadata(item: Item) -> dict:
    """The FileEntry fields every kind of entry takes from its stat."""
    st = item.st
    return dict(path=item.name, mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns, inode=st.st_ino)


@attrs.define
class Batch:
    chunks: dict = attrs.Factory(dict)  # chunk_id -> (ChunkRef, bytes)
    size: int = 0
    files: list = attrs.Factory(list)  # FileEntry completed by this batch
    stages: list = attrs.Factory(list)  # StageChunks of large files, in order

    def full(self) -> bool:
        return self.size >= BATCH_BYTES or len(self.chunks) >= BATCH_CHUNKS


@attrs.define
class BackupResult:
    snapshot_id: str
    entries: int  # files, folders and links
    bytes: int
    new_bytes: int
    warnings: list
    unchanged: int = 0


def _next_chunks(chunker: FileChunker, hasher) -> list[tuple[bytes, ChunkRef]]:
    """Read, cut and hash the next chunks of a file (runs in a thread); [] at its end."""
    found = []
    for piece in chunker.next_chunks():
        hasher.update(piece)
        data = bytes(piece)
        chunk_id = hashing.chunk_id(data)
        # Chunks travel and rest as plaintext today, so the checksum of the bytes a server
        # holds is the chunk id itself: hashed once, not twice (hashing.py says why).
        found.append((data, ChunkRef(chunk_id, len(data), chunk_id)))
    return found


def _read_small_files(items: list[Item]) -> list:
    """Read, cut and hash whole small files (runs in a thread): one hop for many files.

    Each result is ``(chunks, file hash)``, or the OSError that stopped the read.
    """
    results = []
    for item in items:
        try:
            with open(item.local, "rb") as f:
                hasher = hashing.file_hasher()
                chunker = FileChunker(f)
                found = []
                while not chunker.done:
                    found += _next_chunks(chunker, hasher)
            results.append((found, hasher.hexdigest()))
        except OSError as e:
            results.append(e)
    return results


class Backup:
    log = Logger()

    def __init__(self, session: Session, paths: list[str], progress: Progress | None = None):
        self.session = session
        self.paths = paths
        self.progress = progress
        self.warnings: list[str] = []
        self.snapshot_id = ""
        self.new_bytes = 0
        self._sent: set[str] = set()  # chunk ids confirmed or being sent during this backup
        self._slots = defer.DeferredSemaphore(BATCHES_IN_FLIGHT)
        self._last_commit: defer.Deferred = defer.succeed(True)
        self._failure: Failure | None = None
        self._degraded = False
        self._failed_servers: set[str] = set()  # servers that failed us: not used again
        self.previous: dict[str, FileEntry] = {}
        self.unchanged = 0  # files recorded again from the previous snapshot, not read
        self._batches: list[defer.Deferred] = []

    def warn(self, text: str):
        self.warnings.append(text)

    async def run(self) -> BackupResult:
        items = list(walk(self.paths, self.warn))
        if self.progress is not None:
            self.progress.total_bytes = sum(i.st.st_size for i in items if stat.S_ISREG(i.st.st_mode))
            self.progress.total_files = len(items)
        host, names = socket.gethostname(), [snapshot_path(p) for p in self.paths]
        self.previous = await self._previous_files(host, names)
        begun = await self.session.ask(BeginSnapshot(host=host, paths=names))
        self.snapshot_id = begun.snapshot_id
        batch = Batch()
        try:
            small: list[Item] = []
            small_bytes = 0
            for item in items:
                if self._is_small_new_file(item):
                    small.append(item)
                    small_bytes += item.st.st_size
                    if len(small) < SMALL_FILES_AT_ONCE and small_bytes < SMALL_FILES_BYTES:
                        continue
                    item = None
                if small:
                    batch = await self._add_small_files(small, batch)
                    small, small_bytes = [], 0
                if item is not None:
                    batch = await self._add(item, batch)
            if small:
                batch = await self._add_small_files(small, batch)
            await self._dispatch(batch)
        finally:
            # Wait for every batch under way, and consume their failures here.
            await defer.DeferredList(self._batches, consumeErrors=True)
        if self._failure is not None:
            self._failure.raiseException()
        summary = (await self.session.ask(FinishSnapshot(snapshot_id=self.snapshot_id))).snapshot
        return BackupResult(summary.snapshot_id, summary.files, summary.bytes, self.new_bytes,
                            self.warnings, self.unchanged)

    async def _previous_files(self, host: str, names: list[str]) -> dict[str, FileEntry]:
        """The files of the last snapshot of these paths from this host whose every chunk
        still has a live copy: an unchanged one is recorded again without being read."""
        snapshots = (await self.session.ask(ListSnapshots())).snapshots
        parents = [s for s in snapshots if s.host == host and s.paths == names]
        if not parents:
            return {}
        files: dict[str, FileEntry] = {}
        async for page in list_snapshot(self.session, parents[-1].snapshot_id):
            for entry in page.files:
                if entry.kind == "file" and entry.chunk_count == len(entry.chunks):
                    files[entry.path] = entry
        chunk_ids = list({c.chunk_id for entry in files.values() for c in entry.chunks})
        held: set[str] = set()
        for start in range(0, len(chunk_ids), HAS_CHUNKS_PAGE):
            reply = await self.session.ask(HasChunks(chunk_ids=chunk_ids[start:start + HAS_CHUNKS_PAGE]))
            held.update(reply.chunk_ids)
        return {path: entry for path, entry in files.items()
                if all(c.chunk_id in held for c in entry.chunks)}

    def _is_small_new_file(self, item: Item) -> bool:
        return (stat.S_ISREG(item.st.st_mode) and item.st.st_size <= SMALL_FILE
                and not self._unchanged(item))

    async def _add_small_files(self, items: list[Item], batch: Batch) -> Batch:
        """Small files are read many to a thread hop; reading them one by one waits on each."""
        for item, result in zip(items, await deferToThread(_read_small_files, items), strict=True):
            if isinstance(result, OSError):
                self.warn(f"cannot read {item.local}: {result.strerror}")
                continue
            found, file_hash = result
            batch = await self._add_chunks(found, batch)
            batch.files.append(FileEntry(kind="file", size=sum(ref.size for _, ref in found),
                                         file_hash=file_hash, chunks=[ref for _, ref in found],
                                         **_metadata(item)))
            self._advance(files=1)
        return batch

    async def _add(self, item: Item, batch: Batch) -> Batch:
        st = item.st
        common = _metadata(item)
        if stat.S_ISDIR(st.st_mode):
            batch.files.append(FileEntry(kind="dir", **common))
        elif stat.S_ISLNK(st.st_mode):
            batch.files.append(FileEntry(kind="symlink", link_target=os.readlink(item.local),
                                         **common))
        elif self._unchanged(item):
            # Same size, mtime, ctime and inode as last time: its chunks are the same.
            previous = self.previous[item.name]
            batch.files.append(FileEntry(kind="file", size=previous.size,
                                         file_hash=previous.file_hash, chunks=previous.chunks,
                                         **common))
            self._advance(size=previous.size)
            self.unchanged += 1
        else:
            return await self._add_file(item, batch, common)
        self._advance(files=1)
        return batch

    def _unchanged(self, item: Item) -> bool:
        previous = self.previous.get(item.name)
        st = item.st
        return previous is not None and (previous.size, previous.mtime_ns, previous.ctime_ns,
                                         previous.inode) == (st.st_size, st.st_mtime_ns,
                                                             st.st_ctime_ns, st.st_ino)

    async def _add_file(self, item: Item, batch: Batch, common: dict) -> Batch:
        try:
            f = open(item.local, "rb")
        except OSError as e:
            self.warn(f"cannot read {item.local}: {e.strerror}")
            return batch
        hasher = hashing.file_hasher()
        chunker = FileChunker(f)
        refs: list[ChunkRef] = []
        first_chunk = size = 0
        try:
            while not chunker.done:
                try:
                    found = await deferToThread(_next_chunks, chunker, hasher)
                except OSError as e:
                    self.warn(f"cannot read {item.local}: {e.strerror}")
                    return batch
                size += sum(ref.size for _, ref in found)
                refs.extend(ref for _, ref in found)
                batch = await self._add_chunks(found, batch)
                if len(refs) >= STAGE_CHUNKS:
                    # Long files send their chunk list in parts: bounded memory and frames.
                    batch.stages.append(StageChunks(snapshot_id=self.snapshot_id, path=item.name,
                                                    first_chunk=first_chunk, chunks=refs))
                    first_chunk += len(refs)
                    refs = []
        finally:
            f.close()
        batch.files.append(FileEntry(kind="file", size=size, file_hash=hasher.hexdigest(),
                                     chunks=refs, first_chunk=first_chunk, **common))
        self._advance(files=1)
        return batch

    async def _add_chunks(self, found: list[tuple[bytes, ChunkRef]], batch: Batch) -> Batch:
        """Put chunks just read into the batch, sending batches as they fill."""
        for data, ref in found:
            if ref.chunk_id not in batch.chunks:
                batch.chunks[ref.chunk_id] = (ref, data)
                batch.size += ref.size
            self._advance(size=ref.size)
            if batch.full():
                await self._dispatch(batch)
                batch = Batch()
        return batch

    def _advance(self, size=0, files=0):
        if self.progress is not None:
            self.progress.advance(size, files)

    async def _dispatch(self, batch: Batch):
        """Start storing ``batch``; returns once a slot for it is free."""
        if self._failure is not None:
            self._failure.raiseException()
        await self._slots.acquire()
        previous, committed = self._last_commit, defer.Deferred()
        self._last_commit = committed
        d = defer.ensureDeferred(self._store_and_commit(batch, previous, committed))
        d.addBoth(self._release, committed)
        self._batches.append(d)

    def _release(self, result, committed: defer.Deferred):
        self._slots.release()
        if isinstance(result, Failure) and self._failure is None:
            self._failure = result
        if not committed.called:
            committed.callback(False)
        return result

    async def _store_and_commit(self, batch: Batch, previous: defer.Deferred,
                                committed: defer.Deferred):
        needs = [ChunkNeed(ref.chunk_id, ref.size) for ref, _ in batch.chunks.values()
                 if ref.chunk_id not in self._sent]
        stored: list[StoredChunk] = []
        if needs:
            placement = await self.session.ask(PlacementRequest(
                chunks=needs, exclude=sorted(self._failed_servers)))
            self._sent.update(placement.assignments)
            self._sent.update(placement.known)
            stored = await self._store_placed(placement, batch.chunks, STORE_ATTEMPTS)
        batch.chunks.clear()  # the bytes are on the servers now: let them go
        # Commits follow batch order: a file may use chunks an earlier batch sent.
        if not await previous:
            raise ClientError("an earlier batch failed")
        if batch.stages:
            # Copies first: the catalog takes only chunk lists whose chunks have a copy.
            await self.session.ask(CommitFiles(snapshot_id=self.snapshot_id, chunks=stored))
            stored = []
            for stage in batch.stages:
                await self.session.ask(stage)
        for start in range(0, len(batch.files) or bool(stored), COMMIT_FILES):
            await self.session.ask(CommitFiles(
                snapshot_id=self.snapshot_id, chunks=stored if start == 0 else [],
                files=batch.files[start : start + COMMIT_FILES]))
        committed.callback(True)

    def _note_degraded(self, placement):
        fewest = min((len(s) for s in placement.assignments.values()), default=placement.replicas)
        if fewest < placement.replicas and not self._degraded:
            self._degraded = True
            self.warn(f"only {fewest} of {placement.replicas} copies of some chunks: fewer servers "
                      f"are alive than the replication factor")

    async def _store_placed(self, placement, chunks: dict, attempts: int) -> list[StoredChunk]:
        """Send placed chunks in packs, one pack per group of servers; the confirmed copies."""
        self._note_degraded(placement)
        groups: dict[tuple, list] = {}
        for chunk_id, servers in placement.assignments.items():
            groups.setdefault(tuple(servers), []).append(chunks[chunk_id])
        sends = [defer.ensureDeferred(self._store_pack(pack, list(servers), chunks, attempts))
                 for servers, items in groups.items() for pack in _packs(items)]
        results = await defer.gatherResults(sends, consumeErrors=True).addErrback(_first_error)
        return [stored for result in results for stored in result]

    async def _store_pack(self, pack: list, servers: list[str], chunks: dict,
                          attempts: int) -> list[StoredChunk]:
        """Store a pack on ``servers``; when one fails, place the pack again without it."""
        primary = servers[0]
        refs = [ref for ref, _ in pack]
        try:
            reply = await self.session.servers.request(primary, StoreChunks(
                chunks=refs, forward_to=servers[1:], payload=b"".join(data for _, data in pack)))
        except RemoteError as e:
            if e.code not in RETRYABLE:
                raise ClientError(f"server {primary} could not store chunks: {e.reason}") from e
            failed, why = e.culprit or primary, e.reason
        except Exception as e:  # refused, lost or timed out
            failed, why = primary, f"server {primary} is unreachable: {e}"
        else:
            if reply.chunk_ids != [ref.chunk_id for ref in refs]:
                raise ClientError(f"server {primary} confirmed other chunks than were sent")
            self.new_bytes += sum(ref.size for ref in refs)
            return [StoredChunk(ref.chunk_id, ref.size, ref.checksum, reply.holders)
                    for ref in refs]
        if attempts <= 1:
            raise ClientError(f"could not store chunks after {STORE_ATTEMPTS} attempts: {why}")
        if failed not in self._failed_servers:
            self._failed_servers.add(failed)
            self.log.warn("{why}; placing chunks elsewhere", why=why)
        # Chunks that landed on a live server before the failure count as held; repair adds
        # their other copies.
        placement = await self.session.ask(PlacementRequest(
            chunks=[ChunkNeed(ref.chunk_id, ref.size) for ref in refs],
            exclude=sorted(self._failed_servers)))
        return await self._store_placed(placement, chunks, attempts - 1)


def _packs(items: list) -> list[list]:
    """``(ref, data)`` items in packs of at most PACK_BYTES (a larger chunk alone)."""
    packs, pack, size = [], [], 0
    for ref, data in items:
        if pack and (size + ref.size > PACK_BYTES or len(pack) == PACK_CHUNKS):
            packs.append(pack)
            pack, size = [], 0
        pack.append((ref, data))
        size += ref.size
    if pack:
        packs.append(pack)
    return packs


def _first_error(failure):
    """Unwrap ``gatherResults``' FirstError so the user sees the real reason."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure
