"""ChunkStore: verified, durable, content-addressed chunk files on a real disk."""

import errno
import os
import re
import resource
import shutil
import time
from pathlib import Path

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
    ChunkStoreError,
    DiskFull,
    FolderInUse,
    InvalidChunkId,
    KindConflict,
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


def listing(store, page_size: int = 1000) -> tuple[list[tuple[str, int]], list[str]]:
    """What the pages of ``listing_pages`` hold: ``(id, size)`` pairs, and the snapshot ids."""
    rows = [row for page in store.listing_pages(page_size) for row in page]
    return [(i, size) for i, size, _ in rows], [i for i, _, is_snapshot in rows if is_snapshot]


@pytest.mark.parametrize("page_size", [1, 3, 9, 10, 1000])
def test_listing_pages_hold_every_chunk_once_at_most_a_page_each(store, page_size):
    """Nine chunks in pages of 1, 3, 9, 10 or 1000: full pages but the last (none empty),
    every chunk once, and nothing read before a page is asked for."""
    data = [chunk(bytes([i]) * (100 + i)) for i in range(9)]
    store.put_many(DATA, data)
    pages = store.listing_pages(page_size)
    store.put(DATA, *chunk(b"stored before the listing was read"))
    found = list(pages)
    assert [len(p) for p in found[:-1]] == [page_size] * (len(found) - 1)
    assert 0 < len(found[-1]) <= page_size
    assert sorted(row[0] for p in found for row in p) == sorted(
        [c[0] for c in data] + [hashing.chunk_id(b"stored before the listing was read")])


def test_listing_gives_payload_sizes_and_the_snapshots(store, data_dir):
    data = [chunk(bytes([i]) * (1000 * i)) for i in range(5)]
    store.put_many(DATA, data)
    tree = an_object("tree", a_tree(b"t"))
    store.put("tree", *tree)
    snapshots = [an_object("snapshot", a_snapshot(f"host{i}")) for i in range(3)]
    store.put_many("snapshot", snapshots)
    (data_dir / "chunks" / "README").write_text("not a shard")
    (data_dir / "snapshots" / "notes.txt").write_text("not a snapshot")
    held, snapshot_ids = listing(store)
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
    assert listing(store) == ([(chunk_id, 0)], [])


def test_a_second_store_on_the_same_folder_is_refused_until_the_first_closes(store, data_dir):
    # Two servers on one disk would be counted as two copies of every chunk.
    with pytest.raises(FolderInUse, match=f"in use by another sdbackup-server \\(pid {os.getpid()}\\)"):
        ChunkStore(str(data_dir))
    store.close()
    ChunkStore(str(data_dir)).close()


# --- the file format, kept across releases ----------------------------------------------


#: The kind byte of each kind in files written by every release since SDBCHNK2: a folder
#: written by one release is read by the next, so these never change.
ON_DISK_KIND_CODES = {"data": 0x00, "tree": 0x03, "list": 0x05, "snapshot": 0x06, "key": 0x09}


def a_key_object() -> bytes:
    return objects.seal("key", [], [], b"a master key wrapped under a password")


def one_of_each_kind() -> dict[str, tuple[str, str, bytes]]:
    return {"data": chunk(b"file bytes"), "tree": an_object("tree", a_tree(b"a")),
            "list": an_object("list", objects.encode_chunk_list([b"\x05" * 32])),
            "snapshot": an_object("snapshot", a_snapshot()), "key": an_object("key", a_key_object())}


def test_a_folder_written_by_an_earlier_release_reads_back_with_its_kinds(data_dir):
    made = one_of_each_kind()
    for kind, (chunk_id, checksum, payload) in made.items():
        root = kind in ("snapshot", "key")
        path = data_dir / "snapshots" / chunk_id if root else data_dir / "chunks" / chunk_id[:2] / chunk_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"SDBCHNK2" + bytes([ON_DISK_KIND_CODES[kind]]) + bytes.fromhex(checksum) + payload)
    store = ChunkStore(str(data_dir))
    assert store.count() == 5
    for kind, (chunk_id, checksum, payload) in made.items():
        assert store.get(chunk_id) == (kind, checksum, payload)
        # Storing it again finds it held as that kind: no conflict, nothing written.
        assert store.put(kind, chunk_id, checksum, payload) is False
    assert sorted(store.snapshot_ids()) == sorted([made["snapshot"][0], made["key"][0]])
    assert files_under(data_dir / "quarantine") == []


def test_the_store_writes_the_kind_codes_of_the_format(store, data_dir):
    for kind, (chunk_id, checksum, payload) in one_of_each_kind().items():
        assert store.put(kind, chunk_id, checksum, payload) is True
        data = Path(store.path_for(chunk_id)).read_bytes()
        assert data == b"SDBCHNK2" + bytes([ON_DISK_KIND_CODES[kind]]) + bytes.fromhex(checksum) + payload
    # Roots (snapshots and keys) are listed without opening any chunk.
    assert len(files_under(data_dir / "snapshots")) == 2


def test_one_flipped_bit_of_the_kind_byte_never_reads_as_another_kind(tmp_path):
    for kind, (chunk_id, checksum, payload) in one_of_each_kind().items():
        for bit in range(8):
            store = ChunkStore(str(tmp_path / f"{kind}-{bit}"))
            store.put(kind, chunk_id, checksum, payload)
            path = Path(store.path_for(chunk_id))
            data = bytearray(path.read_bytes())
            data[len(MAGIC)] ^= 1 << bit
            path.write_bytes(data)
            with pytest.raises(ChunkCorrupt, match="damaged header"):
                store.get(chunk_id)
            store.close()


def test_chunk_files_are_readable_by_the_server_alone(store):
    chunk_id, checksum, payload = chunk(b"private bytes")
    store.put(DATA, chunk_id, checksum, payload)
    assert os.stat(store.path_for(chunk_id)).st_mode & 0o777 == 0o600


# --- errors say what went wrong -----------------------------------------------------------


def test_refusals_name_the_chunk_and_the_reason(store):
    chunk_id, checksum, payload = chunk(b"what the client meant")
    wrong = hashing.checksum(b"what arrived")
    with pytest.raises(ChecksumMismatch) as raised:
        store.put(DATA, chunk_id, wrong, payload)
    assert str(raised.value) == (f"chunk {chunk_id[:16]}: received bytes hash to {checksum[:16]}, "
                                 f"expected {wrong[:16]}")
    with pytest.raises(ChecksumMismatch) as raised:
        store.put(DATA, chunk_id, "nothex", payload)
    assert str(raised.value) == "not a checksum: 'nothex'"
    with pytest.raises(InvalidChunkId) as raised:
        store.put(DATA, "abc", checksum, payload)
    assert str(raised.value) == "not a chunk id: 'abc'"
    other = chunk(b"other bytes")
    with pytest.raises(InvalidChunkId) as raised:
        store.put(DATA, chunk_id, other[1], other[2])
    assert str(raised.value) == f"data {chunk_id[:16]}: the id is not the hash of the bytes"
    bad_tree = an_object("tree", b"not a tree")
    with pytest.raises(BadObject) as raised:
        store.put("tree", *bad_tree)
    assert str(raised.value).startswith(f"tree object {bad_tree[0][:16]} is not valid: ")
    with pytest.raises(BadObject) as raised:
        store.put("secret", *chunk(b"x"))
    assert str(raised.value) == "unknown chunk kind 'secret'"
    missing = hashing.chunk_id(b"never stored")
    with pytest.raises(ChunkMissing) as raised:
        store.get(missing)
    assert str(raised.value) == f"chunk {missing[:16]} is not held here"
    assert raised.value.code == "chunk-missing"


def test_any_other_checksum_or_id_is_refused(store, data_dir):
    # Whichever side of the right value the wrong one sorts on.
    chunk_id, checksum, payload = chunk(b"the bytes sent")
    tree = an_object("tree", a_tree(b"sent"))
    for wrong in ("0" * 64, "f" * 64):
        with pytest.raises(ChecksumMismatch):
            store.put(DATA, chunk_id, wrong, payload)
        with pytest.raises(InvalidChunkId, match="the id is not the hash of the bytes"):
            store.put(DATA, wrong, checksum, payload)
        with pytest.raises(InvalidChunkId, match="the id is not the hash of the bytes"):
            store.put("tree", wrong, *tree[1:])
    assert files_under(data_dir) == []


def test_kinds_read_off_the_wire_are_the_same_kinds(store):
    # A kind decoded from a message is a new string, not the constant of the same name.
    def decoded(kind: str) -> str:
        return "".join(list(kind))

    data, tree = chunk(b"sent over the wire"), an_object("tree", a_tree(b"wire"))
    assert decoded(DATA) is not DATA
    assert store.put(decoded(DATA), *data) is True
    assert store.put(decoded("tree"), *tree) is True
    assert store.put(decoded(DATA), *data) is False
    assert store.put(decoded("tree"), *tree) is False
    assert store.get(data[0]) == (DATA, *data[1:])
    assert store.get(tree[0]) == ("tree", *tree[1:])


def test_every_damaged_payload_is_caught(store):
    for i in range(6):
        chunk_id, checksum, payload = chunk(f"chunk {i} ".encode() * 50)
        store.put(DATA, chunk_id, checksum, payload)
        path = Path(store.path_for(chunk_id))
        data = bytearray(path.read_bytes())
        data[HEADER + 3] ^= 0x01
        path.write_bytes(data)
        with pytest.raises(ChunkCorrupt, match="does not match its checksum"):
            store.get(chunk_id)
    assert store.count() == 0


def test_a_data_chunk_found_among_the_snapshots_is_corrupt(store, data_dir):
    data = chunk(b"not a root")
    store.put(DATA, *data)
    moved = data_dir / "snapshots" / data[0]
    Path(store.path_for(data[0])).rename(moved)
    with pytest.raises(ChunkCorrupt, match="damaged header"):
        store.get(data[0])
    assert not moved.exists()


def test_a_damaged_copy_is_named_in_the_error(store):
    chunk_id, checksum, payload = chunk(b"soon damaged" * 10)
    store.put(DATA, chunk_id, checksum, payload)
    path = Path(store.path_for(chunk_id))
    path.write_bytes(_damage_payload(path.read_bytes()))
    with pytest.raises(ChunkCorrupt) as raised:
        store.get(chunk_id)
    assert str(raised.value) == f"chunk {chunk_id[:16]} does not match its checksum"
    store.put(DATA, chunk_id, checksum, payload)
    path.write_bytes(b"garbage")
    with pytest.raises(ChunkCorrupt) as raised:
        store.get(chunk_id)
    assert str(raised.value) == f"chunk {chunk_id[:16]} has a damaged header"


def test_an_id_held_as_another_kind_refuses_the_whole_store(store, data_dir):
    chunk_id, checksum, payload = chunk(b"held as data")
    store.put(DATA, chunk_id, checksum, payload)
    path = Path(store.path_for(chunk_id))
    data = bytearray(path.read_bytes())
    data[len(MAGIC)] = ON_DISK_KIND_CODES["tree"]  # (as a keyed id could one day make it)
    path.write_bytes(data)
    fresh = chunk(b"a bystander in the same pack")
    with pytest.raises(KindConflict) as raised:
        store.put_many(DATA, [fresh, (chunk_id, checksum, payload)])
    assert raised.value.code == "kind-conflict"
    assert str(raised.value) == f"chunk {chunk_id[:16]} is held here as tree, not data"
    assert not store.has(fresh[0])
    assert path.read_bytes() == data
    assert os.listdir(data_dir / "incoming") == []
    tree = an_object("tree", a_tree(b"held as a tree"))
    store.put("tree", *tree)
    path = Path(store.path_for(tree[0]))
    path.write_bytes(path.read_bytes()[: len(MAGIC)] + bytes([ON_DISK_KIND_CODES["data"]])
                     + path.read_bytes()[len(MAGIC) + 1 :])
    with pytest.raises(KindConflict, match="is held here as data, not tree"):
        store.put("tree", *tree)


def test_a_held_copy_with_a_damaged_header_is_no_conflict(store):
    chunk_id, checksum, payload = chunk(b"damaged, then stored again")
    store.put(DATA, chunk_id, checksum, payload)
    path = Path(store.path_for(chunk_id))
    for damaged in (b"", b"SDBCHNK2", b"XDBCHNK2" + bytes([ON_DISK_KIND_CODES["tree"]]) + b"\x00" * 40):
        path.write_bytes(damaged)
        # Held (the next read quarantines it, then it is stored again), not refused.
        assert store.put(DATA, chunk_id, checksum, payload) is False
    with pytest.raises(ChunkCorrupt):
        store.get(chunk_id)
    assert store.put(DATA, chunk_id, checksum, payload) is True
    assert store.get(chunk_id) == (DATA, checksum, payload)


# --- storing: packs, failures, the reserve ---------------------------------------------


def test_a_chunk_twice_in_one_pack_is_stored_once(store, data_dir):
    twice, other = chunk(b"sent twice"), chunk(b"sent once")
    assert store.put_many(DATA, [twice, twice, other]) == [(twice[0], len(twice[2])),
                                                           (other[0], len(other[2]))]
    assert store.count() == 2
    assert store.get(other[0]) == (DATA, *other[1:])
    assert os.listdir(data_dir / "incoming") == []


@pytest.mark.parametrize("size", [1, 3, 4, 5, 20])
def test_a_pack_of_any_size_is_stored_whole(store, size):
    pack = [chunk(f"pack of {size}, chunk {i}".encode()) for i in range(size)]
    assert store.put_many(DATA, pack) == [(c[0], len(c[2])) for c in pack]
    assert store.count() == size
    assert all(store.get(c[0]) == (DATA, c[1], c[2]) for c in pack)
    assert store.put_many(DATA, pack) == []


def test_a_write_that_fails_midway_leaves_nothing_and_the_store_keeps_serving(store, data_dir):
    # A file size limit makes the third write fail as a full disk would (EFBIG, not ENOSPC).
    pack = [chunk(b"small one"), chunk(b"small two"), chunk(b"\x07" * (2 * 1024**2))]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024**2, hard))
    try:
        with pytest.raises(OSError) as raised:
            store.put_many(DATA, pack)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.errno == errno.EFBIG
    assert os.listdir(data_dir / "incoming") == []
    assert files_under(data_dir) == []
    assert store.count() == 0
    assert store.put_many(DATA, pack) == [(c[0], len(c[2])) for c in pack]
    assert store.get(pack[2][0]) == (DATA, *pack[2][1:])


def test_a_pack_whose_second_shard_cannot_be_made_keeps_the_first_and_leaves_no_temporary_file(
        store, data_dir):
    first, second = chunk(b"first"), chunk(b"second")
    assert first[0][:2] != second[0][:2]
    (data_dir / "chunks" / second[0][:2]).write_bytes(b"a file where the shard folder goes")
    with pytest.raises(OSError):
        store.put_many(DATA, [first, second])
    assert os.listdir(data_dir / "incoming") == []
    assert store.get(first[0]) == (DATA, *first[1:])
    assert not store.has(second[0])
    assert store.count() == 1


def _mib(size: int) -> str:
    return f"{size / 1048576:.1f} MiB"


def test_a_store_that_leaves_the_reserve_free_is_accepted(store):
    store.reserve = store.free_bytes() // 2
    assert store.put(DATA, *chunk(b"room enough")) is True


def test_a_store_larger_than_the_room_above_the_reserve_is_refused(store, data_dir):
    big = chunk(b"\x01" * (16 * 1024**2))
    store.reserve = store.free_bytes() - 8 * 1024**2  # room for half of it
    with pytest.raises(DiskFull) as raised:
        store.put(DATA, *big)
    assert raised.value.code == "disk-full"
    assert re.fullmatch(rf"the disk is full: [0-9.]+ MiB free, {re.escape(_mib(store.reserve))} kept in "
                        rf"reserve \(--reserve\), 16\.0 MiB to store", str(raised.value))
    assert files_under(data_dir) == []


def test_a_full_disk_refuses_new_chunks_but_not_those_held(store, data_dir):
    held = chunk(b"stored while there was room")
    store.put(DATA, *held)
    store.reserve = store.free_bytes() + 1024**4
    with pytest.raises(DiskFull) as raised:
        store.put(DATA, *chunk(b"no room for this"))
    assert f"{_mib(store.reserve)} kept in reserve (--reserve), 0.0 MiB to store" in str(raised.value)
    assert store.put(DATA, *held) is False  # nothing to write
    assert store.put_many(DATA, []) == []
    assert store.count() == 1
    assert os.listdir(data_dir / "incoming") == []


def test_disk_space_is_the_file_systems(store):
    free, total = store.disk_space()
    usage = shutil.disk_usage(store.root)
    assert total == usage.total
    assert abs(free - usage.free) < 256 * 1024**2  # (others write to this disk meanwhile)
    assert abs(store.free_bytes() - usage.free) < 256 * 1024**2


# --- reading many ----------------------------------------------------------------------------


def test_get_many_reads_in_order_as_many_as_fit(store):
    pack = [chunk(bytes([i]) * 100) for i in range(3)]
    store.put_many(DATA, pack)
    ids = [c[0] for c in pack]
    whole = [(c[0], (DATA, c[1], c[2])) for c in pack]
    assert store.get_many(ids, 300) == whole
    assert store.get_many(ids, 200) == whole[:2]  # exactly full
    assert store.get_many(ids, 199) == whole[:1]
    assert store.get_many(ids, 10) == whole[:1]  # at least one, however large
    assert store.get_many([], 10) == []


def test_get_many_stops_at_the_first_chunk_that_does_not_fit(store):
    # A batch is a prefix of what was asked: a smaller chunk further on waits its turn.
    pack = [chunk(b"a" * 100), chunk(b"b" * 300), chunk(b"c" * 50)]
    store.put_many(DATA, pack)
    assert store.get_many([c[0] for c in pack], 200) == [(pack[0][0], (DATA, pack[0][1], pack[0][2]))]


def test_get_many_reports_missing_and_damaged_chunks_and_reads_on(store, data_dir):
    good, damaged, after = chunk(b"g" * 100), chunk(b"d" * 100), chunk(b"a" * 100)
    snapshot = an_object("snapshot", a_snapshot())
    store.put_many(DATA, [good, damaged, after])
    store.put("snapshot", *snapshot)
    damaged_path = Path(store.path_for(damaged[0]))
    damaged_path.write_bytes(_damage_payload(damaged_path.read_bytes()))
    missing = hashing.chunk_id(b"never stored")
    found = store.get_many([missing, snapshot[0], damaged[0], good[0], after[0]], 10**6)
    assert [chunk_id for chunk_id, _ in found] == [missing, snapshot[0], damaged[0], good[0], after[0]]
    assert isinstance(found[0][1], ChunkMissing)
    assert str(found[0][1]) == f"chunk {missing[:16]} is not held here"
    assert found[1][1] == ("snapshot", snapshot[1], snapshot[2])
    assert isinstance(found[2][1], ChunkCorrupt)
    assert found[3][1] == (DATA, good[1], good[2])
    assert found[4][1] == (DATA, after[1], after[2])
    assert not damaged_path.exists()
    assert len(files_under(data_dir / "quarantine")) == 1
    assert store.count() == 3
    # Damaged and missing chunks take no room in the batch.
    assert [c for c, _ in store.get_many([missing, good[0], after[0]], 200)] == [missing, good[0], after[0]]


def test_get_many_counts_a_file_shorter_than_a_header_as_no_bytes(store):
    full, beyond, stub = chunk(b"f" * 100), chunk(b"b" * 101), chunk(b"soon a stub")
    store.put_many(DATA, [full, beyond, stub])
    stub_path = Path(store.path_for(stub[0]))
    stub_path.write_bytes(b"SDBCHNK2")
    # After a batch exactly full the stub still fits (and is found damaged) ...
    found = store.get_many([full[0], stub[0]], 100)
    assert [c for c, _ in found] == [full[0], stub[0]] and isinstance(found[1][1], ChunkCorrupt)
    # ... but not after a batch already past its size.
    store.put(DATA, *stub)
    stub_path.write_bytes(b"SDBCHNK2")
    assert [c for c, _ in store.get_many([beyond[0], stub[0]], 100)] == [beyond[0]]


# --- forgetting ------------------------------------------------------------------------------


def _age(store, chunk_id: str, seconds: float):
    then = time.time() - seconds
    os.utime(store.path_for(chunk_id), (then, then))


def test_delete_snapshots_deletes_only_roots_held(store, data_dir):
    data = chunk(b"referenced data")
    snapshot, key = an_object("snapshot", a_snapshot()), an_object("key", a_key_object())
    store.put(DATA, *data)
    store.put("snapshot", *snapshot)
    store.put("key", *key)
    unheld = an_object("snapshot", a_snapshot("elsewhere"))[0]
    assert store.delete_snapshots([unheld, data[0], snapshot[0], key[0]]) == [snapshot[0], key[0]]
    assert store.snapshot_ids() == []
    assert store.get(data[0]) == (DATA, data[1], data[2])
    assert store.count() == 1
    assert store.delete_snapshots([snapshot[0]]) == []


def test_delete_chunks_spares_fresh_chunks_and_roots(store):
    old, fresh, tree = chunk(b"old" * 1000), chunk(b"fresh"), an_object("tree", a_tree(b"old tree"))
    snapshot, key = an_object("snapshot", a_snapshot()), an_object("key", a_key_object())
    store.put_many(DATA, [old, fresh])
    store.put("tree", *tree)
    store.put("snapshot", *snapshot)
    store.put("key", *key)
    for chunk_id in (old[0], tree[0], snapshot[0], key[0]):
        _age(store, chunk_id, 3600)
    unheld = hashing.chunk_id(b"never held")
    deleted, kept = store.delete_chunks([fresh[0], snapshot[0], unheld, old[0], key[0], tree[0]], 60)
    assert deleted == [(old[0], HEADER + len(old[2])), (tree[0], HEADER + len(tree[2]))]
    assert kept == [fresh[0], snapshot[0], key[0]]
    assert not store.has(old[0]) and not store.has(tree[0])
    assert store.count() == 3
    assert sorted(store.snapshot_ids()) == sorted([snapshot[0], key[0]])
    # With no grace, the fresh chunk goes too.
    assert store.delete_chunks([fresh[0]], 0) == ([(fresh[0], HEADER + len(fresh[2]))], [])
    assert store.count() == 2


@pytest.mark.parametrize("kind", [DATA, "tree"])
def test_storing_a_held_chunk_again_renews_it_against_a_prune(store, kind):
    chunk_id, checksum, payload = (chunk(b"stored a day ago, and again now") if kind == DATA
                                   else an_object("tree", a_tree(b"stored a day ago")))
    store.put(kind, chunk_id, checksum, payload)
    _age(store, chunk_id, 86400)
    assert store.put(kind, chunk_id, checksum, payload) is False
    assert time.time() - os.stat(store.path_for(chunk_id)).st_mtime < 60
    assert store.delete_chunks([chunk_id], 3600) == ([], [chunk_id])
    assert store.get(chunk_id) == (kind, checksum, payload)


def test_a_chunk_a_prune_deletes_while_it_is_stored_again_is_written_again(store):
    """Found held, then deleted by a prune before its time is renewed: it is stored anew, not
    counted as held by a file that is gone."""
    stored = chunk(b"held, then pruned midway")
    store.put(DATA, *stored)
    real = store._held_already

    def pruned_right_after(kind, chunk_id):
        held = real(kind, chunk_id)
        os.unlink(store.path_for(chunk_id))  # as delete_chunks would, between the two steps
        return held

    store._held_already = pruned_right_after
    assert store.put_many(DATA, [stored]) == [(stored[0], len(stored[2]))]
    assert store.get(stored[0]) == (DATA, *stored[1:])


# --- listing ---------------------------------------------------------------------------------


def test_links_and_folders_the_store_did_not_make_are_not_chunks(store, data_dir, tmp_path):
    real = chunk(b"real")
    store.put(DATA, *real)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / hashing.chunk_id(b"x")).write_bytes(b"x")
    (data_dir / "chunks" / real[0][:2] / hashing.chunk_id(b"linked")).symlink_to(
        outside / hashing.chunk_id(b"x"))
    (data_dir / "snapshots" / hashing.chunk_id(b"linked root")).symlink_to(outside / hashing.chunk_id(b"x"))
    (data_dir / "chunks" / "ff").symlink_to(outside, target_is_directory=True)
    (data_dir / "chunks" / real[0][:2] / hashing.chunk_id(b"a folder")).mkdir()
    assert list(store.chunk_ids()) == [real[0]]
    assert listing(store) == ([(real[0], len(real[2]))], [])
    assert store.snapshot_ids() == []
    store.close()
    assert ChunkStore(str(data_dir)).count() == 1


def test_a_store_whose_snapshots_folder_was_removed_keeps_listing_and_storing(store, data_dir):
    data = chunk(b"still here")
    store.put(DATA, *data)
    shutil.rmtree(data_dir / "snapshots")
    assert listing(store) == ([(data[0], len(data[2]))], [])
    assert store.snapshot_ids() == []
    snapshot = an_object("snapshot", a_snapshot())
    assert store.put("snapshot", *snapshot) is True
    assert store.snapshot_ids() == [snapshot[0]]


# --- the data folder ------------------------------------------------------------------------


def test_a_stale_lock_file_names_the_new_holder_only(data_dir):
    data_dir.mkdir()
    (data_dir / "lock").write_text("4194303\n")  # left by a server that crashed
    store = ChunkStore(str(data_dir))
    assert (data_dir / "lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(FolderInUse) as raised:
        ChunkStore(str(data_dir))
    assert str(raised.value) == (f"the data folder {data_dir} is in use by another sdbackup-server "
                                 f"(pid {os.getpid()})")
    assert raised.value.code == "folder-in-use"
    store.close()


@pytest.mark.parametrize("content", ["z" * 32 + "\n", "A" * 32 + "\n", "a" * 31 + "\n", "a" * 33 + "\n",
                                     "a" * 32 + "\nmore", "a" * 32 + "b"])
def test_a_damaged_identity_is_refused_and_kept(data_dir, content):
    data_dir.mkdir()
    (data_dir / "identity").write_text(content)
    with pytest.raises(ChunkStoreError) as raised:
        ChunkStore(str(data_dir))
    assert str(raised.value) == (f"{data_dir / 'identity'} is damaged (not 32 hex digits): move it "
                                 f"aside to give the folder a new identity")
    assert (data_dir / "identity").read_text() == content


def test_an_identity_is_32_hex_digits_and_kept(data_dir):
    store = ChunkStore(str(data_dir))
    assert re.fullmatch("[0-9a-f]{32}", store.identity)
    store.close()
    (data_dir / "identity").write_text("0123456789abcdef" * 2)  # (no newline: written by hand)
    assert ChunkStore(str(data_dir)).identity == "0123456789abcdef" * 2
