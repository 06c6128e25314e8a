"""ChunkStore: verified, durable, content-addressed chunk files on a real disk."""

import os

import pytest

from sdbackup import hashing, objects
from sdbackup.services.chunkstore import (
    HEADER_SIZE,
    KIND_CODES,
    MAGIC,
    BadObject,
    ChecksumMismatch,
    ChunkCorrupt,
    ChunkMissing,
    ChunkStore,
    FolderInUse,
    InvalidChunkId,
)

HEADER = HEADER_SIZE
DATA = "data"


def chunk(data: bytes) -> tuple[str, str, bytes]:
    return hashing.chunk_id(data), hashing.checksum(data), data


def an_object(kind: str, data: bytes) -> tuple[str, str, bytes]:
    return hashing.object_id(kind, data), hashing.checksum(data), data


def a_tree(*names: bytes) -> bytes:
    return objects.encode_tree(objects.make_tree(
        objects.Node(name=n, type="file", content=(hashing.DIGEST_SIZE * b"\x01",)) for n in names))


def a_snapshot(host: str = "host") -> bytes:
    return objects.encode_snapshot(objects.Snapshot(
        time_ns=1_700_000_000_000_000_000, host=host, paths=(b"/home",),
        tree=bytes.fromhex(an_object("tree", a_tree(b"a"))[0]), summary={"files": 1}))


def files_under(folder) -> list[str]:
    """The files a store keeps under ``folder``, its lock and identity files left out (chunk
    files are named by their hex ids, never ``lock`` or ``identity``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in ("lock", "identity"))


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def store(data_dir):
    return ChunkStore(str(data_dir))


def test_put_then_get_returns_the_bytes_and_checksum(store):
    chunk_id, checksum, payload = chunk(b"some bytes worth keeping" * 100)
    assert store.put(DATA, chunk_id, checksum, payload) is True
    assert store.has(chunk_id)
    assert store.get(chunk_id) == (DATA, checksum, payload)
    assert store.count() == 1


def test_empty_chunk(store):
    chunk_id, checksum, payload = chunk(b"")
    assert store.put(DATA, chunk_id, checksum, payload)
    assert store.get(chunk_id) == (DATA, checksum, b"")


def test_chunk_file_lands_in_its_shard(store, data_dir):
    chunk_id, checksum, payload = chunk(b"sharded")
    store.put(DATA, chunk_id, checksum, payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    assert files_under(data_dir) == [str(path.relative_to(data_dir))]
    data = path.read_bytes()
    assert data == MAGIC + bytes([KIND_CODES[DATA]]) + bytes.fromhex(checksum) + payload
    assert store.path_for(chunk_id) == str(path)


def test_wrong_checksum_is_refused_and_leaves_nothing(store, data_dir):
    chunk_id, _, payload = chunk(b"what the client meant")
    wrong = hashing.checksum(b"what arrived")
    with pytest.raises(ChecksumMismatch) as raised:
        store.put(DATA, chunk_id, wrong, payload)
    assert raised.value.code == "checksum-mismatch"
    assert files_under(data_dir) == []
    assert not store.has(chunk_id)
    assert store.count() == 0


def test_malformed_checksum_is_refused(store, data_dir):
    chunk_id, checksum, payload = chunk(b"payload")
    for bad in ("", "nothex", checksum.upper(), checksum[:-2], bytes.fromhex(checksum)):
        with pytest.raises(ChecksumMismatch):
            store.put(DATA, chunk_id, bad, payload)
    assert files_under(data_dir) == []


def test_put_of_a_held_chunk_returns_false(store, data_dir):
    chunk_id, checksum, payload = chunk(b"twice")
    assert store.put(DATA, chunk_id, checksum, payload) is True
    assert store.put(DATA, chunk_id, checksum, payload) is False
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
                store.put(DATA, bad_id, checksum, payload)
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
    flipped[len(MAGIC) + 1 + 3] ^= 0x80
    return bytes(flipped)


DAMAGE = {
    "flipped payload bit": _damage_payload,
    "flipped stored checksum": _damage_checksum,
    "truncated payload": lambda data: data[:-1],
    "truncated to the header": lambda data: data[:HEADER],
    "truncated inside the header": lambda data: data[: HEADER - 5],
    "truncated to nothing": lambda data: b"",
    "damaged magic": lambda data: b"X" + data[1:],
    "flipped kind bit": lambda data: data[: len(MAGIC)] + bytes([data[len(MAGIC)] ^ 0x01])
    + data[len(MAGIC) + 1 :],
    "old format": lambda data: b"SDBCHNK1" + data[len(MAGIC) + 1 :],
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
    store.put(DATA, chunk_id, checksum, payload)
    store.put(DATA, other_id, other_checksum, other_payload)
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
    assert store.get(other_id) == (DATA, other_checksum, other_payload)


def test_quarantined_chunk_can_be_stored_again(store, data_dir):
    chunk_id, checksum, payload = chunk(b"repairable")
    store.put(DATA, chunk_id, checksum, payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ChunkCorrupt):
        store.get(chunk_id)
    assert store.put(DATA, chunk_id, checksum, payload) is True
    assert store.get(chunk_id) == (DATA, checksum, payload)
    assert store.count() == 1
    assert len(list((data_dir / "quarantine").iterdir())) == 1


def test_every_quarantined_copy_is_kept(store, data_dir):
    chunk_id, checksum, payload = chunk(b"damaged twice over")
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    for _ in range(2):
        store.put(DATA, chunk_id, checksum, payload)
        path.write_bytes(b"garbage")
        with pytest.raises(ChunkCorrupt):
            store.get(chunk_id)
    assert len(list((data_dir / "quarantine").iterdir())) == 2


def test_leftovers_in_incoming_are_removed_when_a_store_opens(data_dir):
    store = ChunkStore(str(data_dir))
    kept_id, kept_checksum, kept_payload = chunk(b"completed before the crash")
    store.put(DATA, kept_id, kept_checksum, kept_payload)
    # A crash mid-write leaves a partial file in incoming/, never renamed into chunks/.
    half_id, half_checksum, half_payload = chunk(b"interrupted" * 1000)
    partial = data_dir / "incoming" / f"{half_id}.0123456789abcdef"
    partial.write_bytes(MAGIC + b"\x00" + bytes.fromhex(half_checksum) + half_payload[:100])
    (data_dir / "incoming" / "stray").write_bytes(b"x")

    store.close()
    reopened = ChunkStore(str(data_dir))
    assert os.listdir(data_dir / "incoming") == []
    assert not reopened.has(half_id)
    assert list(reopened.chunk_ids()) == [kept_id]
    assert reopened.count() == 1
    assert reopened.get(kept_id) == (DATA, kept_checksum, kept_payload)


def test_chunk_ids_lists_held_chunks(store):
    ids = []
    for i in range(20):
        chunk_id, checksum, payload = chunk(f"chunk {i}".encode())
        store.put(DATA, chunk_id, checksum, payload)
        ids.append(chunk_id)
    assert sorted(store.chunk_ids()) == sorted(ids)
    assert len(set(store.chunk_ids())) == 20


def test_chunk_ids_ignores_foreign_files(store, data_dir):
    chunk_id, checksum, payload = chunk(b"real")
    store.put(DATA, chunk_id, checksum, payload)
    (data_dir / "chunks" / "README").write_text("not a shard")
    (data_dir / "chunks" / chunk_id[:2] / "notes.txt").write_text("not a chunk")
    assert list(store.chunk_ids()) == [chunk_id]
    store.close()
    assert ChunkStore(str(data_dir)).count() == 1


def test_count_survives_reopening(data_dir):
    store = ChunkStore(str(data_dir))
    for i in range(5):
        store.put(DATA, *chunk(f"persistent {i}".encode()))
    assert store.count() == 5
    store.close()
    reopened = ChunkStore(str(data_dir))
    assert reopened.count() == 5
    assert sorted(reopened.chunk_ids()) == sorted(store.chunk_ids())
    assert reopened.put(DATA, *chunk(b"persistent 0")) is False
    assert reopened.count() == 5


def test_free_bytes_is_reported(store):
    assert store.free_bytes() > 0


# --- kinds -------------------------------------------------------------------------


def test_objects_keep_their_kind(store, data_dir):
    tree = an_object("tree", a_tree(b"a", b"b"))
    chunk_list = an_object("list", objects.encode_chunk_list([b"\x02" * 32, b"\x03" * 32]))
    snapshot = an_object("snapshot", a_snapshot())
    assert store.put_many("tree", [tree]) == [(tree[0], len(tree[2]))]
    assert store.put_many("list", [chunk_list]) == [(chunk_list[0], len(chunk_list[2]))]
    assert store.put_many("snapshot", [snapshot]) == [(snapshot[0], len(snapshot[2]))]
    assert store.get(tree[0]) == ("tree", tree[1], tree[2])
    assert store.get(chunk_list[0]) == ("list", chunk_list[1], chunk_list[2])
    assert store.get(snapshot[0]) == ("snapshot", snapshot[1], snapshot[2])
    # Trees and lists are sharded with the data; snapshots have a folder of their own.
    assert files_under(data_dir) == sorted([
        f"chunks/{tree[0][:2]}/{tree[0]}", f"chunks/{chunk_list[0][:2]}/{chunk_list[0]}",
        f"snapshots/{snapshot[0]}"])
    assert store.path_for(snapshot[0]) == str(data_dir / "snapshots" / snapshot[0])
    assert store.count() == 3


@pytest.mark.parametrize("kind", ["tree", "list", "snapshot"])
def test_an_object_that_is_not_an_envelope_of_its_kind_is_refused(subtests, store, data_dir, kind):
    wrong = {
        "raw bytes": b"just some file bytes",
        "empty": b"",
        "an envelope of another kind": a_tree(b"x") if kind != "tree" else a_snapshot(),
        "a truncated envelope": a_tree(b"x", b"y")[:20],
    }
    good = an_object(kind, {"tree": a_tree(b"ok"), "list": objects.encode_chunk_list([b"\x04" * 32]),
                            "snapshot": a_snapshot("good")}[kind])
    for case, payload in wrong.items():
        with subtests.test(msg=case):
            bad = an_object(kind, payload)
            with pytest.raises(BadObject) as raised:
                store.put_many(kind, [good, bad])
            assert raised.value.code == "bad-object"
            assert kind in str(raised.value)
            # Nothing of the pack was written, the good object neither.
            assert files_under(data_dir) == []
            assert store.count() == 0


def test_data_chunks_may_hold_any_bytes(store):
    # File bytes that happen to look like an object stay file bytes.
    looks_like_a_tree = chunk(a_tree(b"x"))
    assert store.put_many(DATA, [looks_like_a_tree]) == [(looks_like_a_tree[0], len(looks_like_a_tree[2]))]
    assert store.get(looks_like_a_tree[0])[0] == DATA


def test_an_unknown_kind_is_refused(store, data_dir):
    with pytest.raises(BadObject):
        store.put_many("secret", [chunk(b"x")])
    assert files_under(data_dir) == []


def test_bytes_under_an_id_that_is_not_their_hash_are_refused(store, data_dir):
    # Otherwise later backups would count on the id for data it does not hold.
    real = chunk(b"the real content")
    forged = (real[0], hashing.checksum(b"other bytes"), b"other bytes")
    with pytest.raises(InvalidChunkId, match="the id is not the hash of the bytes"):
        store.put(DATA, *forged)
    assert not store.has(real[0])
    # The same for objects, and for an object's id sent as another kind.
    tree = an_object("tree", a_tree(b"a"))
    with pytest.raises(InvalidChunkId):
        store.put("tree", tree[0], *an_object("tree", a_tree(b"b"))[1:])
    store.put("tree", *tree)
    with pytest.raises(InvalidChunkId):
        store.put(DATA, *tree)
    assert store.get(tree[0])[0] == "tree"
    # A pack with one forged id stores none of the others.
    fresh = chunk(b"innocent bystander")
    with pytest.raises(InvalidChunkId):
        store.put_many(DATA, [fresh, forged])
    assert not store.has(fresh[0])
    assert files_under(data_dir / "incoming") == []


def test_a_snapshot_found_among_the_chunks_is_corrupt(store, data_dir):
    # A snapshot's file lives in snapshots/; anywhere else it was not put there by the store.
    snapshot = an_object("snapshot", a_snapshot())
    store.put("snapshot", *snapshot)
    moved = data_dir / "chunks" / snapshot[0][:2] / snapshot[0]
    moved.parent.mkdir()
    (data_dir / "snapshots" / snapshot[0]).rename(moved)
    with pytest.raises(ChunkCorrupt):
        store.get(snapshot[0])
    assert not moved.exists()


def test_listing_gives_payload_sizes_and_the_snapshots(store, data_dir):
    data = [chunk(bytes([i]) * (1000 * i)) for i in range(5)]
    store.put_many(DATA, data)
    tree = an_object("tree", a_tree(b"t"))
    store.put("tree", *tree)
    snapshots = [an_object("snapshot", a_snapshot(f"host{i}")) for i in range(3)]
    store.put_many("snapshot", snapshots)
    (data_dir / "chunks" / "README").write_text("not a shard")
    (data_dir / "snapshots" / "notes.txt").write_text("not a snapshot")
    held, snapshot_ids = store.listing()
    expected = {c[0]: len(c[2]) for c in [*data, tree, *snapshots]}
    assert dict(held) == expected
    assert len(held) == len(expected)
    assert sorted(snapshot_ids) == sorted(s[0] for s in snapshots)
    assert sorted(store.snapshot_ids()) == sorted(snapshot_ids)
    assert sorted(store.chunk_ids()) == sorted(expected)
    store.close()
    assert ChunkStore(str(data_dir)).count() == len(expected)


def test_a_truncated_file_lists_with_size_zero(store, data_dir):
    chunk_id, checksum, payload = chunk(b"soon damaged")
    store.put(DATA, chunk_id, checksum, payload)
    path = data_dir / "chunks" / chunk_id[:2] / chunk_id
    path.write_bytes(path.read_bytes()[:5])
    assert store.listing() == ([(chunk_id, 0)], [])


def test_a_second_store_on_the_same_folder_is_refused_until_the_first_closes(store, data_dir):
    # Two servers on one disk would be counted as two copies of every chunk.
    with pytest.raises(FolderInUse, match=f"in use by another sdbackup-server \\(pid {os.getpid()}\\)"):
        ChunkStore(str(data_dir))
    store.close()
    ChunkStore(str(data_dir)).close()
