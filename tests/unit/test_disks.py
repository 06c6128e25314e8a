"""Disks and servers: data folder identities, the reserve, the catalog's server records
(moved disks, draining, retiring), and the pure parts of ``sdbackup server``."""

import os
import shutil

import pytest

from sdbackup import hashing
from sdbackup.client.servers import duration, resolve, state_of
from sdbackup.client.session import ClientError
from sdbackup.objects import Kind
from sdbackup.protocols.authority import refusal
from sdbackup.protocols.messages import DrainServer, ListServers, RetireServer, ServerInfo
from sdbackup.server_tap import parse_size
from sdbackup.services.catalog import Catalog
from sdbackup.services.chunkstore import ChunkStore, ChunkStoreError, DiskFull, folder_identity

A, B, C, D = "tcp:a:1", "tcp:b:1", "tcp:c:1", "tcp:d:1"


def cid(name: str) -> str:
    return hashing.chunk_id(name.encode())


# --- data folder identity and the reserve -----------------------------------------------


def test_a_data_folder_keeps_its_identity_and_a_copy_has_the_same(tmp_path):
    store = ChunkStore(str(tmp_path / "data"))
    identity = store.identity
    store.close()
    assert len(identity) == 32 and int(identity, 16) >= 0
    assert (tmp_path / "data" / "identity").read_text() == identity + "\n"
    again = ChunkStore(str(tmp_path / "data"))
    assert again.identity == identity
    again.close()
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    assert folder_identity(str(tmp_path / "copy")) == identity
    (tmp_path / "other").mkdir()
    assert folder_identity(str(tmp_path / "other")) != identity


def test_a_damaged_identity_file_is_refused_not_replaced(tmp_path):
    (tmp_path / "identity").write_text("not an identity\n")
    with pytest.raises(ChunkStoreError, match="identity is damaged"):
        folder_identity(str(tmp_path))
    assert (tmp_path / "identity").read_text() == "not an identity\n"


def test_a_store_that_would_eat_into_the_reserve_is_refused_and_writes_nothing(tmp_path):
    store = ChunkStore(str(tmp_path / "data"))
    try:
        kept = b"stored before"
        store.put(Kind.DATA, hashing.chunk_id(kept), hashing.checksum(kept), kept)
        store.reserve = store.free_bytes() + 1024**3
        payload = b"refused"
        with pytest.raises(DiskFull, match=r"the disk is full: .* kept in reserve") as refused:
            store.put(Kind.DATA, hashing.chunk_id(payload), hashing.checksum(payload), payload)
        assert refused.value.code == "disk-full"
        assert not store.has(hashing.chunk_id(payload))
        assert os.listdir(store.incoming) == []
        assert store.get(hashing.chunk_id(kept))[2] == kept
        # A chunk held already is no write: storing it again is fine when full.
        assert store.put(Kind.DATA, hashing.chunk_id(kept), hashing.checksum(kept), kept) is False
    finally:
        store.close()


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("1GiB", 1024**3), ("500MiB", 500 * 1024**2), ("2G", 2 * 1024**3),
    ("1.5GB", 1_500_000_000), ("4096", 4096), ("10 KiB", 10240)])
def test_reserve_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "-1", "1Q", "inf", "nan", "1e30TiB"])
def test_bad_reserve_sizes(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


# --- the catalog's servers ------------------------------------------------------------


@pytest.fixture
def catalog(tmp_path):
    opened = Catalog(str(tmp_path / "manager" / "catalog.sqlite"))
    yield opened
    opened.close()


def place(catalog, server: str, *names: str):
    catalog.add_locations(server, [(cid(n), 100) for n in names])


def test_a_version_5_catalog_is_migrated_keeping_its_servers(tmp_path, older_catalog):
    catalog = older_catalog(
        str(tmp_path / "catalog.sqlite"), 5,
        *(f"ALTER TABLE servers DROP COLUMN {column}" for column in ("disk_id", "draining", "retired")),
        "ALTER TABLE snapshots DROP COLUMN repo",
        "INSERT INTO servers VALUES ('tcp:a:1', 1.0, 2.0, 100, 3)")
    try:
        assert catalog.server_records() == [(A, "", 2.0, 100, 0)]
        assert catalog.draining_servers() == set()
    finally:
        catalog.close()


def test_a_disk_moved_to_a_new_address_takes_its_copies_and_draining_flag(catalog):
    catalog.record_server(A, 100, 2, now=1.0, disk_id="d" * 32)
    place(catalog, A, "x", "y")
    place(catalog, B, "y")
    catalog.set_draining(A)
    catalog.record_server(C, 100, 2, now=2.0, disk_id="d" * 32)
    assert sorted(catalog.server_of_disk("d" * 32)) == [(A, 0), (C, 0)]
    catalog.move_server(A, C)
    assert catalog.server_addresses() == {C}
    assert catalog.holders([cid("x"), cid("y")]) == {cid("x"): [C], cid("y"): [B, C]}
    assert catalog.draining_servers() == {C}


def test_a_retired_server_leaves_status_and_its_copies_are_forgotten(catalog):
    for address in (A, B):
        catalog.record_server(address, 100, 1, now=1.0, disk_id=address[4] * 32)
    place(catalog, A, "x")
    place(catalog, B, "x")
    catalog.retire_server(A, now=5.0)
    assert [row[0] for row in catalog.servers()] == [B]
    assert catalog.server_addresses() == {B}
    assert catalog.server_records()[0] == (A, "a" * 32, 1.0, 100, 5.0)
    assert catalog.holders([cid("x")]) == {cid("x"): [B]}
    assert catalog.usage_by_server() == {B: (1, 100)}
    assert catalog.server_of_disk("a" * 32) == [(A, 5.0)]


def test_shortfall_counts_chunks_below_the_factor_and_last_copies(catalog):
    place(catalog, A, "only-here", "one-more", "two-more", "draining-too")
    place(catalog, B, "one-more", "two-more")
    place(catalog, C, "two-more")
    place(catalog, D, "draining-too")
    # B and C count; D is live but draining: its copies are copies, not counted ones.
    assert catalog.shortfall(A, {B, C}, {B, C, D}, 2) == (3, 1)
    assert catalog.shortfall(A, {B, C}, {B, C, D}, 1) == (2, 1)
    assert catalog.shortfall(A, set(), set(), 2) == (4, 4)


def test_under_replicated_copies_from_draining_servers_without_counting_them(catalog):
    place(catalog, A, "on-drain-only", "drain-and-b")
    place(catalog, B, "drain-and-b", "b-and-c")
    place(catalog, C, "b-and-c")
    found = {chunk_id: holders for chunk_id, _, holders in
             catalog.under_replicated({B, C}, 2, 100, draining={A})}
    assert found == {cid("on-drain-only"): [A], cid("drain-and-b"): [A, B]}
    # Without draining, A's copies are simply not live ones.
    assert {c for c, _, _ in catalog.under_replicated({B, C}, 2, 100)} == {cid("drain-and-b")}


# --- sdbackup server ------------------------------------------------------------------


def info(address: str, **fields) -> ServerInfo:
    values = dict(address=address, disk_id="", alive=True, last_seen=1000.0, chunks=0, bytes=0,
                  free_bytes=0, total_bytes=0, full=False, draining=False, retired=False,
                  short=0, only_here=0)
    values.update(fields)
    return ServerInfo(**values)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3600, "1h 0m"), (3 * 86400 + 7200, "3d 2h"),
    (-5, "0s")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_states_as_listed():
    assert state_of(info(A), 2000) == "alive"
    assert state_of(info(A, full=True, draining=True), 2000) == "full, draining"
    assert state_of(info(A, alive=False), 1125) == "dead 2m 5s"
    assert state_of(info(A, alive=False, retired=True), 2000) == "retired"


def test_an_address_is_named_whole_or_by_a_unique_end():
    servers = [info("tcp:localhost:5001"), info("tcp:localhost:5002"),
               info("tcp:other:5001"), info("tcp:gone:6000", retired=True)]
    assert resolve(servers, "tcp:localhost:5002") == "tcp:localhost:5002"
    assert resolve(servers, "5002") == "tcp:localhost:5002"
    assert resolve(servers, "other:5001") == "tcp:other:5001"
    assert resolve(servers, "tcp:gone:6000") == "tcp:gone:6000"
    with pytest.raises(ClientError, match="names 2 servers"):
        resolve(servers, "5001")
    with pytest.raises(ClientError, match="no server '6000' is known"):
        resolve(servers, "6000")


def test_drain_and_retire_need_the_admin_role_and_clients_may_list():
    for msg in (DrainServer(address=A), RetireServer(address=A)):
        assert refusal("admin", msg, authenticated=True) is None
        assert "only admin" in refusal("client", msg, authenticated=True)
        assert refusal("server", msg, authenticated=True) is not None
    assert refusal("client", ListServers(), authenticated=True) is None


def test_another_disk_at_a_retired_or_draining_address_is_a_new_server(catalog):
    catalog.record_server(A, 100, 1, now=1.0, disk_id="a" * 32)
    catalog.record_server(B, 100, 1, now=1.0, disk_id="b" * 32)
    catalog.retire_server(A, now=2.0)
    catalog.set_draining(B)
    catalog.record_server(B, 100, 1, now=3.0)  # a heartbeat changes nothing of that
    assert catalog.draining_servers() == {B}
    catalog.record_server(A, 100, 0, now=4.0, disk_id="c" * 32)
    catalog.record_server(B, 100, 0, now=4.0, disk_id="d" * 32)
    assert catalog.server_addresses() == {A, B}
    assert catalog.draining_servers() == set()


def test_a_store_that_cannot_make_its_folder_leaves_no_temporary_file(tmp_path):
    store = ChunkStore(str(tmp_path / "data"))
    try:
        payload = b"no room for a folder"
        chunk_id = hashing.chunk_id(payload)
        (tmp_path / "data" / "chunks" / chunk_id[:2]).write_bytes(b"in the way")
        with pytest.raises(OSError):
            store.put(Kind.DATA, chunk_id, hashing.checksum(payload), payload)
        assert os.listdir(store.incoming) == []
        assert not store.has(chunk_id) and store.count() == 0
    finally:
        store.close()


def test_usage_of_every_server_or_one(catalog):
    place(catalog, A, "x", "y")
    place(catalog, B, "y")
    assert catalog.usage_by_server() == {A: (2, 200), B: (1, 100)}
    assert catalog.usage_by_server(B) == {B: (1, 100)}
    assert catalog.usage_by_server(C) == {}
