"""The chunker: files read, cut into chunks and hashed, each chunk once.

The third stage of a backup (walk -> tree builder -> chunker -> packer ->
store). Cuts are content-defined, a pure function of the bytes: FastCDC (a
gear rolling hash) puts a cut where the content says so, not at fixed
offsets, so bytes inserted in a file move the cuts near the insertion only:
the chunks after it are the same as before and are not sent again. Chunks
are between ``MIN_SIZE`` and ``MAX_SIZE`` bytes, ``AVG_SIZE`` on average; an
empty file has none. The compiled ``fastcdc`` module cuts at about
1,200 MiB/s here.

A file is read ``READ_SIZE`` bytes at a time: every chunk that ends before
the end of what was read is final (a cut depends only on the bytes since the
chunk began), and the unfinished tail waits for the next read. Memory stays
at a few times ``READ_SIZE`` whatever the file's size.

Files are opened relative to their folder's descriptor, without following
links and without touching their access time. Reading blocks: the tree
builder calls ``read_small_files`` (many files a call) and ``FileReader``
in threads. A chunk's id is the BLAKE3 digest of its bytes as stored, which is
also the checksum the servers verify: each chunk is hashed once. A small
file's chunks are hashed here; a large file's pieces are left to the sealer,
which hashes what it stores (in an encrypted repository, the sealed bytes
only). A file that is not what ``lstat``
said when the walk saw it (other size, mtime or inode after reading) comes
back ``changed``.
"""

import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

import blake3
from fastcdc import fastcdc

from sdbackup.client.walk import open_at, read_xattrs

MIN_SIZE = 256 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 4 * 1024 * 1024
READ_SIZE = 4 * 1024 * 1024
#: A file read whole in one go (``read_small_files``) is read up to this size; one that
#: has grown past it while being read is kept as read, and reported changed.
SMALL_READ_LIMIT = 2 * 1024 * 1024

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
EMPTY_HASH = blake3.blake3(b"").digest()


def cut(data: bytes, final: bool) -> tuple[list[memoryview], bytes]:
    """The complete chunks of ``data`` and the tail left over (all of it is final at EOF)."""
    view = memoryview(data)
    pieces = [view[c.offset : c.offset + c.length]
              for c in fastcdc(data, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False)]
    if final or not pieces:
        return pieces, b""
    tail = pieces.pop()
    return pieces, bytes(tail)


class FileChunker:
    """Cuts an open binary file into chunks, one read at a time."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.tail = b""
        self.done = False

    def next_chunks(self) -> list[memoryview]:
        """The next chunks; an empty list once the file is exhausted. Blocks: call in a thread."""
        while not self.done:
            data = self.f.read(READ_SIZE)
            final = len(data) == 0
            if final:
                self.done = True
            pieces, self.tail = cut(self.tail + data, final)
            if pieces:
                return pieces
        return []


def read_chunks(f: BinaryIO) -> Iterator[memoryview]:
    """Every chunk of an open binary file, in order."""
    chunker = FileChunker(f)
    while pieces := chunker.next_chunks():
        yield from pieces


# --- reading files for a backup -------------------------------------------------------


class NotAFile(OSError):
    """The name no longer holds a regular file (replaced since the walk saw it)."""

    def __init__(self):
        super().__init__(0, "it is no longer a regular file")


def open_file(dir_fd: int, name: bytes) -> int:
    """Open a regular file in a folder: no link followed, atime untouched, never blocking."""
    fd = open_at(name, FILE_FLAGS, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile()
    return fd


def changed_since(st: os.stat_result, after: os.stat_result, size_read: int) -> bool:
    """True when a file read is not the file ``st`` described: other size, mtime or inode."""
    return (size_read != st.st_size or after.st_size != st.st_size
            or after.st_mtime_ns != st.st_mtime_ns or after.st_ino != st.st_ino)


class FileRead:
    """A file's chunks ``[(chunk id, bytes)]``, whole-file hash and size, as read, and its
    extended attributes (read through the open file: the walk leaves a file's to its read)."""

    __slots__ = ("changed", "chunks", "hash", "size", "xattrs")

    def __init__(self, chunks: list, file_hash: bytes, size: int, changed: bool,
                 xattrs: tuple = ()):
        self.chunks = chunks
        self.hash = file_hash
        self.size = size
        self.changed = changed
        self.xattrs = xattrs


def hash_chunks(pieces) -> list[tuple[bytes, bytes]]:
    """``(id, bytes)`` of each piece: its BLAKE3 digest, which is also its checksum."""
    return [(blake3.blake3(piece).digest(), bytes(piece)) for piece in pieces]


def read_small_files(files: list[tuple[int, bytes, os.stat_result]]) -> list:
    """Read, cut and hash whole small files ``(folder fd, name, lstat)``: one thread hop
    for many files. Each result is a ``FileRead``, or the OSError that stopped it.

    Every file is opened and announced to the kernel (``POSIX_FADV_WILLNEED``) before the
    first is read, so their reads reach the disk together rather than one after another:
    from a cold cache, a batch waits on the disk about once, not once a file.
    """
    opened: list = []
    try:
        for dir_fd, name, _ in files:
            try:
                fd = open_file(dir_fd, name)
            except OSError as e:
                opened.append(e)
                continue
            opened.append(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        results = []
        for index, (_, _, st) in enumerate(files):
            fd = opened[index]
            if isinstance(fd, OSError):
                results.append(fd)
                continue
            try:
                results.append(_read_small_file(fd, st))
            except OSError as e:
                results.append(e)
            finally:
                opened[index] = None
                os.close(fd)
        return results
    finally:
        for fd in opened:
            if isinstance(fd, int):
                os.close(fd)


def _read_small_file(fd: int, st: os.stat_result) -> FileRead:
    xattrs = read_xattrs(fd, True)
    parts, total, want = [], 0, st.st_size + 1
    while total < SMALL_READ_LIMIT:
        part = os.read(fd, min(want, SMALL_READ_LIMIT - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
        want = 64 * 1024
    after = os.fstat(fd)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if 0 < total <= MIN_SIZE:  # one chunk, the bytes as read: no cut, no copy
        chunks = [(blake3.blake3(data).digest(), data)]
    else:
        chunks = hash_chunks(cut(data, final=True)[0])
    if len(chunks) == 1:
        file_hash = chunks[0][0]  # the whole file is the one chunk: hashed once
    else:
        file_hash = blake3.blake3(data).digest() if chunks else EMPTY_HASH
    return FileRead(chunks, file_hash, total, changed_since(st, after, total), xattrs)


class FileReader:
    """Reads one large file a piece at a time; every method blocks (call it in a thread).

    Each read lands in a fresh buffer after the unfinished tail of the last
    one, and the pieces handed out are views of it, not copies, and not hashed:
    the sealer makes them chunks (``seal_pieces``), a plaintext chunk's id the
    hash of the piece, a sealed one's the hash of its sealed bytes, so in an
    encrypted repository no hash of the plaintext piece is made in vain.
    """

    def __init__(self, dir_fd: int, name: bytes, st: os.stat_result):
        self.dir_fd = dir_fd
        self.name = name
        self.st = st
        self.size = 0
        self._hasher = blake3.blake3()
        self._fd = -1
        self._tail = memoryview(b"")  # the unfinished chunk at the end of the last read
        self._done = False
        self._xattrs: tuple = ()

    def open(self):
        self._fd = open_file(self.dir_fd, self.name)
        self._xattrs = read_xattrs(self._fd, True)

    def next_pieces(self) -> list[memoryview]:
        """The bytes of the next chunks; ``[]`` at the end of the file."""
        while not self._done:
            kept = len(self._tail)
            buffer = bytearray(kept + READ_SIZE)
            view = memoryview(buffer)
            view[:kept] = self._tail
            got = os.readv(self._fd, [view[kept:]])
            self._done = got == 0
            data = view[: kept + got]
            self._hasher.update(data[kept:])
            self.size += got
            pieces = [data[c.offset : c.offset + c.length]
                      for c in fastcdc(data, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False)]
            self._tail = pieces.pop() if pieces and not self._done else memoryview(b"")
            if pieces:
                return pieces
        return []

    def finish(self) -> FileRead:
        """The whole file's hash and size (no chunks: they were handed out already)."""
        changed = changed_since(self.st, os.fstat(self._fd), self.size)
        return FileRead([], self._hasher.digest(), self.size, changed, self._xattrs)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
