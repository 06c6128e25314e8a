"""Sealing chunks and objects, and key objects (``sdbackup.sealing``): pure functions."""

import attrs
import pytest

from sdbackup import hashing, objects, sealing
from sdbackup.objects import Kind, Node

MASTER = bytes(range(32))
#: The smallest scrypt cost a key object may carry: keeps these tests fast.
CHEAP = 2**10


def _tree() -> bytes:
    chunk = bytes.fromhex(hashing.chunk_id(b"x"))
    return objects.encode_tree(objects.make_tree([
        Node(name=b"secret-name.txt", type="file", size=1, content=(chunk,)),
        Node(name=b"sub", type="dir", subtree=bytes(32)),
    ]))


def _snapshot(**fields) -> objects.Snapshot:
    values = dict(time_ns=1_700_000_000 * 10**9, host="box", paths=(b"/home/secret-path",),
                  tree=bytes(32), tags=("secret-tag",), parent=bytes([1]) * 32, user="secret-user",
                  summary={"files": 3, "dirs": 1, "bytes": 10})
    values.update(fields)
    return objects.Snapshot(**values)


def test_a_data_chunk_is_sealed_deterministically_and_opens_to_its_plaintext():
    sealer = sealing.Sealer("default", MASTER)
    plain = b"the marker " * 1000
    sealed = sealer.seal(Kind.DATA, plain)
    assert sealed == sealer.seal(Kind.DATA, plain)  # same plaintext, same bytes: dedup works
    assert b"marker" not in sealed
    assert sealed[0] == sealing.FORMAT_PLAIN and len(sealed) == len(plain) + sealing.OVERHEAD
    assert sealer.open(Kind.DATA, sealed) == plain
    # The id is the plain hash of the sealed bytes, which servers check; another repository,
    # or another master key, gives other bytes and another id.
    [(chunk_id, data)] = sealer.seal_chunks([(b"", memoryview(plain))])
    assert chunk_id.hex() == hashing.checksum(data) and data == sealed
    assert sealer.seal_pieces([memoryview(plain)]) == [(chunk_id, sealed)]
    assert sealing.Sealer("other", MASTER).seal(Kind.DATA, plain) != sealed
    assert sealing.Sealer("default", bytes(32)).seal(Kind.DATA, plain) != sealed


def test_a_plaintext_repository_stores_each_piece_as_it_is_under_its_hash():
    pieces = [memoryview(b"first piece"), memoryview(b"second")]
    chunks = sealing.PLAIN.seal_pieces(pieces)
    assert [(chunk_id.hex(), bytes(data)) for chunk_id, data in chunks] == [
        (hashing.chunk_id(b"first piece"), b"first piece"), (hashing.chunk_id(b"second"), b"second")]


def test_sealed_bytes_that_are_damaged_or_of_another_key_or_kind_do_not_open():
    sealer = sealing.Sealer("default", MASTER)
    sealed = sealer.seal(Kind.DATA, b"content")
    damaged = bytearray(sealed)
    damaged[-1] ^= 1
    for bad, kind, why in [(bytes(damaged), Kind.DATA, "does not open"),
                           (sealed, Kind.TREE, "does not open"),
                           (sealed[:10], Kind.DATA, "too short"),
                           (b"\x07" + sealed[1:], Kind.DATA, "newer sdbackup")]:
        with pytest.raises(sealing.SealError, match=why):
            sealer.open_bytes(kind, bad)
    with pytest.raises(sealing.SealError, match="does not open"):
        sealing.Sealer("other", MASTER).open(Kind.DATA, sealed)


def test_a_tree_keeps_its_refs_readable_and_its_names_sealed():
    sealer = sealing.Sealer("default", MASTER)
    plain = _tree()
    sealed = sealer.seal(Kind.TREE, plain)
    envelope, original = objects.open_envelope(sealed, Kind.TREE), objects.open_envelope(plain)
    assert envelope.sealed and not original.sealed
    assert (envelope.tree_refs, envelope.data_refs) == (original.tree_refs, original.data_refs)
    assert b"secret-name" not in sealed
    assert sealer.open(Kind.TREE, sealed) == plain
    assert objects.decode_tree(sealer.open(Kind.TREE, sealed)) == objects.decode_tree(plain)
    # Without the key a decoder refuses the sealed body rather than misread it.
    with pytest.raises(objects.ObjectFormatError, match="encrypted"):
        objects.decode_tree(sealed)
    with pytest.raises(sealing.SealError, match="encrypted"):
        sealing.PLAIN.open(Kind.TREE, sealed)
    list_plain = objects.encode_chunk_list([bytes(32)] * 3)
    assert sealer.open(Kind.LIST, sealer.seal(Kind.LIST, list_plain)) == list_plain


def test_a_snapshot_shows_only_time_host_repository_tree_and_counts():
    sealer = sealing.Sealer("alpha", MASTER)
    snapshot = _snapshot()
    sealed = sealer.seal(Kind.SNAPSHOT, objects.encode_snapshot(snapshot))
    for secret in (b"secret-path", b"secret-tag", bytes([1]) * 32, b"secret-user"):
        assert secret not in sealed
    public = objects.decode_snapshot(sealed)
    assert public == objects.Snapshot(time_ns=snapshot.time_ns, host="box", paths=(),
                                      tree=snapshot.tree, summary=snapshot.summary, repo="alpha")
    assert sealer.owns(public) and not sealing.Sealer("beta", MASTER).owns(public)
    assert not sealing.PLAIN.owns(public)
    opened = objects.decode_snapshot(sealer.open(Kind.SNAPSHOT, sealed))
    assert opened == attrs.evolve(snapshot, repo="alpha")
    # Another repository's key does not open it.
    with pytest.raises(sealing.SealError):
        sealing.Sealer("beta", MASTER).open(Kind.SNAPSHOT, sealed)


def test_a_plaintext_snapshot_encodes_as_before():
    snapshot = _snapshot()
    assert b"repo" not in objects.encode_snapshot(snapshot)
    assert objects.decode_snapshot(objects.encode_snapshot(snapshot)) == snapshot


def test_a_snapshot_whose_public_part_was_changed_does_not_open():
    sealer = sealing.Sealer("alpha", MASTER)
    sealed = sealer.seal(Kind.SNAPSHOT, objects.encode_snapshot(_snapshot()))
    forged_public = _snapshot(host="elsewhere")
    forged = objects.seal(Kind.SNAPSHOT, [forged_public.tree], [],
                          objects.public_snapshot_body(attrs.evolve(forged_public, repo="alpha"),
                                                       objects.sealed_details(sealed)),
                          sealed=True)
    with pytest.raises(sealing.SealError, match="public part"):
        sealer.open(Kind.SNAPSHOT, forged)


def test_a_key_object_wraps_the_master_key_under_a_password():
    key = sealing.wrap(MASTER, "default", b"pw", host="box", user="me", n=CHEAP)
    data = sealing.encode_key(key)
    assert MASTER not in data
    decoded = sealing.decode_key(data)
    assert decoded == key and decoded.n == CHEAP and decoded.r == sealing.SCRYPT_R
    assert sealing.unwrap(decoded, b"pw") == MASTER
    with pytest.raises(sealing.WrongPassword):
        sealing.unwrap(decoded, b"other")
    # The same password makes another key object (another salt), for the same master key.
    again = sealing.wrap(MASTER, "default", b"pw", n=CHEAP)
    assert again.salt != key.salt and sealing.unwrap(again, b"pw") == MASTER
    # A key object moved to another repository's name does not open.
    with pytest.raises(sealing.WrongPassword):
        sealing.unwrap(attrs.evolve(key, repo="other"), b"pw")


def test_new_keys_use_the_real_scrypt_cost():
    assert sealing.SCRYPT_N >= 2**15


@pytest.mark.parametrize("change, why", [
    ({"n": 2**20}, "out of bounds"),
    ({"n": 1000}, "out of bounds"),
    ({"r": 64}, "out of bounds"),
    ({"wrapped": b"short"}, "out of bounds"),
    ({"repo": "../x"}, "repository name"),
    ({"host": 5}, "wrong types"),
])
def test_a_hostile_key_object_is_refused_before_any_scrypt(change, why):
    key = attrs.evolve(sealing.wrap(MASTER, "default", b"pw", n=CHEAP), **change)
    with pytest.raises(objects.ObjectFormatError, match=why):
        sealing.decode_key(sealing.encode_key(key))


def test_repository_names():
    assert sealing.repo_problem("default") is None
    assert sealing.repo_problem("host-1.backups_2") is None
    for bad in ("", "-x", "a/b", "x" * 65, "é", None):
        assert sealing.repo_problem(bad) is not None


def test_a_tag_change_shows_which_snapshot_it_replaces():
    sealer = sealing.Sealer("alpha", MASTER)
    changed = _snapshot(original=bytes([2]) * 32, generation=1, tags=("new-secret-tag",))
    sealed = sealer.seal(Kind.SNAPSHOT, objects.encode_snapshot(changed))
    public = objects.decode_snapshot(sealed)
    assert (public.original, public.generation, public.tags) == (bytes([2]) * 32, 1, ())
    assert b"new-secret-tag" not in sealed
    assert objects.decode_snapshot(sealer.open(Kind.SNAPSHOT, sealed)).tags == ("new-secret-tag",)


def test_a_plaintext_mark_holds_no_key_and_says_so():
    mark = sealing.plaintext_mark("open", host="box", user="me")
    decoded = sealing.decode_key(sealing.encode_key(mark))
    assert decoded == mark and decoded.encryption == sealing.NONE and not decoded.wrapped
    # A mark that carries key material, or an encryption nobody knows, is no key object.
    with pytest.raises(objects.ObjectFormatError, match="holds no key"):
        sealing.decode_key(sealing.encode_key(attrs.evolve(mark, wrapped=b"x" * 48)))
    with pytest.raises(objects.ObjectFormatError, match="unknown encryption"):
        sealing.decode_key(sealing.encode_key(attrs.evolve(mark, encryption="rot13")))


def test_an_encrypted_key_object_encodes_as_before_the_plaintext_mark_existed():
    key = sealing.wrap(MASTER, "default", b"pw", n=CHEAP)
    assert b"encryption" not in sealing.encode_key(key)  # (its id is what it was)
    assert sealing.decode_key(sealing.encode_key(key)).encryption == sealing.ENCRYPTED


def test_a_named_plaintext_repository_names_itself_in_its_snapshots():
    data = objects.encode_snapshot(_snapshot())
    assert sealing.PlainSealer().seal(Kind.SNAPSHOT, data) == data  # default: as before
    named = objects.decode_snapshot(sealing.PlainSealer("open").seal(Kind.SNAPSHOT, data))
    assert named == attrs.evolve(_snapshot(), repo="open")
    assert sealing.PlainSealer("open").owns(named) and not sealing.PLAIN.owns(named)
    assert sealing.PLAIN.owns(_snapshot()) and not sealing.PlainSealer("open").owns(_snapshot())
