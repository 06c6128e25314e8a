"""Content-defined chunking: bounded sizes, joins back, and an insertion moves few cuts."""

import io
import os
import random

from sdbackup import chunking
from sdbackup.chunking import MAX_SIZE, MIN_SIZE, FileChunker, read_chunks


def chunks_of(data: bytes) -> list[bytes]:
    return [bytes(c) for c in read_chunks(io.BytesIO(data))]


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def test_empty_file_has_no_chunks():
    assert chunks_of(b"") == []


def test_a_small_file_is_one_chunk():
    assert chunks_of(b"hello") == [b"hello"]
    data = random_bytes(MIN_SIZE - 1)
    assert chunks_of(data) == [data]


def test_chunks_join_back_and_respect_the_bounds():
    data = random_bytes(40 * 1024 * 1024)
    chunks = chunks_of(data)
    assert b"".join(chunks) == data
    assert all(MIN_SIZE <= len(c) <= MAX_SIZE for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= MAX_SIZE
    # About 1 MiB on average.
    assert 20 <= len(chunks) <= 80


def test_cuts_do_not_depend_on_how_the_file_is_read(monkeypatch):
    data = random_bytes(20 * 1024 * 1024, seed=2)
    whole = [len(c) for c in chunking.cut(data, final=True)[0]]
    for read_size in (MAX_SIZE, 5 * 1024 * 1024 + 17, 13 * 1024 * 1024):
        monkeypatch.setattr(chunking, "READ_SIZE", read_size)
        assert [len(c) for c in chunks_of(data)] == whole


def test_an_insertion_changes_only_the_chunks_around_it():
    data = random_bytes(64 * 1024 * 1024, seed=3)
    middle = len(data) // 2
    edited = data[:middle] + os.urandom(1024 * 1024) + data[middle:]
    before = set(chunks_of(data))
    after = chunks_of(edited)
    new_bytes = sum(len(c) for c in after if c not in before)
    assert new_bytes < 5 * 1024 * 1024  # the inserted MiB and a chunk or two beside it


def test_a_file_is_read_a_piece_at_a_time(monkeypatch):
    monkeypatch.setattr(chunking, "READ_SIZE", 8 * 1024 * 1024)
    f = io.BytesIO(random_bytes(64 * 1024 * 1024, seed=4))
    chunker = FileChunker(f)
    first = chunker.next_chunks()
    assert first
    assert f.tell() == 8 * 1024 * 1024  # not the whole file


def test_real_file(tmp_path):
    path = tmp_path / "file.bin"
    data = random_bytes(3 * 1024 * 1024, seed=5)
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert b"".join(bytes(c) for c in read_chunks(f)) == data
