"""The prune's rules (grace, trims, commits at risk) and its catalog steps (mark set, claims,
touches, the schema 4 -> 5 migration) on a real SQLite file."""

import os
import sqlite3
import time

import pytest
from twisted.python import usage

from sdbackup import hashing, manager_tap, objects
from sdbackup.protocols.authority import refusal
from sdbackup.protocols.messages import DeleteChunks, PruneRequest, PruneStatusRequest, SnapshotSummary
from sdbackup.services.catalog import SCHEMA_VERSION, Catalog
from sdbackup.services.chunkstore import HEADER_SIZE, ChunkStore
from sdbackup.services.prune import (
    CLOCK_SLACK,
    choose_trims,
    commit_at_risk,
    cutoff,
    deletable,
)

A, B, C, D = "tcp:a:1", "tcp:b:1", "tcp:c:1", "tcp:d:1"


def cid(name: str) -> str:
    return hashing.chunk_id(name.encode())


def summary(name: str, tree: str) -> SnapshotSummary:
    return SnapshotSummary(cid(f"snapshot {name}"), 1000.0, "laptop", ["/home"], tree)


@pytest.fixture
def catalog(tmp_path):
    opened = Catalog(str(tmp_path / "manager" / "catalog.sqlite"))
    yield opened
    opened.close()


# --- the rules ---------------------------------------------------------------------------


def test_the_grace_rule_spares_what_was_touched_since_the_mark_began_minus_the_grace():
    cut = cutoff(mark_started=10_000.0, grace=3600.0)
    assert cut == 6400.0
    assert deletable(False, 6399.9, cut)
    assert not deletable(False, 6400.0, cut)  # touched at the cutoff: spared
    assert not deletable(False, 9999.0, cut)  # a backup under way counted on it
    assert not deletable(True, 0.0, cut)  # reachable: never
    # No grace: anything unreachable and untouched since the mark began.
    assert deletable(False, 9999.0, cutoff(10_000.0, 0.0))


def test_trims_keep_the_factor_on_the_servers_with_most_free_space():
    free = {A: 10, B: 30, C: 20, D: 30}
    assert choose_trims([A, B, C], free, 2) == [A]
    assert choose_trims([A, B, C, D], free, 2) == [C, A]
    assert choose_trims([A, B, C, D], free, 1) == [D, C, A]  # (B and D tie: the lower address stays)
    assert choose_trims([A, B], free, 2) == []  # never below the factor
    assert choose_trims([A], free, 2) == []
    assert choose_trims([A, B, C], {}, 2) == [C]  # unknown free space counts as none


def test_a_commit_is_at_risk_only_if_its_backup_began_before_a_prune_cutoff():
    assert not commit_at_risk(5000.0, None)  # no prune deleted anything
    assert commit_at_risk(5000.0, 6000.0)
    assert commit_at_risk(6000.0 + CLOCK_SLACK - 1, 6000.0)  # a client clock ahead
    assert not commit_at_risk(6000.0 + CLOCK_SLACK, 6000.0)


def test_only_an_admin_prunes_and_only_the_manager_deletes_chunks():
    assert refusal("admin", PruneRequest(), True) is None
    assert refusal("admin", PruneStatusRequest(), True) is None
    assert refusal("client", PruneRequest(), True) is not None
    assert refusal("client", PruneStatusRequest(), True) is not None
    assert refusal("server", PruneRequest(), True) is not None
    assert refusal("manager", DeleteChunks(chunk_ids=[cid("x")]), True) is None
    for role in ("client", "admin", "server"):
        assert refusal(role, DeleteChunks(chunk_ids=[cid("x")]), True) is not None


# --- the mark set and the claims in the catalog -------------------------------------------


def test_the_mark_roots_are_the_listed_snapshots_and_those_forgotten_within_the_grace(catalog):
    kept, old, recent = summary("kept", cid("t1")), summary("old", cid("t2")), summary("new", cid("t3"))
    for s in (kept, old, recent):
        catalog.add_snapshot(s)
    catalog.forget_snapshots([old.snapshot_id], now=100.0)
    catalog.forget_snapshots([recent.snapshot_id], now=900.0)
    snapshot_ids, trees = catalog.prune_roots(cutoff=500.0)
    assert snapshot_ids == [kept.snapshot_id]
    # The snapshot forgotten after the cutoff may be a running backup's parent: its tree counts.
    assert sorted(trees) == sorted([cid("t1"), cid("t3")])


def test_unreachable_chunks_are_those_not_marked(catalog):
    catalog.add_locations(A, [(cid(n), 10) for n in "abcd"], touched=50.0)
    catalog.begin_mark()
    catalog.mark([cid("a"), cid("c"), cid("zz")])  # (an id the catalog lacks is no matter)
    assert catalog.marked_count() == 3
    rows = catalog.unreachable("", 10)
    assert sorted(r[0] for r in rows) == sorted([cid("b"), cid("d")])
    assert all(size == 10 and touched == 50.0 and copies == 1 for _, size, touched, copies in rows)
    # Pages by id.
    first = catalog.unreachable("", 1)
    assert catalog.unreachable(first[0][0], 10)[0][0] != first[0][0]
    # A new mark starts empty.
    catalog.begin_mark()
    assert catalog.marked_count() == 0


def test_a_claim_rechecks_the_touch_and_unrecords_the_chunk_at_once(catalog):
    catalog.add_locations(A, [(cid("old"), 10), (cid("busy"), 20)], touched=50.0)
    catalog.add_locations(B, [(cid("old"), 10)])
    catalog.begin_mark()
    # A backup counts on "busy" (HasChunks) after the sweep listed it, before the claim.
    assert catalog.held_touching([cid("busy")], now=500.0) == {cid("busy"): [A]}
    claimed = catalog.claim_unreachable([cid("old"), cid("busy")], cutoff=100.0)
    assert claimed == [(cid("old"), 10, [A, B])]
    # From now on nothing counts on it: placement would store it again.
    assert catalog.holders([cid("old"), cid("busy")]) == {cid("busy"): [A]}
    assert catalog.sizes([cid("old")]) == {}
    # A server that kept it (stored again meanwhile) puts it back, touched.
    catalog.restore_copies(B, [(cid("old"), 10)], now=600.0)
    assert catalog.holders([cid("old")]) == {cid("old"): [B]}
    assert catalog.claim_unreachable([cid("old")], cutoff=100.0) == []


def test_chunks_are_touched_when_stored_again_or_learned_of(catalog):
    catalog.add_locations(A, [(cid("x"), 10)], added=100.0)
    catalog.add_locations(B, [(cid("x"), 10)], added=300.0)  # stored again later
    catalog.begin_report(C)
    catalog.report_page(C, [(cid("y"), 10)], final=True, now=400.0)  # first heard of now
    catalog.add_locations(C, [(cid("x"), 10)])  # a repair copy: no news
    catalog.begin_mark()
    touched = {c: t for c, _, t, _ in catalog.unreachable("", 10)}
    assert touched == {cid("x"): 300.0, cid("y"): 400.0}


def test_trims_are_claimed_only_while_the_chunk_keeps_more_than_the_factor(catalog):
    for server in (A, B, C):
        catalog.add_locations(server, [(cid("x"), 10)])
    catalog.add_locations(D, [(cid("x"), 10)])  # D is dead
    alive = {A, B, C}
    assert catalog.over_replicated(alive, 2, "", 10) == [(cid("x"), 10, [A, B, C])]
    assert catalog.over_replicated(alive, 3, "", 10) == []
    # Two drops asked, one allowed: the second would leave one live copy.
    assert catalog.claim_trims(alive, 2, [(cid("x"), A), (cid("x"), B)]) == [(cid("x"), A)]
    assert catalog.holders([cid("x")]) == {cid("x"): [B, C, D]}


def test_prunes_that_deleted_give_the_cutoff_commits_compare_with(catalog):
    assert catalog.last_prune_cutoff() is None
    catalog.record_prune(1000.0, 900.0)
    assert catalog.last_prune_cutoff() == 900.0  # under way (or cut short): it may delete
    catalog.finish_prune(1000.0, 5)
    catalog.record_prune(2000.0, 1900.0)
    catalog.finish_prune(2000.0, 0)  # deleted nothing
    assert catalog.last_prune_cutoff() == 900.0


# --- schema 4 -> 5 ---------------------------------------------------------------------------

V4_SCHEMA = """
CREATE TABLE servers (address TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    free_bytes INTEGER NOT NULL, chunk_count INTEGER NOT NULL);
CREATE TABLE chunks (chunk_id TEXT PRIMARY KEY, size INTEGER NOT NULL,
    added REAL NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE locations (chunk_id TEXT NOT NULL, server TEXT NOT NULL,
    PRIMARY KEY (chunk_id, server)) WITHOUT ROWID;
CREATE INDEX locations_by_server ON locations (server, chunk_id);
CREATE TABLE snapshots (snapshot_id TEXT PRIMARY KEY, time REAL NOT NULL, host TEXT NOT NULL,
    paths TEXT NOT NULL, tags TEXT NOT NULL, tree TEXT NOT NULL, parent TEXT NOT NULL,
    files INTEGER NOT NULL, dirs INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE INDEX snapshots_by_time ON snapshots (time, snapshot_id);
CREATE TABLE forgotten (snapshot_id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
"""


def test_a_version_4_catalog_is_migrated_keeping_what_the_servers_cannot_tell(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    old = sqlite3.connect(path)
    old.executescript(V4_SCHEMA)
    old.execute("INSERT INTO servers VALUES (?, 1, 2, 3, 4)", (A,))
    old.execute("INSERT INTO chunks VALUES (?, 10, 0)", (cid("x"),))
    old.execute("INSERT INTO locations VALUES (?, ?)", (cid("x"), A))
    old.execute("INSERT INTO forgotten VALUES (?, 5)", (cid("gone"),))
    old.execute("PRAGMA user_version = 4")
    old.commit()
    old.close()
    before = time.time()

    catalog = Catalog(path)
    try:
        assert catalog.moved_aside is None
        assert not any(".v4-" in name for name in os.listdir(tmp_path))  # not moved aside
        assert catalog.forgotten_among([cid("gone")]) == [cid("gone")]
        assert catalog.holders([cid("x")]) == {cid("x"): [A]}
        # What backups under way counted on is not known: every chunk counts as touched now.
        catalog.begin_mark()
        [(chunk_id, size, touched, copies)] = catalog.unreachable("", 10)
        assert (chunk_id, size, copies) == (cid("x"), 10, 1)
        assert touched >= int(before)
        assert catalog.prune_roots(0.0) == ([], [])  # (the old forgotten row has no tree)
        assert catalog.last_prune_cutoff() is None
    finally:
        catalog.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    check.close()


# --- the manager's options ---------------------------------------------------------------


def test_the_prune_options_default_to_a_day_of_grace_and_are_checked(tmp_path):
    options = manager_tap.Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert (options["prune-grace"], options["prune-rate"]) == (24 * 3600.0, 2000.0)
    options = manager_tap.Options()
    options.parseOptions(["--data", str(tmp_path), "--prune-grace", "0", "--prune-rate", "50"])
    assert (options["prune-grace"], options["prune-rate"]) == (0.0, 50.0)
    with pytest.raises(usage.UsageError, match="--prune-grace cannot be negative"):
        manager_tap.Options().parseOptions(["--data", str(tmp_path), "--prune-grace", "-1"])
    for rate in ("0", "-3"):
        with pytest.raises(usage.UsageError, match="--prune-rate must be positive"):
            manager_tap.Options().parseOptions(["--data", str(tmp_path), "--prune-rate", rate])


# --- the servers' deletion ---------------------------------------------------------------


def stored(store, kind: str, data: bytes) -> str:
    chunk_id = hashing.chunk_id(data) if kind == "data" else hashing.object_id(kind, data)
    store.put(kind, chunk_id, hashing.checksum(data), data)
    return chunk_id


def age(store, chunk_id: str, seconds: float):
    """Make a chunk's file ``seconds`` old (as if written then)."""
    path = store.path_for(chunk_id)
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_server_deletes_old_chunks_and_objects_but_no_root_and_nothing_fresh(tmp_path):
    store = ChunkStore(str(tmp_path / "data"))
    try:
        old = stored(store, "data", os.urandom(5000))
        tree = stored(store, "tree", objects.encode_tree(objects.make_tree(
            [objects.Node(name=b"a", type="file", content=(bytes.fromhex(old),))])))
        snapshot = stored(store, "snapshot", objects.encode_snapshot(objects.Snapshot(
            time_ns=1, host="h", paths=(b"/",), tree=bytes.fromhex(tree))))
        fresh = stored(store, "data", os.urandom(3000))
        for chunk_id in (old, tree, snapshot):
            age(store, chunk_id, 100)
        count = store.count()

        deleted, kept = store.delete_chunks([old, tree, snapshot, fresh, cid("never held")], 60)
        assert dict(deleted)[old] == HEADER_SIZE + 5000  # the bytes the file took
        assert set(dict(deleted)) == {old, tree}
        assert sorted(kept) == sorted([snapshot, fresh])  # a root; written a moment ago
        assert not store.has(old) and not store.has(tree)
        assert store.has(snapshot) and store.has(fresh)
        assert store.count() == count - 2
        # With no minimum age the fresh one goes too (a prune with no grace).
        assert store.delete_chunks([fresh], 0) == ([(fresh, HEADER_SIZE + 3000)], [])
    finally:
        store.close()


def test_storing_a_held_chunk_again_makes_it_fresh_for_a_prune(tmp_path):
    store = ChunkStore(str(tmp_path / "data"))
    try:
        data = os.urandom(4000)
        chunk_id = stored(store, "data", data)
        age(store, chunk_id, 100)
        # A backup placed it (its record was claimed by a prune) and stores it again.
        assert store.put_many("data", [(chunk_id, hashing.checksum(data), data)]) == []
        assert store.delete_chunks([chunk_id], 60) == ([], [chunk_id])
        assert store.has(chunk_id)
        # Deleted first, then stored again: written anew.
        age(store, chunk_id, 100)
        assert store.delete_chunks([chunk_id], 60) == ([(chunk_id, HEADER_SIZE + 4000)], [])
        assert store.put_many("data", [(chunk_id, hashing.checksum(data), data)]) == [
            (chunk_id, 4000)]
        assert store.get(chunk_id)[2] == data
    finally:
        store.close()


def test_a_lookup_rewrites_a_touch_only_once_it_is_older_than_the_slack(catalog):
    catalog.add_locations(A, [(cid("x"), 10)], touched=100.0)

    def touched() -> float:
        return catalog.db.execute("SELECT touched FROM chunks WHERE chunk_id = ?",
                                  (cid("x"),)).fetchone()[0]

    catalog.held_touching([cid("x")], now=150.0, slack=60.0)
    assert touched() == 100.0  # 50 s old: within the slack, not written
    catalog.held_touching([cid("x")], now=161.0, slack=60.0)
    assert touched() == 161.0  # 61 s old: written
    catalog.held_touching([cid("x")], now=162.0)
    assert touched() == 162.0  # no slack: every lookup touches
