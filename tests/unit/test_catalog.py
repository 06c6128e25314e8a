"""The manager's catalog on a real SQLite file."""

import sqlite3

import pytest

from sdbackup import hashing
from sdbackup.protocols.messages import ChunkRef, FileEntry, SnapshotSummary, StoredChunk
from sdbackup.services.catalog import Catalog, CatalogError, MissingChunks, UnknownSnapshot

A, B, C = "tcp:a:5001", "tcp:b:5001", "tcp:c:5001"


def cid(name: str) -> str:
    return hashing.chunk_id(name.encode())


def stored(name: str, *holders: str, size: int = 100) -> StoredChunk:
    return StoredChunk(cid(name), size, cid(name), list(holders))


def ref(name: str, size: int = 100) -> ChunkRef:
    return ChunkRef(cid(name), size, cid(name))


def a_file(path: str, *chunk_names: str) -> FileEntry:
    return FileEntry(path=path, kind="file", mode=0o100644, mtime_ns=1_700_000_000_000_000_000,
                     size=100 * len(chunk_names), file_hash=cid(path),
                     chunks=[ref(n) for n in chunk_names], chunk_count=len(chunk_names))


def a_dir(path: str) -> FileEntry:
    return FileEntry(path=path, kind="dir", mode=0o40755, mtime_ns=5)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "manager" / "catalog.sqlite")


@pytest.fixture
def catalog(db_path):
    opened = Catalog(db_path)
    yield opened
    opened.close()


def snapshot_with(catalog, files, chunks=(), host="host", paths=("home",), now=1000.0) -> str:
    snapshot_id = catalog.begin_snapshot(host, list(paths), now)
    catalog.commit_files(snapshot_id, list(chunks), list(files))
    catalog.finish_snapshot(snapshot_id)
    return snapshot_id


def all_files(catalog, snapshot_id) -> list[FileEntry]:
    files, more = catalog.list_files(snapshot_id, "", 100_000)
    assert not more
    return files


# --- snapshots ---------------------------------------------------------------------


def test_snapshot_life(catalog):
    snapshot_id = catalog.begin_snapshot("laptop", ["home/me", "etc"], 1234.5)
    assert len(snapshot_id) == 8
    catalog.commit_files(snapshot_id, [stored("c1", A, B), stored("c2", B, C)],
                         [a_dir("home/me"), a_file("home/me/notes.txt", "c1", "c2")])
    catalog.commit_files(snapshot_id, [stored("c3", A, C)], [a_file("etc/hosts", "c3")])
    summary = catalog.finish_snapshot(snapshot_id)
    assert summary == SnapshotSummary(snapshot_id, 1234.5, "laptop", ["home/me", "etc"], 3, 300)
    assert catalog.snapshots() == [summary]
    assert catalog.snapshot(snapshot_id) == summary
    assert all_files(catalog, snapshot_id) == [
        a_file("etc/hosts", "c3"), a_dir("home/me"), a_file("home/me/notes.txt", "c1", "c2")]
    assert catalog.holders([cid("c1"), cid("c2"), cid("c3")]) == {
        cid("c1"): [A, B], cid("c2"): [B, C], cid("c3"): [A, C]}


def test_file_chunks_keep_their_order(catalog):
    names = [f"part{i}" for i in (5, 1, 9, 3, 7, 0, 2, 8, 4, 6, 10, 11)]
    snapshot_id = snapshot_with(catalog, [a_file("big", *names)], [stored(n, A) for n in names])
    [entry] = all_files(catalog, snapshot_id)
    assert entry.chunks == [ref(n) for n in names]


def test_a_chunk_used_twice_in_one_file(catalog):
    snapshot_id = snapshot_with(catalog, [a_file("zeros", "z", "z", "z")], [stored("z", A)])
    [entry] = all_files(catalog, snapshot_id)
    assert entry.chunks == [ref("z")] * 3


def test_file_list_pages(catalog):
    paths = [f"dir/file{i:02d}" for i in range(7)]
    snapshot_id = snapshot_with(catalog, [a_file(p, f"c-{p}") for p in paths],
                                [stored(f"c-{p}", A) for p in paths])
    pages, after, more = [], "", True
    while more:
        files, more = catalog.list_files(snapshot_id, after, 3)
        pages.append([f.path for f in files])
        after = files[-1].path
    assert pages == [paths[0:3], paths[3:6], paths[6:7]]
    files, more = catalog.list_files(snapshot_id, paths[-1], 3)
    assert (files, more) == ([], False)
    exact, more = catalog.list_files(snapshot_id, "", 7)
    assert len(exact) == 7 and not more
    # every page carries each of its files' own chunks, and only those
    files, _ = catalog.list_files(snapshot_id, paths[2], 2)
    assert [f.chunks for f in files] == [[ref(f"c-{paths[3]}")], [ref(f"c-{paths[4]}")]]


def test_files_of_one_snapshot_only(catalog):
    first = snapshot_with(catalog, [a_file("a", "c1")], [stored("c1", A)], now=1.0)
    second = snapshot_with(catalog, [a_file("b", "c2")], [stored("c2", A)], now=2.0)
    assert [f.path for f in all_files(catalog, first)] == ["a"]
    assert [f.path for f in all_files(catalog, second)] == ["b"]
    assert [s.snapshot_id for s in catalog.snapshots()] == [first, second]


def test_commit_refuses_files_whose_chunks_have_no_copy(catalog):
    snapshot_id = catalog.begin_snapshot("host", ["home"], 1.0)
    with pytest.raises(MissingChunks) as raised:
        catalog.commit_files(snapshot_id, [stored("confirmed", A, B)],
                             [a_file("ok", "confirmed"), a_file("bad", "confirmed", "lost")])
    assert raised.value.code == "missing-chunks"
    # all or nothing: neither the files nor the copies of this commit were recorded
    assert catalog.holders([cid("confirmed"), cid("lost")]) == {}
    summary = catalog.finish_snapshot(snapshot_id)
    assert (summary.files, summary.bytes) == (0, 0)
    assert all_files(catalog, snapshot_id) == []
    assert catalog.chunk_stats({A, B}, 2) == (0, 0, 0)


def test_chunks_confirmed_earlier_are_accepted(catalog):
    first = snapshot_with(catalog, [a_file("a", "shared")], [stored("shared", A, B)], now=1.0)
    # a later backup of the same bytes sends no chunks: they are known already
    second = snapshot_with(catalog, [a_file("a", "shared")], [], now=2.0)
    assert all_files(catalog, second) == all_files(catalog, first)


def test_chunks_reported_by_a_server_are_accepted(catalog):
    catalog.replace_locations(C, [cid("from-inventory")])
    snapshot_id = snapshot_with(catalog, [a_file("f", "from-inventory")])
    assert [f.path for f in all_files(catalog, snapshot_id)] == ["f"]


def test_commit_to_an_unknown_or_finished_snapshot(catalog):
    with pytest.raises(UnknownSnapshot):
        catalog.commit_files("00000000", [stored("c1", A)], [a_file("a", "c1")])
    snapshot_id = snapshot_with(catalog, [a_file("a", "c1")], [stored("c1", A)])
    with pytest.raises(CatalogError):
        catalog.commit_files(snapshot_id, [stored("c2", A)], [a_file("b", "c2")])
    with pytest.raises(CatalogError):
        catalog.finish_snapshot(snapshot_id)
    assert [f.path for f in all_files(catalog, snapshot_id)] == ["a"]
    assert catalog.holders([cid("c2")]) == {}


def test_committing_a_path_again_replaces_it(catalog):
    # Overlapping backup paths (``backup home home/me``) commit a file twice; the second
    # commit must replace the first, chunks included, not merge with its leftovers.
    snapshot_id = catalog.begin_snapshot("host", ["home"], 1.0)
    chunks = [stored(n, A) for n in ("c1", "c2", "c3", "c4")]
    catalog.commit_files(snapshot_id, chunks, [a_file("home/me/log", "c1", "c2", "c3")])
    catalog.commit_files(snapshot_id, [], [a_file("home/me/log", "c4")])
    catalog.finish_snapshot(snapshot_id)
    [entry] = all_files(catalog, snapshot_id)
    assert entry == a_file("home/me/log", "c4")


# --- resolving snapshot names --------------------------------------------------------


def test_resolve_latest_full_id_and_prefix(catalog):
    older = snapshot_with(catalog, [], now=100.0)
    newer = snapshot_with(catalog, [], now=200.0)
    assert catalog.resolve_snapshot("latest") == newer
    assert catalog.resolve_snapshot(older) == older
    assert catalog.resolve_snapshot(newer) == newer
    common = next(i for i in range(8) if older[i] != newer[i])
    assert catalog.resolve_snapshot(older[: common + 1]) == older
    assert catalog.resolve_snapshot(newer[: common + 1]) == newer


def test_latest_is_by_time_not_by_creation(catalog):
    later = snapshot_with(catalog, [], now=500.0)
    snapshot_with(catalog, [], now=100.0)
    assert catalog.resolve_snapshot("latest") == later
    assert [s.time for s in catalog.snapshots()] == [100.0, 500.0]


def test_ambiguous_prefix_is_refused(catalog):
    ids = [snapshot_with(catalog, [], now=float(i)) for i in range(17)]
    first_chars = [i[0] for i in ids]
    shared = next(c for c in first_chars if first_chars.count(c) > 1)  # 17 ids, 16 hex digits
    with pytest.raises(UnknownSnapshot):
        catalog.resolve_snapshot(shared)


def test_unknown_snapshot(catalog):
    snapshot_id = snapshot_with(catalog, [])
    other = "0" * 8 if not snapshot_id.startswith("0") else "f" * 8
    for ref in (other, other[:3], snapshot_id + "0", "zz", "latest2"):
        with pytest.raises(UnknownSnapshot) as raised:
            catalog.resolve_snapshot(ref)
        assert raised.value.code == "unknown-snapshot"


def test_sql_wildcards_are_not_prefixes(catalog):
    # ``restore %`` or ``restore _`` names no snapshot; it must not pick one.
    snapshot_id = snapshot_with(catalog, [])
    for ref in ("%", "_", snapshot_id[:2] + "%"):
        with pytest.raises(UnknownSnapshot):
            catalog.resolve_snapshot(ref)


def test_no_snapshots_yet(catalog):
    with pytest.raises(UnknownSnapshot):
        catalog.resolve_snapshot("latest")
    assert catalog.snapshots() == []


def test_unfinished_snapshots_are_not_listed(catalog):
    finished = snapshot_with(catalog, [a_file("a", "c1")], [stored("c1", A)], now=1.0)
    unfinished = catalog.begin_snapshot("host", ["home"], 2.0)
    catalog.commit_files(unfinished, [stored("c2", A)], [a_file("b", "c2")])
    assert [s.snapshot_id for s in catalog.snapshots()] == [finished]
    assert catalog.resolve_snapshot("latest") == finished
    with pytest.raises(UnknownSnapshot):
        catalog.resolve_snapshot(unfinished)
    with pytest.raises(UnknownSnapshot):
        catalog.snapshot(unfinished)


# --- locations and replication --------------------------------------------------------


def test_replace_locations_reconciles_a_servers_report(catalog):
    catalog.replace_locations(A, [cid("c1"), cid("c2")])
    catalog.replace_locations(B, [cid("c1")])
    assert catalog.holders([cid("c1"), cid("c2"), cid("c3")]) == {cid("c1"): [A, B], cid("c2"): [A]}
    catalog.replace_locations(A, [cid("c2"), cid("c3"), cid("c3")])
    assert catalog.holders([cid("c1"), cid("c2"), cid("c3")]) == {
        cid("c1"): [B], cid("c2"): [A], cid("c3"): [A]}
    catalog.replace_locations(B, [])
    assert catalog.holders([cid("c1")]) == {}


def test_holders_of_many_chunks(catalog):
    ids = [cid(f"many {i}") for i in range(1200)]
    catalog.replace_locations(A, ids)
    catalog.replace_locations(B, ids[::2])
    holders = catalog.holders(ids)
    assert len(holders) == 1200
    assert holders[ids[0]] == [A, B] and holders[ids[1]] == [A]


def test_chunk_stats_counts_under_replicated_chunks(catalog):
    snapshot_with(catalog, [a_file("f", "c1", "c2", "c3")],
                  [stored("c1", A, B), stored("c2", A), stored("c3", B, C)])
    catalog.replace_locations(A, [cid("c1"), cid("c2"), cid("unused")])
    assert catalog.chunk_stats({A, B}, 2) == (3, 2, 0)
    assert catalog.chunk_stats({A, B, C}, 2) == (3, 1, 0)
    assert catalog.chunk_stats({A}, 2) == (3, 2, 1)
    assert catalog.chunk_stats(set(), 2) == (3, 0, 3)
    assert catalog.chunk_stats({A, B}, 1) == (3, 0, 0)
    assert catalog.chunk_stats({A, B, C}, 3) == (3, 3, 0)


def test_under_replicated_lists_what_repair_can_copy(catalog):
    snapshot_with(catalog, [a_file("f", "c1", "c2", "c3")],
                  [stored("c1", A, B), stored("c2", A), stored("c3", C)])
    assert catalog.under_replicated({A, B}, 2, 10) == [(cid("c2"), 100, [A])]
    assert sorted(catalog.under_replicated({A, B, C}, 2, 10)) == sorted(
        [(cid("c2"), 100, [A]), (cid("c3"), 100, [C])])
    assert len(catalog.under_replicated({A, B, C}, 2, 1)) == 1
    assert catalog.under_replicated(set(), 2, 10) == []
    catalog.add_locations(B, [cid("c2")])
    catalog.remove_locations(A, [cid("c1")])
    assert catalog.under_replicated({A, B}, 2, 10) == [(cid("c1"), 100, [B])]


def test_chunk_stats_of_an_empty_catalog(catalog):
    assert catalog.chunk_stats({A}, 2) == (0, 0, 0)


def test_servers_are_recorded(catalog):
    catalog.record_server(B, 500, 3, now=10.0)
    catalog.record_server(A, 100, 1, now=11.0)
    catalog.record_server(B, 400, 4, now=12.0)
    assert catalog.servers() == [(A, 11.0, 100, 1), (B, 12.0, 400, 4)]


# --- on disk ------------------------------------------------------------------------


def test_catalog_survives_reopening(db_path):
    catalog = Catalog(db_path)
    snapshot_id = snapshot_with(catalog, [a_dir("d"), a_file("d/f", "c1", "c2")],
                                [stored("c1", A, B), stored("c2", B)])
    catalog.record_server(A, 100, 1, now=5.0)
    summaries, files = catalog.snapshots(), all_files(catalog, snapshot_id)
    catalog.close()

    reopened = Catalog(db_path)
    try:
        assert reopened.snapshots() == summaries
        assert all_files(reopened, snapshot_id) == files
        assert reopened.resolve_snapshot("latest") == snapshot_id
        assert reopened.holders([cid("c1"), cid("c2")]) == {cid("c1"): [A, B], cid("c2"): [B]}
        assert reopened.servers() == [(A, 5.0, 100, 1)]
        assert reopened.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        reopened.close()


def test_committed_data_is_visible_to_another_connection(catalog, db_path):
    snapshot_id = snapshot_with(catalog, [a_file("f", "c1")], [stored("c1", A)])
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT snapshot_id FROM snapshots").fetchall() == [(snapshot_id,)]
        assert other.execute("SELECT COUNT(*) FROM file_chunks").fetchone() == (1,)
    finally:
        other.close()


# --- long chunk lists --------------------------------------------------------------


def test_staged_chunks_join_the_file_at_commit(catalog, monkeypatch):
    from sdbackup.services import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "INLINE_CHUNKS", 2)
    snapshot_id = catalog.begin_snapshot("host", ["big"], 1.0)
    names = [f"c{i}" for i in range(7)]
    catalog.commit_files(snapshot_id, [stored(n, "tcp:a:1") for n in names], [])
    catalog.stage_chunks(snapshot_id, "big", 0, [ref(n) for n in names[:3]])
    catalog.stage_chunks(snapshot_id, "big", 3, [ref(n) for n in names[3:6]])
    entry = FileEntry(path="big", kind="file", mode=0o644, mtime_ns=1, size=700,
                      file_hash=cid("big"), chunks=[ref(names[6])], first_chunk=6)
    catalog.commit_files(snapshot_id, [], [entry])
    catalog.finish_snapshot(snapshot_id)
    [listed], more = catalog.list_files(snapshot_id, "", 10)
    assert not more
    assert listed.chunk_count == 7
    assert listed.chunks == [ref(n) for n in names[:2]]  # the rest come a page at a time
    rest, more = catalog.list_chunks(snapshot_id, "big", 2, 3)
    assert rest == [ref(n) for n in names[2:5]] and more
    rest, more = catalog.list_chunks(snapshot_id, "big", 5, 3)
    assert rest == [ref(n) for n in names[5:]] and not more


def test_a_commit_must_follow_exactly_what_was_staged(catalog):
    snapshot_id = catalog.begin_snapshot("host", ["big"], 1.0)
    catalog.commit_files(snapshot_id, [stored("c1", "tcp:a:1"), stored("c2", "tcp:a:1")], [])
    catalog.stage_chunks(snapshot_id, "big", 0, [ref("c1")])
    entry = FileEntry(path="big", kind="file", mode=0o644, mtime_ns=1, size=200,
                      file_hash=cid("big"), chunks=[ref("c2")], first_chunk=5)
    with pytest.raises(CatalogError, match="1 chunks staged"):
        catalog.commit_files(snapshot_id, [], [entry])
    with pytest.raises(CatalogError):
        catalog.stage_chunks(snapshot_id, "big", 4, [ref("c2")])


def test_staging_needs_confirmed_copies_and_stays_invisible(catalog):
    snapshot_id = catalog.begin_snapshot("host", ["big"], 1.0)
    with pytest.raises(MissingChunks):
        catalog.stage_chunks(snapshot_id, "big", 0, [ref("never-stored")])
    catalog.commit_files(snapshot_id, [stored("c1", "tcp:a:1")], [])
    catalog.stage_chunks(snapshot_id, "big", 0, [ref("c1")])
    catalog.finish_snapshot(snapshot_id)
    assert catalog.list_files(snapshot_id, "", 10) == ([], False)
