"""read_chunks: fixed-size chunks, read one at a time."""

import io

from sdbackup.chunking import CHUNK_SIZE, read_chunks


def sizes(data: bytes, chunk_size: int) -> list[int]:
    return [len(c) for c in read_chunks(io.BytesIO(data), chunk_size)]


def test_chunk_sizes(subtests):
    for length, expected in [
        (0, []),
        (1, [1]),
        (9, [9]),
        (10, [10]),
        (11, [10, 1]),
        (25, [10, 10, 5]),
        (30, [10, 10, 10]),
    ]:
        with subtests.test(length=length):
            assert sizes(bytes(length), 10) == expected


def test_empty_file_has_no_chunks():
    assert list(read_chunks(io.BytesIO(b""))) == []


def test_exact_multiple_has_no_empty_last_chunk():
    data = bytes(range(256)) * 16
    chunks = list(read_chunks(io.BytesIO(data), 1024))
    assert [len(c) for c in chunks] == [1024] * 4
    assert b"".join(chunks) == data


def test_chunks_join_back_to_the_file():
    data = bytes(range(251)) * 1000
    chunks = list(read_chunks(io.BytesIO(data), 4096))
    assert b"".join(chunks) == data
    assert all(len(c) == 4096 for c in chunks[:-1])


def test_default_chunk_size():
    data = b"x" * (2 * CHUNK_SIZE + CHUNK_SIZE // 2)
    assert sizes(data, CHUNK_SIZE) == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE // 2]
    assert [len(c) for c in read_chunks(io.BytesIO(data))] == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE // 2]


def test_reads_one_chunk_at_a_time():
    f = io.BytesIO(bytes(100))
    chunks = read_chunks(f, 10)
    assert f.tell() == 0
    assert len(next(chunks)) == 10
    assert f.tell() == 10  # the rest of the file is not read ahead


def test_real_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"abc" * 1000)
    with open(path, "rb") as f:
        assert [len(c) for c in read_chunks(f, 1000)] == [1000, 1000, 1000]
