"""A storage server's chunk files on disk.

Layout under the data folder::

    incoming/             chunks being written (a crash leaves only these)
    chunks/ab/abcdef...   one file per chunk, sharded by the id's first byte
    quarantine/           copies that failed verification, kept for inspection

A chunk file is ``MAGIC | checksum (32 bytes) | payload``: the checksum of the
bytes held travels with them, so a server can verify a chunk without asking
anyone, even once chunk ids are keyed hashes that it cannot recompute.

Every method here blocks: the storage service calls them in a thread pool.
"""

import os
import threading
import uuid
from collections.abc import Iterator

from sdbackup import hashing

MAGIC = b"SDBCHNK1"
_HEADER_SIZE = len(MAGIC) + hashing.DIGEST_SIZE


class ChunkStoreError(Exception):
    code = "store-error"


class InvalidChunkId(ChunkStoreError):
    code = "invalid-chunk-id"


class ChecksumMismatch(ChunkStoreError):
    code = "checksum-mismatch"


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


class ChunkStore:
    """Verified, durable, content-addressed chunk files in one folder."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.incoming = os.path.join(self.root, "incoming")
        self.chunks = os.path.join(self.root, "chunks")
        self.quarantine = os.path.join(self.root, "quarantine")
        for folder in (self.root, self.incoming, self.chunks, self.quarantine):
            os.makedirs(folder, exist_ok=True)
        # Anything left in incoming/ was never renamed into place: never acknowledged.
        for leftover in os.listdir(self.incoming):
            os.unlink(os.path.join(self.incoming, leftover))
        self._lock = threading.Lock()
        self._count = sum(1 for _ in self.chunk_ids())

    def path_for(self, chunk_id: str) -> str:
        """The file of ``chunk_id``; refuses anything that is not a hex digest."""
        if not hashing.is_hex_digest(chunk_id):
            raise InvalidChunkId(f"not a chunk id: {chunk_id!r}")
        return os.path.join(self.chunks, chunk_id[:2], chunk_id)

    def has(self, chunk_id: str) -> bool:
        return os.path.exists(self.path_for(chunk_id))

    def put(self, chunk_id: str, checksum: str, payload: bytes) -> bool:
        """Verify and store a chunk durably. False when it was already held."""
        self._check(chunk_id, checksum, payload)
        return self._write(chunk_id, checksum, payload)

    def put_many(self, chunks: list[tuple[str, str, bytes]]) -> list[str]:
        """Verify every chunk, then store them all; the ids that were not held before.

        One bad checksum refuses the whole lot before anything is written.
        """
        for chunk_id, checksum, payload in chunks:
            self._check(chunk_id, checksum, payload)
        return [chunk_id for chunk_id, checksum, payload in chunks
                if self._write(chunk_id, checksum, payload)]

    def _check(self, chunk_id: str, checksum: str, payload: bytes):
        self.path_for(chunk_id)
        if not hashing.is_hex_digest(checksum):
            raise ChecksumMismatch(f"not a checksum: {checksum!r}")
        actual = hashing.checksum(payload)
        if actual != checksum:
            raise ChecksumMismatch(
                f"chunk {chunk_id[:16]}: received bytes hash to {actual[:16]}, "
                f"expected {checksum[:16]}"
            )

    def _write(self, chunk_id: str, checksum: str, payload: bytes) -> bool:
        """Written to ``incoming/``, fsynced, renamed into place, and the folder
        fsynced: a crash at any point leaves either no chunk or a whole one."""
        path = self.path_for(chunk_id)
        if os.path.exists(path):
            return False
        temp = os.path.join(self.incoming, f"{chunk_id}.{uuid.uuid4().hex}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(MAGIC)
                f.write(bytes.fromhex(checksum))
                f.write(payload)
                f.flush()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        shard = os.path.dirname(path)
        if not os.path.isdir(shard):
            os.makedirs(shard, exist_ok=True)
            _fsync_dir(self.chunks)
        with self._lock:
            if os.path.exists(path):
                os.unlink(temp)
                return False
            os.replace(temp, path)
            self._count += 1
        _fsync_dir(shard)
        return True

    def get(self, chunk_id: str) -> tuple[str, bytes]:
        """The checksum and payload of a chunk, verified; a bad copy is quarantined."""
        path = self.path_for(chunk_id)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk_id[:16]} is not held here") from None
        checksum = self._verify(chunk_id, data)
        return checksum, data[_HEADER_SIZE:]

    def _verify(self, chunk_id: str, data: bytes) -> str:
        if len(data) < _HEADER_SIZE or not data.startswith(MAGIC):
            self._quarantine(chunk_id)
            raise ChunkCorrupt(f"chunk {chunk_id[:16]} has a damaged header")
        expected = data[len(MAGIC) : _HEADER_SIZE].hex()
        if hashing.checksum(memoryview(data)[_HEADER_SIZE:]) != expected:
            self._quarantine(chunk_id)
            raise ChunkCorrupt(f"chunk {chunk_id[:16]} does not match its checksum")
        return expected

    def _quarantine(self, chunk_id: str):
        """Move a bad copy aside: never served again, never silently deleted."""
        path = self.path_for(chunk_id)
        try:
            os.replace(path, os.path.join(self.quarantine, f"{chunk_id}.{uuid.uuid4().hex}"))
        except FileNotFoundError:
            return
        with self._lock:
            self._count -= 1

    def chunk_ids(self) -> Iterator[str]:
        for shard in sorted(os.listdir(self.chunks)):
            shard_path = os.path.join(self.chunks, shard)
            if not os.path.isdir(shard_path):
                continue
            for name in sorted(os.listdir(shard_path)):
                if hashing.is_hex_digest(name):
                    yield name

    def count(self) -> int:
        return self._count

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize
