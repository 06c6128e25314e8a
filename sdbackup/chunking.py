"""How files are cut into chunks: content-defined, a pure function of the bytes.

FastCDC (a gear rolling hash) puts a cut where the content says so, not at
fixed offsets, so bytes inserted in a file move the cuts near the insertion
only: the chunks after it are the same as before and are not sent again.
Chunks are between ``MIN_SIZE`` and ``MAX_SIZE`` bytes, ``AVG_SIZE`` on
average; an empty file has none. The compiled ``fastcdc`` module cuts at
about 1,200 MiB/s here.

A file is read ``READ_SIZE`` bytes at a time: every chunk that ends before
the end of what was read is final (a cut depends only on the bytes since the
chunk began), and the unfinished tail waits for the next read. Memory stays
at a few times ``READ_SIZE`` whatever the file's size.
"""

from collections.abc import Iterator
from typing import BinaryIO

from fastcdc import fastcdc

MIN_SIZE = 256 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 4 * 1024 * 1024
READ_SIZE = 4 * 1024 * 1024


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
