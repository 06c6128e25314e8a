"""The chunker reading files for a backup: the same cuts as ``read_chunks``, one hash per
small file's chunk (a large file's pieces are left to the sealer), the whole-file hash,
atimes left alone, and a file that changes noticed."""

import io
import os
import random

import blake3
import pytest

from sdbackup import chunking
from sdbackup.chunking import FileReader, read_chunks, read_small_files


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_large(folder, name: bytes, st) -> tuple[list, object]:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    reader = FileReader(fd, name, st)
    try:
        reader.open()
        pieces = []
        while found := reader.next_pieces():
            pieces += found
        return pieces, reader.finish()
    finally:
        reader.close()
        os.close(fd)


@pytest.mark.parametrize("read_size", [chunking.READ_SIZE, 1024 * 1024 + 7, 3 * 1024 * 1024])
def test_a_large_file_is_cut_as_read_chunks_cuts_it(tmp_path, monkeypatch, read_size):
    monkeypatch.setattr(chunking, "READ_SIZE", read_size)
    data = random_bytes(21 * 1024 * 1024 + 5, seed=read_size)
    (tmp_path / "big").write_bytes(data)
    pieces, result = read_large(tmp_path, b"big", os.stat(tmp_path / "big"))
    assert [bytes(c) for c in read_chunks(io.BytesIO(data))] == [bytes(p) for p in pieces]
    assert (result.hash, result.size, result.changed) == (blake3.blake3(data).digest(), len(data), False)


def test_small_files_many_at_a_time(tmp_path):
    sizes = [0, 1, 1000, chunking.MIN_SIZE, chunking.MIN_SIZE + 1, 1024 * 1024]
    files = []
    for i, size in enumerate(sizes):
        (tmp_path / f"f{i}").write_bytes(random_bytes(size, seed=i))
        files.append((f"f{i}".encode(), os.stat(tmp_path / f"f{i}")))
    files.append((b"gone", os.stat(tmp_path / "f0")))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        results = read_small_files([(fd, name, st) for name, st in files])
    finally:
        os.close(fd)
    for i, size in enumerate(sizes):
        data = random_bytes(size, seed=i)
        result = results[i]
        assert b"".join(d for _, d in result.chunks) == data
        assert [d for _, d in result.chunks] == [bytes(c) for c in read_chunks(io.BytesIO(data))]
        assert (result.hash, result.size, result.changed) == (blake3.blake3(data).digest(), size, False)
    assert isinstance(results[-1], FileNotFoundError)


def test_a_batch_opens_every_file_first_and_leaves_no_descriptor_open(tmp_path):
    """The batch opens all its files before reading the first (so the disk gets their reads
    together): a name gone or no longer a file in the middle fails alone, and once the batch
    is done every descriptor it opened is closed again, whichever way each file went."""
    names = [b"a", b"gone", b"b", b"now-a-folder", b"c"]
    for name in (b"a", b"b", b"c", b"now-a-folder"):
        (tmp_path / name.decode()).write_bytes(name * 100)
    seen = {name: os.stat(tmp_path / "a") for name in names}
    os.remove(tmp_path / "now-a-folder")
    os.mkdir(tmp_path / "now-a-folder")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    before = sorted(os.listdir("/proc/self/fd"))
    try:
        results = read_small_files([(fd, name, seen[name]) for name in names])
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
    assert [b"".join(d for _, d in results[i].chunks) for i in (0, 2, 4)] == [
        b"a" * 100, b"b" * 100, b"c" * 100]
    assert isinstance(results[1], FileNotFoundError)
    assert isinstance(results[3], chunking.NotAFile)


def test_reading_leaves_access_times_alone(tmp_path):
    (tmp_path / "small").write_bytes(b"x" * 100)
    (tmp_path / "large").write_bytes(random_bytes(5 * 1024 * 1024, seed=9))
    for name in ("small", "large"):
        os.utime(tmp_path / name, ns=(1_000_000_000, 2_000_000_000))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        read_small_files([(fd, b"small", os.stat(tmp_path / "small"))])
    finally:
        os.close(fd)
    read_large(tmp_path, b"large", os.stat(tmp_path / "large"))
    for name in ("small", "large"):
        assert os.stat(tmp_path / name).st_atime_ns == 1_000_000_000


def test_a_file_that_is_not_what_the_walk_saw_comes_back_changed(tmp_path):
    (tmp_path / "small").write_bytes(b"before")
    (tmp_path / "large").write_bytes(random_bytes(3 * 1024 * 1024, seed=3))
    seen = {name: os.stat(tmp_path / name) for name in ("small", "large")}
    with open(tmp_path / "small", "ab") as f:
        f.write(b", after")
    with open(tmp_path / "large", "r+b") as f:
        f.truncate(2 * 1024 * 1024)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        [small] = read_small_files([(fd, b"small", seen["small"])])
    finally:
        os.close(fd)
    assert small.changed and b"".join(d for _, d in small.chunks) == b"before, after"
    _, large = read_large(tmp_path, b"large", seen["large"])
    assert large.changed and large.size == 2 * 1024 * 1024


def test_a_link_or_fifo_put_in_place_of_a_file_is_not_followed_or_opened(tmp_path):
    (tmp_path / "target").write_bytes(b"secret")
    st = os.stat(tmp_path / "target")
    os.symlink("target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link, fifo = read_small_files([(fd, b"link", st), (fd, b"fifo", st)])
    finally:
        os.close(fd)
    assert isinstance(link, OSError) and isinstance(fifo, OSError)  # no hang on the FIFO
    assert fifo.strerror == "it is no longer a regular file"
