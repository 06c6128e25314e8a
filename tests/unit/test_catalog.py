"""The manager's catalog, an index of what the servers hold, on a real SQLite file."""

import os
import sqlite3

import pytest

from sdbackup import hashing
from sdbackup.protocols.messages import SnapshotSummary
from sdbackup.services.catalog import SCHEMA_VERSION, Catalog

A, B, C = "tcp:a:5001", "tcp:b:5001", "tcp:c:5001"


def cid(name: str) -> str:
    return hashing.chunk_id(name.encode())


def held(*names: str, size: int = 100) -> list[tuple[str, int]]:
    return [(cid(n), size) for n in names]


def summary(name: str, time: float = 1000.0, **fields) -> SnapshotSummary:
    values = dict(snapshot_id=cid(f"snapshot {name}"), time=time, host="laptop",
                  paths=["/home/me", "odd\\nname\\xff"], tree=cid(f"tree {name}"),
                  tags=["daily"], parent="", files=3, dirs=2, bytes=4096)
    values.update(fields)
    return SnapshotSummary(**values)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "manager" / "catalog.sqlite")


@pytest.fixture
def catalog(db_path):
    opened = Catalog(db_path)
    yield opened
    opened.close()


def report(catalog, server: str, *pages: list[tuple[str, int]]):
    """A whole inventory of ``server``, in pages."""
    catalog.begin_report(server)
    for index, page in enumerate(pages or ([],)):
        catalog.report_page(server, page, final=index == max(len(pages) - 1, 0))


# --- versions --------------------------------------------------------------------------


def test_a_new_catalog_has_the_current_version(catalog, db_path):
    assert catalog.moved_aside is None
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"servers", "chunks", "locations", "snapshots", "forgotten", "prunes"}
    finally:
        other.close()


def test_an_old_catalog_is_moved_aside_and_a_fresh_one_made(db_path):
    # The catalog before the object model: no version, a row per file.
    os.makedirs(os.path.dirname(db_path))
    old = sqlite3.connect(db_path)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE files (snapshot_id TEXT, path TEXT)")
    old.execute("CREATE TABLE servers (address TEXT PRIMARY KEY)")
    old.execute("INSERT INTO files VALUES ('0a1b2c3d', 'home/me/notes.txt')")
    old.execute("INSERT INTO servers VALUES ('tcp:old:1')")
    old.commit()
    old.close()

    catalog = Catalog(db_path)
    try:
        assert catalog.moved_aside is not None
        assert os.path.basename(catalog.moved_aside).startswith("catalog.sqlite.v0-")
        assert catalog.server_addresses() == set()
        assert catalog.snapshots() == []
        assert catalog.db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        catalog.close()
    # The old one is kept whole for inspection, not deleted.
    kept = sqlite3.connect(catalog.moved_aside)
    try:
        assert kept.execute("SELECT path FROM files").fetchall() == [("home/me/notes.txt",)]
    finally:
        kept.close()


def test_a_catalog_of_a_newer_version_is_moved_aside(db_path):
    os.makedirs(os.path.dirname(db_path))
    newer = sqlite3.connect(db_path)
    newer.execute("CREATE TABLE whatever (x)")
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.commit()
    newer.close()
    catalog = Catalog(db_path)
    catalog.close()
    assert f".v{SCHEMA_VERSION + 1}-" in catalog.moved_aside
    assert os.path.exists(catalog.moved_aside)


def test_a_file_that_is_not_a_database_is_moved_aside(db_path):
    os.makedirs(os.path.dirname(db_path))
    with open(db_path, "wb") as f:
        f.write(b"this is not SQLite" * 100)
    catalog = Catalog(db_path)
    try:
        assert ".unreadable-" in catalog.moved_aside
        catalog.record_server(A, 1, 0, now=1.0)
        assert catalog.server_addresses() == {A}
    finally:
        catalog.close()


def test_two_moves_keep_both_old_catalogs(db_path):
    os.makedirs(os.path.dirname(db_path))
    asides = []
    for _ in range(2):
        with open(db_path, "wb") as f:
            f.write(b"garbage")
        catalog = Catalog(db_path)
        catalog.close()
        os.remove(db_path)
        asides.append(catalog.moved_aside)
    assert len(set(asides)) == 2
    assert all(os.path.exists(a) for a in asides)


def test_catalog_survives_reopening(db_path):
    catalog = Catalog(db_path)
    catalog.record_server(A, 100, 1, now=5.0)
    report(catalog, A, held("c1", "c2"))
    catalog.add_snapshot(summary("s1"))
    catalog.close()

    reopened = Catalog(db_path)
    try:
        assert reopened.moved_aside is None
        assert reopened.snapshots() == [summary("s1")]
        assert reopened.holders([cid("c1"), cid("c2")]) == {cid("c1"): [A], cid("c2"): [A]}
        assert reopened.servers() == [(A, 5.0, 100, 1)]
        assert reopened.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        reopened.close()


# --- servers ----------------------------------------------------------------------------


def test_servers_are_recorded(catalog):
    assert catalog.server_addresses() == set()
    catalog.record_server(B, 500, 3, now=10.0)
    catalog.record_server(A, 100, 1, now=11.0)
    catalog.record_server(B, 400, 4, now=12.0)
    assert catalog.servers() == [(A, 11.0, 100, 1), (B, 12.0, 400, 4)]
    assert catalog.server_addresses() == {A, B}


# --- locations -------------------------------------------------------------------------


def test_an_inventory_makes_a_servers_copies_exactly_the_reported_ones(catalog):
    report(catalog, A, held("c1", "c2"))
    report(catalog, B, held("c1"))
    assert catalog.holders([cid("c1"), cid("c2"), cid("c3")]) == {
        cid("c1"): [A, B], cid("c2"): [A]}
    report(catalog, A, held("c2", "c3"), held("c3"))
    assert catalog.holders([cid("c1"), cid("c2"), cid("c3")]) == {
        cid("c1"): [B], cid("c2"): [A], cid("c3"): [A]}
    report(catalog, B)
    assert catalog.holders([cid("c1")]) == {}
    # The chunk is still known (only a prune forgets chunks): it counts as missing.
    assert catalog.chunk_stats({A, B}, 2) == (3, 2, 1)


def test_pages_count_at_once_and_the_final_one_reconciles(catalog):
    report(catalog, A, held("old", "kept"))
    catalog.begin_report(A)
    catalog.report_page(A, held("kept", "new"), final=False)
    # Before the final page nothing is taken away, and what is reported counts already.
    assert set(catalog.holders([cid("old"), cid("kept"), cid("new")])) == {
        cid("old"), cid("kept"), cid("new")}
    catalog.report_page(A, held("later"), final=True)
    assert set(catalog.holders([cid("old"), cid("kept"), cid("new"), cid("later")])) == {
        cid("kept"), cid("new"), cid("later")}


def test_chunks_added_while_reporting_count_as_reported(catalog):
    report(catalog, A, held("before"))
    catalog.begin_report(A)
    catalog.report_page(A, held("listed"), final=False)
    # Stored after the server listed its disk: told by a notice, not in the inventory.
    catalog.add_locations(A, held("stored meanwhile"), reporting=True)
    catalog.add_locations(B, held("elsewhere"))
    catalog.report_page(A, [], final=True)
    assert set(catalog.holders([cid(n) for n in ("before", "listed", "stored meanwhile")])) == {
        cid("listed"), cid("stored meanwhile")}
    assert catalog.holders([cid("elsewhere")]) == {cid("elsewhere"): [B]}


def test_two_servers_report_at_once(catalog):
    report(catalog, A, held("a1", "a2"))
    report(catalog, B, held("b1"))
    catalog.begin_report(A)
    catalog.begin_report(B)
    catalog.report_page(A, held("a1"), final=False)
    catalog.report_page(B, held("b2"), final=True)
    catalog.report_page(A, held("a3"), final=True)
    holders = catalog.holders([cid(n) for n in ("a1", "a2", "a3", "b1", "b2")])
    assert holders == {cid("a1"): [A], cid("a3"): [A], cid("b2"): [B]}


def test_an_interrupted_inventory_is_forgotten_at_the_next_one(catalog):
    catalog.begin_report(A)
    catalog.report_page(A, held("from the lost link"), final=False)
    # The link broke; the server registers again and reports from the start.
    catalog.begin_report(A)
    catalog.report_page(A, held("now"), final=True)
    assert set(catalog.holders([cid("from the lost link"), cid("now")])) == {cid("now")}


def test_add_and_remove_locations(catalog):
    catalog.add_locations(A, held("c1", "c2", size=7))
    catalog.add_locations(B, held("c2", size=7))
    catalog.remove_locations(A, [cid("c2")])
    assert catalog.holders([cid("c1"), cid("c2")]) == {cid("c1"): [A], cid("c2"): [B]}
    assert catalog.sizes([cid("c1"), cid("c2"), cid("unknown")]) == {cid("c1"): 7, cid("c2"): 7}


def committed_holders(db_path, chunk_id: str) -> list[str]:
    """What another connection reads: only what the catalog committed."""
    other = sqlite3.connect(db_path)
    try:
        return [r[0] for r in other.execute(
            "SELECT server FROM locations WHERE chunk_id = ? ORDER BY server", (chunk_id,))]
    finally:
        other.close()


def test_noticed_copies_count_at_once_and_are_committed_together(catalog, db_path):
    catalog.add_locations(A, held("noticed"), commit=False)
    catalog.add_locations(B, held("noticed"), commit=False)
    catalog.record_server(A, 10, 1, now=5.0, commit=False)
    # Read at once (one connection, one thread)...
    assert catalog.holders([cid("noticed")]) == {cid("noticed"): [A, B]}
    assert catalog.servers() == [(A, 5.0, 10, 1)]
    # ... and written in one transaction, when the manager commits them.
    assert committed_holders(db_path, cid("noticed")) == []
    catalog.commit_pending()
    assert committed_holders(db_path, cid("noticed")) == [A, B]
    catalog.commit_pending()  # nothing waiting: nothing to do


def test_any_other_write_commits_the_noticed_copies_with_it(catalog, db_path):
    catalog.add_locations(A, held("noticed"), commit=False)
    catalog.add_snapshot(summary("s1"))
    assert committed_holders(db_path, cid("noticed")) == [A]
    assert [s.snapshot_id for s in catalog.snapshots()] == [cid("snapshot s1")]


def test_a_failed_write_is_undone_alone_and_the_noticed_copies_stay(catalog, db_path):
    for server in (A, B, C):
        catalog.add_locations(server, held("x"))
    catalog.add_locations(A, held("noticed"), commit=False)

    def drops():
        yield cid("x"), C  # trimmed, then the write fails
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        catalog.claim_trims({A, B, C}, 2, drops())
    assert catalog.holders([cid("x")]) == {cid("x"): [A, B, C]}
    assert catalog.holders([cid("noticed")]) == {cid("noticed"): [A]}
    assert committed_holders(db_path, cid("noticed")) == []
    catalog.commit_pending()
    assert committed_holders(db_path, cid("noticed")) == [A]
    assert committed_holders(db_path, cid("x")) == [A, B, C]


def test_closing_commits_the_noticed_copies(db_path):
    catalog = Catalog(db_path)
    catalog.add_locations(A, held("noticed"), commit=False)
    catalog.close()
    assert committed_holders(db_path, cid("noticed")) == [A]


def test_holders_of_many_chunks(catalog):
    ids = [cid(f"many {i}") for i in range(1200)]
    report(catalog, A, [(i, 1) for i in ids])
    report(catalog, B, [(i, 1) for i in ids[::2]])
    holders = catalog.holders(ids)
    assert len(holders) == 1200
    assert holders[ids[0]] == [A, B] and holders[ids[1]] == [A]


def test_chunk_stats_counts_every_chunk_known(catalog):
    catalog.add_locations(A, held("c1", "c2"))
    catalog.add_locations(B, held("c1", "c3"))
    catalog.add_locations(C, held("c3"))
    assert catalog.chunk_stats({A, B}, 2) == (3, 2, 0)
    assert catalog.chunk_stats({A, B, C}, 2) == (3, 1, 0)
    assert catalog.chunk_stats({A}, 2) == (3, 2, 1)
    assert catalog.chunk_stats(set(), 2) == (3, 0, 3)
    assert catalog.chunk_stats({A, B}, 1) == (3, 0, 0)
    assert catalog.chunk_stats({A, B, C}, 3) == (3, 3, 0)


def test_chunk_stats_of_an_empty_catalog(catalog):
    assert catalog.chunk_stats({A}, 2) == (0, 0, 0)


def test_under_replicated_lists_what_repair_can_copy_with_sizes(catalog):
    catalog.add_locations(A, [(cid("c1"), 10), (cid("c2"), 20)])
    catalog.add_locations(B, [(cid("c1"), 10)])
    catalog.add_locations(C, [(cid("c3"), 30)])
    assert catalog.under_replicated({A, B}, 2, 10) == [(cid("c2"), 20, [A])]
    assert sorted(catalog.under_replicated({A, B, C}, 2, 10)) == sorted(
        [(cid("c2"), 20, [A]), (cid("c3"), 30, [C])])
    assert len(catalog.under_replicated({A, B, C}, 2, 1)) == 1
    assert catalog.under_replicated(set(), 2, 10) == []
    catalog.add_locations(B, [(cid("c2"), 20)])
    catalog.remove_locations(A, [cid("c1")])
    assert catalog.under_replicated({A, B}, 2, 10) == [(cid("c1"), 10, [B])]


def test_under_replicated_in_a_window_reads_the_chunks_added_in_it_alone(catalog):
    # Repair's pass after new chunks: during a first backup of 1,000,000 files, a pass over
    # every chunk at each tick took 70% of the manager's CPU by the 350,000th.
    for minute in range(100):
        catalog.add_locations(A, held(*(f"{minute}-{i}" for i in range(100))), added=60.0 * minute)
    short_of_b = {"98-7", "99-3", "10-5"}
    catalog.add_locations(B, held(*(name for minute in range(100) for i in range(100)
                                    if (name := f"{minute}-{i}") not in short_of_b)))
    steps = []
    catalog.db.set_progress_handler(lambda: steps.append(1), 100)

    def short(**window) -> tuple[list, int]:
        steps.clear()
        found = catalog.under_replicated({A, B, C}, 2, 10, **window)
        return sorted(chunk_id for chunk_id, _, _ in found), len(steps)

    everything, full_steps = short()
    assert everything == sorted(cid(n) for n in short_of_b)
    window, window_steps = short(added_since=60.0 * 98, added_before=60.0 * 99)
    assert window == [cid("98-7")]  # added at 98 minutes: not before, not at 99
    assert window_steps * 20 < full_steps  # 100 of 10,000 chunks read, not all
    assert short(added_since=60.0 * 98)[0] == sorted([cid("98-7"), cid("99-3")])


def test_a_version_8_catalog_is_migrated_with_its_index_of_chunks_by_added(db_path, older_catalog):
    catalog = Catalog(db_path)
    catalog.add_locations(A, held("kept"), added=5.0)
    catalog.close()
    catalog = older_catalog(db_path, 8, "DROP INDEX chunks_by_added")
    try:
        assert catalog.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                  " AND tbl_name = 'chunks'").fetchall() == [("chunks_by_added",)]
        assert catalog.under_replicated({A, B}, 2, 10, added_since=5.0) == [(cid("kept"), 100, [A])]
    finally:
        catalog.close()


# --- snapshots ----------------------------------------------------------------------------


def test_snapshots_are_listed_oldest_first_whatever_the_order_they_came_in(catalog):
    newest, oldest, middle = summary("n", 300.0), summary("o", 100.0), summary("m", 200.0)
    for s in (newest, oldest, middle):
        catalog.add_snapshot(s)
    assert catalog.snapshots() == [oldest, middle, newest]
    assert catalog.snapshot_count() == 3


def test_a_snapshot_keeps_every_field(catalog):
    full = summary("full", 1_700_000_000.123456, host="hôst-ü", paths=["/données", "a\\\\b"],
                   tags=["a", "b"], parent=cid("snapshot parent"), files=10, dirs=4,
                   bytes=2**40)
    catalog.add_snapshot(full)
    assert catalog.snapshot(full.snapshot_id) == full
    assert catalog.snapshot(cid("snapshot other")) is None


def test_indexing_a_snapshot_twice_changes_nothing(catalog):
    catalog.add_snapshot(summary("s"))
    catalog.add_snapshot(summary("s"))
    assert catalog.snapshots() == [summary("s")]


def test_unknown_snapshots(catalog):
    catalog.add_snapshot(summary("known"))
    ids = [cid("snapshot new 2"), summary("known").snapshot_id, cid("snapshot new 1"),
           cid("snapshot new 2")]
    assert catalog.unknown_snapshots(ids) == [cid("snapshot new 2"), cid("snapshot new 1")]
    assert catalog.unknown_snapshots([]) == []
    many = [cid(f"snapshot {i}") for i in range(1100)]
    assert catalog.unknown_snapshots(many) == many


def test_nothing_about_files_is_kept(catalog, db_path):
    # Whatever a snapshot holds, the catalog grows by one row per snapshot.
    for i in range(5):
        catalog.add_snapshot(summary(str(i), files=10**6))
    other = sqlite3.connect(db_path)
    try:
        names = {r[0] for r in other.execute("SELECT name FROM sqlite_master")}
        assert not {n for n in names if "file" in n}
        assert other.execute("SELECT COUNT(*) FROM snapshots").fetchone() == (5,)
    finally:
        other.close()


def test_snapshots_are_listed_per_repository(catalog):
    catalog.add_snapshot(summary("a", time=1.0))
    catalog.add_snapshot(summary("b", time=2.0, repo="alpha", paths=[], tags=[]))
    catalog.add_snapshot(summary("c", time=3.0))
    catalog.add_snapshot(summary("d", time=4.0, repo="alpha", paths=[], tags=[]))
    ids = lambda page: [s.snapshot_id for s in page]  # noqa: E731
    assert ids(catalog.snapshot_page(None, 10, "default")) == [cid("snapshot a"), cid("snapshot c")]
    alpha = catalog.snapshot_page(None, 1, "alpha")
    assert ids(alpha) == [cid("snapshot b")] and alpha[0].repo == "alpha"
    assert ids(catalog.snapshot_page((2.0, cid("snapshot b")), 10, "alpha")) == [cid("snapshot d")]
    assert len(catalog.snapshot_page(None, 10)) == 4  # every repository's
    assert catalog.snapshot_page(None, 10, "beta") == []


def test_a_removed_key_is_remembered_across_a_restart(db_path):
    catalog = Catalog(db_path)
    catalog.add_locations(A, held("key"))
    catalog.forget_key(cid("key"), now=5.0)
    catalog.close()
    catalog = Catalog(db_path)
    try:
        assert catalog.forgotten_among([cid("key"), cid("other")]) == [cid("key")]
        assert catalog.holders([cid("key")]) == {}
    finally:
        catalog.close()


def test_a_version_6_catalog_is_migrated_to_snapshots_with_their_repository(db_path, older_catalog):
    catalog = older_catalog(
        db_path, 6, "ALTER TABLE snapshots DROP COLUMN repo",
        ("INSERT INTO snapshots VALUES (?, 1.0, 'h', '[\"/x\"]', '[]', ?, '', 1, 1, 1)",
         (cid("plain"), cid("tree"))),
        ("INSERT INTO snapshots VALUES (?, 2.0, 'h', '[]', '[]', ?, '', 1, 1, 1)",
         (cid("sealed"), cid("tree"))))
    try:
        # The plaintext one is default's; the sealed one is read again from its servers.
        assert [(s.snapshot_id, s.repo) for s in catalog.snapshots()] == [(cid("plain"), "default")]
        assert catalog.unknown_snapshots([cid("sealed")]) == [cid("sealed")]
    finally:
        catalog.close()


def test_a_version_7_catalog_is_migrated_without_its_index_of_locations_by_server(
        db_path, older_catalog):
    catalog = Catalog(db_path)
    catalog.add_locations(A, held("kept"))
    catalog.close()
    catalog = older_catalog(db_path, 7, "CREATE INDEX locations_by_server ON locations (server, chunk_id)")
    try:
        assert catalog.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                  " AND tbl_name = 'locations'").fetchall() == []
        assert catalog.holders([cid("kept")]) == {cid("kept"): [A]}
        assert catalog.usage_by_server() == {A: (1, 100)}
    finally:
        catalog.close()
