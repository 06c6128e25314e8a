"""How files are cut into chunks: a pure function of the bytes.

Fixed-size chunks of ``CHUNK_SIZE`` bytes; the last one is shorter, and an
empty file has none. Content-defined chunking will replace this without any
change to the protocol: a chunk is whatever bytes this module yields.
"""

from collections.abc import Iterator
from typing import BinaryIO

CHUNK_SIZE = 1024 * 1024


def read_chunks(f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The chunks of an open binary file, read one at a time."""
    while True:
        data = f.read(chunk_size)
        if not data:
            return
        yield data
