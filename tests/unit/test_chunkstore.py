"""ChunkStore: verified, durable, content-addressed chunk files on a real disk."""

import os

import pytest

from sdbackup import hashing
from sdbackup.services.chunkstore import (
    MAGIC,
    ChecksumMismatch,
    ChunkCorrupt,
    ChunkMissing,
    ChunkStore,
    InvalidChunkId,
)

HEADER = len(MAGIC) + hashing.DIGEST_SIZE


def chunk(data: bytes) -> tuple[str, str, bytes]:
    return hashing.chunk_id(data), hashing.checksum(data), data


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def store(data_dir):
    return ChunkStore(str(data_dir))


def test_put_then_get_returns_the_bytes_and_checksum(store):
    chunk_id, checksum, payload = chunk(b"some bytes worth keeping" * 100)
    assert store.put(chunk_id, checksum, payload) is True
    assert store.has(chunk_id)
    assert store.get(chunk_id) == (checksum, payload)
    assert store.count() == 1


def test_empty_chunk(store):
    chunk_id, checksum, payload = chunk(b"")
    assert store.put(chunk_id, checksum, payload)
    assert store.get(chunk_id) == (checksum, b"")


def test_chunk_file_lands_in_its_shard(store, data_dir):
    chunk_id, checksum, payload = chunk(b"sharded")
    store.put(chunk_id, checksum, payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    assert files_under(data_dir) == [str(path.relative_to(data_dir))]
    data = path.read_bytes()
    assert data == MAGIC + bytes.fromhex(checksum) + payload
    assert store.path_for(chunk_id) == str(path)


def test_wrong_checksum_is_refused_and_leaves_nothing(store, data_dir):
    chunk_id, _, payload = chunk(b"what the client meant")
    wrong = hashing.checksum(b"what arrived")
    with pytest.raises(ChecksumMismatch) as raised:
        store.put(chunk_id, wrong, payload)
    assert raised.value.code == "checksum-mismatch"
    assert files_under(data_dir) == []
    assert not store.has(chunk_id)
    assert store.count() == 0


def test_malformed_checksum_is_refused(store, data_dir):
    chunk_id, checksum, payload = chunk(b"payload")
    for bad in ("", "nothex", checksum.upper(), checksum[:-2], bytes.fromhex(checksum)):
        with pytest.raises(ChecksumMismatch):
            store.put(chunk_id, bad, payload)
    assert files_under(data_dir) == []


def test_put_of_a_held_chunk_returns_false(store, data_dir):
    chunk_id, checksum, payload = chunk(b"twice")
    assert store.put(chunk_id, checksum, payload) is True
    assert store.put(chunk_id, checksum, payload) is False
    assert store.count() == 1
    assert len(files_under(data_dir)) == 1
    assert os.listdir(data_dir / "incoming") == []


BAD_IDS = [
    "../../etc/passwd",
    "../" + "a" * 61,
    "A" * 64,
    hashing.chunk_id(b"x").upper(),
    "abc",
    hashing.chunk_id(b"x")[:-1],
    hashing.chunk_id(b"x") + "0",
    "",
    "/" + "a" * 63,
    "a" * 63 + "\x00",
    "g" * 64,
]


def test_invalid_chunk_ids_are_refused_and_nothing_is_written(subtests, tmp_path, store):
    _, checksum, payload = chunk(b"attacker bytes")
    for bad_id in BAD_IDS:
        with subtests.test(chunk_id=bad_id):
            with pytest.raises(InvalidChunkId) as raised:
                store.put(bad_id, checksum, payload)
            assert raised.value.code == "invalid-chunk-id"
            with pytest.raises(InvalidChunkId):
                store.get(bad_id)
            with pytest.raises(InvalidChunkId):
                store.has(bad_id)
            assert files_under(tmp_path) == []
            assert store.count() == 0


def test_get_of_a_missing_chunk(store):
    with pytest.raises(ChunkMissing):
        store.get(hashing.chunk_id(b"never stored"))


def _damage_payload(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[HEADER + 10] ^= 0x01
    return bytes(flipped)


def _damage_checksum(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(MAGIC) + 3] ^= 0x80
    return bytes(flipped)


DAMAGE = {
    "flipped payload bit": _damage_payload,
    "flipped stored checksum": _damage_checksum,
    "truncated payload": lambda data: data[:-1],
    "truncated to the header": lambda data: data[:HEADER],
    "truncated inside the header": lambda data: data[: HEADER - 5],
    "truncated to nothing": lambda data: b"",
    "damaged magic": lambda data: b"X" + data[1:],
    "appended bytes": lambda data: data + b"\x00",
}


def test_corrupt_chunk_is_quarantined_not_served(subtests, tmp_path):
    for case, damage in DAMAGE.items():
        with subtests.test(msg=case):
            _check_quarantine(tmp_path / case.replace(" ", "-"), damage)


def _check_quarantine(data_dir, damage):
    store = ChunkStore(str(data_dir))
    chunk_id, checksum, payload = chunk(bytes(range(256)) * 8)
    other_id, other_checksum, other_payload = chunk(b"an intact neighbour")
    store.put(chunk_id, checksum, payload)
    store.put(other_id, other_checksum, other_payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)

    with pytest.raises(ChunkCorrupt) as raised:
        store.get(chunk_id)
    assert raised.value.code == "chunk-corrupt"
    assert not path.exists()
    assert not store.has(chunk_id)
    quarantined = list((data_dir / "quarantine").iterdir())
    assert len(quarantined) == 1
    assert quarantined[0].name.startswith(chunk_id)
    assert quarantined[0].read_bytes() == damaged  # kept as it was found, for inspection
    assert store.count() == 1
    assert list(store.chunk_ids()) == [other_id]
    with pytest.raises(ChunkMissing):
        store.get(chunk_id)
    assert store.get(other_id) == (other_checksum, other_payload)


def test_quarantined_chunk_can_be_stored_again(store, data_dir):
    chunk_id, checksum, payload = chunk(b"repairable")
    store.put(chunk_id, checksum, payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ChunkCorrupt):
        store.get(chunk_id)
    assert store.put(chunk_id, checksum, payload) is True
    assert store.get(chunk_id) == (checksum, payload)
    assert store.count() == 1
    assert len(list((data_dir / "quarantine").iterdir())) == 1


def test_every_quarantined_copy_is_kept(store, data_dir):
    chunk_id, checksum, payload = chunk(b"damaged twice over")
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    for _ in range(2):
        store.put(chunk_id, checksum, payload)
        path.write_bytes(b"garbage")
        with pytest.raises(ChunkCorrupt):
            store.get(chunk_id)
    assert len(list((data_dir / "quarantine").iterdir())) == 2


def test_leftovers_in_incoming_are_removed_when_a_store_opens(data_dir):
    store = ChunkStore(str(data_dir))
    kept_id, kept_checksum, kept_payload = chunk(b"completed before the crash")
    store.put(kept_id, kept_checksum, kept_payload)
    # A crash mid-write leaves a partial file in incoming/, never renamed into chunks/.
    half_id, half_checksum, half_payload = chunk(b"interrupted" * 1000)
    partial = data_dir / "incoming" / f"{half_id}.0123456789abcdef"
    partial.write_bytes(MAGIC + bytes.fromhex(half_checksum) + half_payload[:100])
    (data_dir / "incoming" / "stray").write_bytes(b"x")

    reopened = ChunkStore(str(data_dir))
    assert os.listdir(data_dir / "incoming") == []
    assert not reopened.has(half_id)
    assert list(reopened.chunk_ids()) == [kept_id]
    assert reopened.count() == 1
    assert reopened.get(kept_id) == (kept_checksum, kept_payload)


def test_chunk_ids_lists_held_chunks(store):
    ids = []
    for i in range(20):
        chunk_id, checksum, payload = chunk(f"chunk {i}".encode())
        store.put(chunk_id, checksum, payload)
        ids.append(chunk_id)
    assert sorted(store.chunk_ids()) == sorted(ids)
    assert len(set(store.chunk_ids())) == 20


def test_chunk_ids_ignores_foreign_files(store, data_dir):
    chunk_id, checksum, payload = chunk(b"real")
    store.put(chunk_id, checksum, payload)
    (data_dir / "chunks" / "README").write_text("not a shard")
    (data_dir / "chunks" / chunk_id[:2] / "notes.txt").write_text("not a chunk")
    assert list(store.chunk_ids()) == [chunk_id]
    assert ChunkStore(str(data_dir)).count() == 1


def test_count_survives_reopening(data_dir):
    store = ChunkStore(str(data_dir))
    for i in range(5):
        store.put(*chunk(f"persistent {i}".encode()))
    assert store.count() == 5
    reopened = ChunkStore(str(data_dir))
    assert reopened.count() == 5
    assert sorted(reopened.chunk_ids()) == sorted(store.chunk_ids())
    assert reopened.put(*chunk(b"persistent 0")) is False
    assert reopened.count() == 5


def test_free_bytes_is_reported(store):
    assert store.free_bytes() > 0
