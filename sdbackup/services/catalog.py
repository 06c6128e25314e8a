"""The manager's catalog: an index of what the storage servers hold.

Everything here can be rebuilt from the servers' reports: chunk locations from
their inventories, snapshots from the snapshot objects they hold. Nothing
about files is kept (the tree objects on the servers hold that), so the
catalog grows with chunks and snapshots, not with files per snapshot.

SQLite in WAL mode with ``synchronous=NORMAL``: a power loss may lose the last writes,
which the servers' inventories bring back (a FULL sync of every ChunksAdded notice took a
third of the manager's time in a first backup of 50,000 files).

The news that comes all the time (copies the servers notice, lookups' touches, heartbeats)
is written in a transaction left open for a moment (``commit=False``, then
``commit_pending``), and any other write commits it with its own. Chunk ids are random, so
a transaction rewrites a B-tree page for nearly every id it adds: committed one notice at a
time, the manager wrote 1.6 GB to its catalog of 22 MB in a first backup of 50,000 files.
A crash of the process may lose the news since the last commit: the servers' inventories
(sent whenever a server registers) and heartbeats bring it back, and a lost touch is
covered by the commit's check (``Pruner.verify_commit``). The schema version is
``PRAGMA user_version``. Tables::

    servers(address, first_seen, last_seen, free_bytes, chunk_count,
            disk_id,                    -- its data folder's identity ('' when not told)
            draining,                   -- 1: place nothing on it, copy its chunks elsewhere
            retired)                    -- when it was retired (0: not): hidden, refused
    chunks(chunk_id, size, added,       -- every chunk or object ever reported
           touched)                     -- when a backup last stored or counted on it
    locations(chunk_id, server)         -- copies the servers reported
    snapshots(snapshot_id, time, host, paths, tags, tree, parent, files, dirs, bytes,
              repo)                     -- its repository (clients list one at a time)
    forgotten(snapshot_id, at, tree)    -- forgotten snapshots: a server that was down when
                                        -- they were forgotten is told to delete them
    prunes(started, cutoff, deleted)    -- prunes: a commit older than a cutoff is checked

A catalog of an older version with steps in ``MIGRATIONS`` up to this one is
migrated in place (what the servers cannot tell, such as which server is
draining, is kept). Any other (older, newer, or not a catalog at all) is moved
aside, named with a suffix, and a fresh one is created: rebuilding the index
from the servers is the migration.

Every method blocks: the manager runs them on one dedicated thread.
"""

import json
import os
import sqlite3
import time
from collections.abc import Iterable

from twisted.logger import Logger

from sdbackup.protocols.messages import SnapshotSummary

#: 1 was the unversioned catalog with file rows; 2 the first index; 3 added chunks.added;
#: 4 added forgotten; 5 added chunks.touched, forgotten.tree and prunes (prune); 6 added the
#: servers' disk_id, draining and retired; 7 added snapshots.repo; 8 dropped the index of
#: locations by server; 9 added the index of chunks by when they were added.
SCHEMA_VERSION = 9

SCHEMA = """
CREATE TABLE servers (
    address TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    free_bytes INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    disk_id TEXT NOT NULL DEFAULT '',
    draining INTEGER NOT NULL DEFAULT 0,
    retired REAL NOT NULL DEFAULT 0
);
CREATE TABLE chunks (
    chunk_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    -- When a server first told of it in a ChunksAdded (0: from an inventory). A chunk
    -- that new may have copies whose notices are still on their way: repair waits.
    added REAL NOT NULL DEFAULT 0,
    -- When a backup last stored it or counted on it (placement "known", HasChunks "held",
    -- Locate), or the catalog first learned of it: a prune spares it for its grace period.
    touched REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Repair judges the chunks added since its last pass without a scan of them all (added
-- grows with time: its entries go at the end).
CREATE INDEX chunks_by_added ON chunks (added);
-- No index by server: only an inventory's end and the server commands ask by server (a
-- scan), and such an index doubled the pages each copy noticed rewrites.
CREATE TABLE locations (
    chunk_id TEXT NOT NULL,
    server TEXT NOT NULL,
    PRIMARY KEY (chunk_id, server)
) WITHOUT ROWID;
CREATE TABLE snapshots (
    snapshot_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    host TEXT NOT NULL,
    paths TEXT NOT NULL,
    tags TEXT NOT NULL,
    tree TEXT NOT NULL,
    parent TEXT NOT NULL,
    files INTEGER NOT NULL,
    dirs INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    repo TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX snapshots_by_time ON snapshots (time, snapshot_id);
CREATE TABLE forgotten (
    snapshot_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    -- Its root tree: for a grace period a prune keeps what it reaches (a backup under way
    -- may have it as its parent).
    tree TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE prunes (
    started REAL PRIMARY KEY,
    -- Chunks touched since the cutoff were spared, and how many chunks it deleted (-1:
    -- under way, or cut short by a crash: it may have deleted some).
    cutoff REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
"""

#: Version -> the statements that take a catalog of that version to the next one.
MIGRATIONS: dict[int, str] = {
    # Every chunk counts as touched now: what backups under way counted on is not known.
    4: """
ALTER TABLE chunks ADD COLUMN touched REAL NOT NULL DEFAULT 0;
UPDATE chunks SET touched = CAST(strftime('%s', 'now') AS REAL);
ALTER TABLE forgotten ADD COLUMN tree TEXT NOT NULL DEFAULT '';
CREATE TABLE prunes (started REAL PRIMARY KEY, cutoff REAL NOT NULL,
                     deleted INTEGER NOT NULL DEFAULT 0);
""",
    5: """
ALTER TABLE servers ADD COLUMN disk_id TEXT NOT NULL DEFAULT '';
ALTER TABLE servers ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN retired REAL NOT NULL DEFAULT 0;
""",
    # A plaintext snapshot (paths listed) is of the default repository, the only one that
    # could be plaintext then; an encrypted one's repository is in its object, read again
    # when its servers report it.
    6: """
ALTER TABLE snapshots ADD COLUMN repo TEXT NOT NULL DEFAULT 'default';
DELETE FROM snapshots WHERE paths = '[]';
""",
    7: """
DROP INDEX IF EXISTS locations_by_server;
""",
    8: """
CREATE INDEX IF NOT EXISTS chunks_by_added ON chunks (added);
""",
}


def _migratable(version: int | None) -> bool:
    """True when ``MIGRATIONS`` lead from ``version`` to ``SCHEMA_VERSION``."""
    if version is None or version < 1:
        return False
    while version < SCHEMA_VERSION and version in MIGRATIONS:
        version += 1
    return version == SCHEMA_VERSION


#: Values bound in one ``IN (...)`` list.
_IN_BATCH = 500
#: SQLite's page cache (KiB).
CACHE_KIB = 16 * 1024


class CatalogError(Exception):
    code = "catalog-error"


class Catalog:
    """The catalog in one SQLite file. Not thread-safe: use it from one thread."""

    log = Logger()

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        #: Where a catalog of another version was moved, if one was.
        self.moved_aside: str | None = None
        version = _version_of(path)
        migrate = version != SCHEMA_VERSION and _migratable(version)
        if version is not None and version != SCHEMA_VERSION and not migrate:
            self.moved_aside = _move_aside(path, version)
            self.log.warn("catalog {path} has schema version {version}, not {expected}: moved "
                          "to {aside}; a fresh index is rebuilt from what the servers hold",
                          path=path, version=version, expected=SCHEMA_VERSION,
                          aside=self.moved_aside)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # Room for the pages of the transactions left open: SQLite's default of 2 MiB spills
        # them to the log long before they are committed.
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        if migrate:
            with self._transaction():
                while version < SCHEMA_VERSION:
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    version += 1
                    self.log.info("catalog {path} migrated to schema version {version}",
                                  path=path, version=version)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            with self._transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.execute("CREATE TEMP TABLE reported (server TEXT NOT NULL, chunk_id TEXT NOT NULL,"
                        " PRIMARY KEY (server, chunk_id)) WITHOUT ROWID")

    def close(self):
        self.commit_pending()
        self.db.close()

    def _transaction(self):
        return _Transaction(self.db)

    def commit_pending(self):
        """Commit the writes left pending (``commit=False``, lookups' touches); nothing when
        none are."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def _select_in(self, sql: str, values: Iterable, *before):
        """Rows of ``sql`` (with one ``{}`` for an ``IN`` list) over ``values``, in batches."""
        values = list(values)
        for start in range(0, len(values), _IN_BATCH):
            part = values[start : start + _IN_BATCH]
            yield from self.db.execute(sql.format(",".join("?" * len(part))), (*before, *part))

    # --- servers -------------------------------------------------------------------

    def record_server(self, address: str, free_bytes: int, chunk_count: int, now: float,
                      disk_id: str | None = None, commit: bool = True):
        """A server registered (with its ``disk_id``) or sent a heartbeat. A registration
        brings a retired address back; another disk at a draining one is not draining.
        ``commit=False``: left pending, as noticed copies are (a heartbeat's news)."""
        with self._transaction() if commit else _Pending(self.db):
            self.db.execute(
                "INSERT INTO servers (address, first_seen, last_seen, free_bytes, chunk_count,"
                " disk_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE "
                "SET last_seen=excluded.last_seen, free_bytes=excluded.free_bytes, "
                "chunk_count=excluded.chunk_count"
                + (", disk_id=excluded.disk_id, retired=0, draining=CASE WHEN servers.disk_id"
                   " IN ('', excluded.disk_id) THEN servers.draining ELSE 0 END"
                   if disk_id is not None else ""),
                (address, now, now, free_bytes, chunk_count, disk_id or ""),
            )

    def servers(self) -> list[tuple[str, float, int, int]]:
        """Every server seen and not retired: ``(address, last_seen, free_bytes, chunk_count)``."""
        return self.db.execute(
            "SELECT address, last_seen, free_bytes, chunk_count FROM servers WHERE retired = 0"
            " ORDER BY address"
        ).fetchall()

    def server_addresses(self) -> set[str]:
        """The servers the catalog knows (and were not retired): those a starting manager
        waits for."""
        return {row[0] for row in self.db.execute("SELECT address FROM servers WHERE retired = 0")}

    def server_records(self) -> list[tuple]:
        """Every server ever seen, retired ones too: ``(address, disk_id, last_seen,
        free_bytes, retired)``, by address."""
        return self.db.execute(
            "SELECT address, disk_id, last_seen, free_bytes, retired FROM servers"
            " ORDER BY address").fetchall()

    def server_of_disk(self, disk_id: str) -> list[tuple[str, float]]:
        """The servers recorded with this disk: ``(address, retired)``."""
        return self.db.execute("SELECT address, retired FROM servers WHERE disk_id = ?",
                               (disk_id,)).fetchall()

    def draining_servers(self) -> set[str]:
        return {row[0] for row in self.db.execute(
            "SELECT address FROM servers WHERE draining != 0 AND retired = 0")}

    def move_server(self, old: str, new: str):
        """A disk recorded at ``old`` is served at ``new`` now: its copies, its draining flag,
        go with it; ``old`` is forgotten."""
        with self._transaction():
            self.db.execute("UPDATE OR IGNORE locations SET server = ? WHERE server = ?",
                            (new, old))
            self.db.execute("DELETE FROM locations WHERE server = ?", (old,))
            self.db.execute("UPDATE servers SET draining = MAX(draining, (SELECT draining FROM"
                            " servers WHERE address = ?1)) WHERE address = ?2", (old, new))
            self.db.execute("DELETE FROM servers WHERE address = ?", (old,))

    def set_draining(self, address: str, draining: bool = True):
        with self._transaction():
            self.db.execute("UPDATE servers SET draining = ? WHERE address = ?",
                            (int(draining), address))

    def retire_server(self, address: str, now: float):
        """Forget a server's copies; keep it (and its disk) known as retired."""
        with self._transaction():
            self.db.execute("DELETE FROM locations WHERE server = ?", (address,))
            self.db.execute("UPDATE servers SET retired = ?, draining = 0 WHERE address = ?",
                            (now, address))

    def usage_by_server(self, only: str | None = None) -> dict[str, tuple[int, int]]:
        """``address -> (copies recorded, their bytes)``, of every server or ``only`` one."""
        where, values = ("WHERE l.server = ?", (only,)) if only is not None else ("", ())
        return {server: (count, size) for server, count, size in self.db.execute(
            "SELECT l.server, COUNT(*), COALESCE(SUM(c.size), 0) FROM locations l"
            f" JOIN chunks c ON c.chunk_id = l.chunk_id {where} GROUP BY l.server", values)}

    def shortfall(self, server: str, counting: set[str], others: set[str], copies: int
                  ) -> tuple[int, int]:
        """Of the chunks ``server`` holds: how many have fewer than ``copies`` on the
        ``counting`` servers, and how many have none on the ``others`` (live ones but it)."""
        counting_list = ",".join("?" * len(counting)) or "NULL"
        others_list = ",".join("?" * len(others)) or "NULL"
        short, lost = self.db.execute(
            "SELECT COALESCE(SUM(n < ?), 0), COALESCE(SUM(m = 0), 0) FROM ("
            " SELECT (SELECT COUNT(*) FROM locations o WHERE o.chunk_id = h.chunk_id"
            f"  AND o.server IN ({counting_list})) AS n,"
            " (SELECT COUNT(*) FROM locations o WHERE o.chunk_id = h.chunk_id"
            f"  AND o.server IN ({others_list})) AS m"
            " FROM locations h WHERE h.server = ?)",
            (copies, *sorted(counting), *sorted(others), server)).fetchone()
        return short, lost

    # --- chunks and locations ---------------------------------------------------------

    def _add(self, server: str, held: list[tuple[str, int]], added: float = 0.0,
             touched: float = 0.0):
        """Record copies; a chunk new to the catalog is touched at ``touched``, one stored
        again (``added``) is touched then too.

        In id order: ids are random, so the B-trees' pages are met one after another rather
        than in a random walk over a catalog larger than SQLite's cache (the manager's CPU
        in a first backup of 200,000 tiny files: 24 s in arrival order, 20 s sorted)."""
        held = sorted(held)
        self.db.executemany(
            "INSERT INTO chunks (chunk_id, size, added, touched) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (chunk_id) DO UPDATE SET touched = MAX(touched, excluded.added)",
            ((chunk_id, size, added, max(added, touched)) for chunk_id, size in held))
        self.db.executemany("INSERT OR IGNORE INTO locations VALUES (?, ?)",
                            ((chunk_id, server) for chunk_id, _ in held))

    def add_locations(self, server: str, held: Iterable[tuple[str, int]], reporting: bool = False,
                      added: float = 0.0, touched: float = 0.0, commit: bool = True):
        """``server`` holds these ``(chunk_id, size)``; ``reporting``: its inventory is under
        way, and they count as reported in it; ``added``: when a chunk new to the catalog
        was stored (0 when it is no news, such as a repair's copy); ``touched``: when a chunk
        new to the catalog counts as touched, if not ``added``. ``commit=False``: leave the
        transaction open, for ``commit_pending`` or the next write to commit (a notice's
        copies, which the server's inventory would bring back)."""
        held = list(held)
        with self._transaction() if commit else _Pending(self.db):
            self._add(server, held, added, touched)
            if reporting:
                self.db.executemany("INSERT OR IGNORE INTO temp.reported VALUES (?, ?)",
                                    ((server, chunk_id) for chunk_id, _ in held))

    def begin_report(self, server: str):
        """An inventory of ``server`` starts: nothing counts as reported in it yet."""
        with self._transaction():
            self.db.execute("DELETE FROM temp.reported WHERE server = ?", (server,))

    def report_page(self, server: str, held: Iterable[tuple[str, int]], final: bool,
                    now: float = 0.0):
        """A page of ``server``'s inventory. Its copies count at once; the final page makes its
        recorded copies exactly the ones reported since ``begin_report``. A chunk new to the
        catalog counts as touched ``now``: a backup may count on it already."""
        held = list(held)
        with self._transaction():
            self._add(server, held, touched=now)
            self.db.executemany("INSERT OR IGNORE INTO temp.reported VALUES (?, ?)",
                                ((server, chunk_id) for chunk_id, _ in held))
            if final:
                self.db.execute(
                    "DELETE FROM locations WHERE server = ?1 AND chunk_id NOT IN"
                    " (SELECT chunk_id FROM temp.reported WHERE server = ?1)", (server,))
                self.db.execute("DELETE FROM temp.reported WHERE server = ?", (server,))

    def remove_locations(self, server: str, chunk_ids: Iterable[str]):
        with self._transaction():
            self.db.executemany("DELETE FROM locations WHERE chunk_id = ? AND server = ?",
                                ((c, server) for c in chunk_ids))

    def holders(self, chunk_ids: Iterable[str]) -> dict[str, list[str]]:
        """The servers recorded as holding each chunk (live or not); unheld ones left out."""
        result: dict[str, list[str]] = {}
        for chunk_id, server in self._select_in(
            "SELECT chunk_id, server FROM locations WHERE chunk_id IN ({}) ORDER BY server",
            set(chunk_ids),
        ):
            result.setdefault(chunk_id, []).append(server)
        return result

    def sizes(self, chunk_ids: Iterable[str]) -> dict[str, int]:
        return dict(self._select_in("SELECT chunk_id, size FROM chunks WHERE chunk_id IN ({})",
                                    set(chunk_ids)))

    def chunk_stats(self, alive: set[str], replicas: int) -> tuple[int, int, int]:
        """``(chunks known, with some but fewer than replicas live copies, with none)``.

        Counts the live copies in one scan of the copies, in the order they are kept (a third
        of the time of a join of every chunk with its copies: 1.2 s against 3.9 s at a million
        chunks); the chunks with none are the rest of the chunks known."""
        live = ",".join("?" * len(alive)) or "NULL"
        total, under, held = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM chunks), COALESCE(SUM(copies < ?), 0), COUNT(*) FROM ("
            f" SELECT COUNT(*) AS copies FROM locations WHERE server IN ({live})"
            " GROUP BY chunk_id)",
            (replicas, *sorted(alive)),
        ).fetchone()
        return total, under, total - held

    def under_replicated(self, alive: set[str], copies: int, limit: int,
                         added_before: float = float("inf"), draining: set[str] = frozenset(),
                         added_since: float | None = None) -> list[tuple[str, int, list[str]]]:
        """Up to ``limit`` chunks added before ``added_before`` (and, with ``added_since``, not
        before that) with at least one but fewer than ``copies`` live copies: ``(chunk_id,
        size, live holders)``. Copies on the ``draining`` servers are holders that do not
        count. Every chunk held counts: a chunk stops counting only when a prune drops its
        records.

        With ``added_since``, only the chunks added in that window are read (through the
        index by ``added``); without, every chunk is, in id order as the tables keep them."""
        if not alive:
            return []
        live = ",".join("?" * len(alive))
        holding = ",".join("?" * (len(alive) + len(draining)))
        # A window goes through the index by ``added`` (SQLite would rather scan every copy);
        # a scan of every chunk does not (``+c.added``), or it would look each one up again.
        # Grouped in the order the rows come, so that groups are made as they come.
        chunks, window, order, bounds = (
            ("chunks c INDEXED BY chunks_by_added", "c.added >= ? AND c.added < ?",
             "c.added, c.chunk_id", (added_since, added_before)) if added_since is not None
            else ("chunks c", "+c.added < ?", "c.chunk_id", (added_before,)))
        rows = self.db.execute(
            f"SELECT c.chunk_id, c.size, group_concat(l.server, ' ') FROM {chunks}"
            f" JOIN locations l ON l.chunk_id = c.chunk_id AND l.server IN ({holding})"
            f" WHERE {window} GROUP BY {order} HAVING SUM(l.server IN ({live})) < ?"
            " LIMIT ?",
            (*sorted(alive), *sorted(draining), *bounds, *sorted(alive), copies, limit),
        ).fetchall()
        return [(chunk_id, size, sorted(servers.split(" "))) for chunk_id, size, servers in rows]

    # --- snapshots -------------------------------------------------------------------------

    def add_snapshot(self, summary: SnapshotSummary):
        """Index a snapshot (read from its object); indexing it again, or one forgotten (read
        while it was forgotten), changes nothing."""
        with self._transaction():
            self._insert_snapshot(summary)

    def snapshot(self, snapshot_id: str) -> SnapshotSummary | None:
        row = self.db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM snapshots WHERE snapshot_id = ?",
                              (snapshot_id,)).fetchone()
        return None if row is None else _summary(row)

    def snapshots(self) -> list[SnapshotSummary]:
        """Every snapshot, oldest first."""
        rows = self.db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM snapshots ORDER BY time, snapshot_id").fetchall()
        return [_summary(r) for r in rows]

    def snapshot_page(self, after: tuple[float, str] | None, limit: int, repo: str = ""
                      ) -> list[SnapshotSummary]:
        """Up to ``limit`` snapshots, oldest first, after the one made at ``after``
        ``(time, snapshot_id)`` (from the first when None); of repository ``repo`` (of all
        when empty).

        A row that is no valid summary (indexed before fields were bounded) is left out:
        one over-long host must not break every listing.
        """
        where, values = "WHERE (? = '' OR repo = ?)", (repo, repo)
        if after is not None:
            where += " AND (time > ? OR (time = ? AND snapshot_id > ?))"
            values += (after[0], *after)
        rows = self.db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM snapshots {where} "
                               "ORDER BY time, snapshot_id", values)
        page = []
        for row in rows:  # (read as needed: the query has no LIMIT because rows may be skipped)
            try:
                page.append(_summary(row))
            except ValueError:
                continue
            if len(page) == limit:
                break
        rows.close()  # (ends the read at once, not when the cursor is collected)
        return page

    def snapshot_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]

    def unknown_snapshots(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Those of ``snapshot_ids`` the index lacks (and has not forgotten), in the order
        given."""
        snapshot_ids = list(dict.fromkeys(snapshot_ids))
        known = {row[0] for row in self._select_in(
            "SELECT snapshot_id FROM snapshots WHERE snapshot_id IN ({})", snapshot_ids)}
        known.update(self.forgotten_among(snapshot_ids))
        return [s for s in snapshot_ids if s not in known]

    def forget_snapshots(self, snapshot_ids: Iterable[str], now: float) -> list[str]:
        """Unlist these snapshots and remember them as forgotten; their objects' records go
        too (the servers delete them). The ids that were listed, in the order given."""
        snapshot_ids = list(dict.fromkeys(snapshot_ids))
        with self._transaction():
            listed = {row[0] for row in self._select_in(
                "SELECT snapshot_id FROM snapshots WHERE snapshot_id IN ({})", snapshot_ids)}
            forgotten = [s for s in snapshot_ids if s in listed]
            self.db.executemany(
                "INSERT OR IGNORE INTO forgotten (snapshot_id, at, tree)"
                " SELECT ?1, ?2, COALESCE((SELECT tree FROM snapshots WHERE snapshot_id = ?1), '')",
                ((s, now) for s in forgotten))
            self.db.executemany("DELETE FROM snapshots WHERE snapshot_id = ?",
                                ((s,) for s in forgotten))
            self._drop_objects(forgotten)
        return forgotten

    def replace_snapshot(self, summary: SnapshotSummary, replaced: str, now: float) -> bool:
        """List ``summary`` instead of the snapshot ``replaced`` (a tag change), at once: the
        old one is remembered as forgotten, so no server's copy lists it again. Whether it was
        listed."""
        with self._transaction():
            listed = self.db.execute("DELETE FROM snapshots WHERE snapshot_id = ?",
                                     (replaced,)).rowcount > 0
            self.db.execute("INSERT OR IGNORE INTO forgotten (snapshot_id, at) VALUES (?, ?)",
                            (replaced, now))
            self._drop_objects([replaced])
            self._insert_snapshot(summary)
        return listed

    def _insert_snapshot(self, summary: SnapshotSummary):
        """List a snapshot, unless it is listed already or forgotten (inside a transaction)."""
        self.db.execute(
            "INSERT OR IGNORE INTO snapshots SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
            " WHERE NOT EXISTS (SELECT 1 FROM forgotten WHERE snapshot_id = ?1)",
            (summary.snapshot_id, summary.time, summary.host, json.dumps(summary.paths),
             json.dumps(summary.tags), summary.tree, summary.parent, summary.files,
             summary.dirs, summary.bytes, summary.repo),
        )

    def _drop_objects(self, object_ids: list[str]):
        self.db.executemany("DELETE FROM locations WHERE chunk_id = ?", ((c,) for c in object_ids))
        self.db.executemany("DELETE FROM chunks WHERE chunk_id = ?", ((c,) for c in object_ids))

    def forgotten_among(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Those of ``snapshot_ids`` that were forgotten."""
        return [row[0] for row in self._select_in(
            "SELECT snapshot_id FROM forgotten WHERE snapshot_id IN ({})",
            list(dict.fromkeys(snapshot_ids)))]

    def forget_key(self, key_id: str, now: float):
        """Remember a removed key object as forgotten, as a snapshot: a server that was down
        when it was removed is told to delete it when it reports it, even after a restart."""
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO forgotten (snapshot_id, at) VALUES (?, ?)",
                            (key_id, now))
            self._drop_objects([key_id])

    def drop_forgotten_objects(self, snapshot_ids: Iterable[str]):
        """A server reported forgotten snapshot objects (and is told to delete them): they are
        no chunks to count or repair."""
        with self._transaction():
            self._drop_objects(list(snapshot_ids))


    # --- prune (``sdbackup/services/prune.py``) ------------------------------------------

    def held_touching(self, chunk_ids: Iterable[str], now: float, slack: float = 0.0
                      ) -> dict[str, list[str]]:
        """``holders``; and every chunk held is touched ``now``: a backup counts on it from
        this answer on, so a prune sweeping meanwhile spares it. One touched within ``slack``
        seconds is left as it is: the write is most of the cost of a lookup, and an unchanged
        backup looks up every chunk it has. The touches are left pending, as noticed copies
        are (``commit_pending``): a backup asks a lookup for each batch it places, and each
        commit would rewrite the pages of every copy noticed since the last one. A crash that
        loses them cannot lose a chunk: a commit whose backup began before a prune's cutoff
        is checked against what that prune deleted (``Pruner.verify_commit``)."""
        with _Pending(self.db):
            found = self.holders(chunk_ids)
            self.db.executemany("UPDATE chunks SET touched = ?1 WHERE chunk_id = ?2 AND touched < ?3",
                                ((now, c, now - slack) for c in found))
        return found

    def prune_roots(self, cutoff: float) -> tuple[list[str], list[str]]:
        """Where a mark starts: ``(snapshot ids, root trees)`` of the listed snapshots and of
        those forgotten since ``cutoff`` (a backup under way may have taken one as parent)."""
        listed = self.db.execute("SELECT snapshot_id, tree FROM snapshots").fetchall()
        recent = self.db.execute("SELECT tree FROM forgotten WHERE at >= ? AND tree != ''",
                                 (cutoff,)).fetchall()
        return [s for s, _ in listed], list(dict.fromkeys([t for _, t in listed]
                                                          + [t for (t,) in recent]))

    def begin_mark(self):
        """A mark starts: nothing is marked reachable yet (a temporary table of this
        connection, so the mark costs the manager no memory per chunk)."""
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS marked (chunk_id TEXT PRIMARY KEY)"
                        " WITHOUT ROWID")
        self.db.execute("DELETE FROM temp.marked")

    def mark(self, chunk_ids: Iterable[str]):
        with self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO temp.marked VALUES (?)",
                                ((c,) for c in chunk_ids))

    def marked_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM temp.marked").fetchone()[0]

    def unreachable(self, after: str, limit: int) -> list[tuple[str, int, float, int]]:
        """Up to ``limit`` chunks not marked, by id after ``after``: ``(chunk_id, size,
        touched, copies recorded)``."""
        return self.db.execute(
            "SELECT c.chunk_id, c.size, c.touched,"
            " (SELECT COUNT(*) FROM locations l WHERE l.chunk_id = c.chunk_id) FROM chunks c"
            " WHERE c.chunk_id > ? AND c.chunk_id NOT IN (SELECT chunk_id FROM temp.marked)"
            " ORDER BY c.chunk_id LIMIT ?", (after, limit)).fetchall()

    def claim_unreachable(self, chunk_ids: Iterable[str], cutoff: float
                          ) -> list[tuple[str, int, list[str]]]:
        """Of ``chunk_ids``, those still not marked and not touched since ``cutoff``, with
        their size and holders; their rows are removed in the same transaction, so from now
        on no placement, HasChunks or Locate counts on them. ``restore_copies`` puts back
        what a server kept."""
        chunk_ids = list(dict.fromkeys(chunk_ids))
        with self._transaction():
            doomed = list(self._select_in(
                "SELECT chunk_id, size FROM chunks WHERE touched < ? AND chunk_id IN ({})"
                " AND chunk_id NOT IN (SELECT chunk_id FROM temp.marked)", chunk_ids, cutoff))
            holders = self.holders(c for c, _ in doomed)
            self._drop_objects([c for c, _ in doomed])
        return [(c, size, holders.get(c, [])) for c, size in doomed]

    def restore_copies(self, server: str, held: Iterable[tuple[str, int]], now: float):
        """A server kept chunks it was told to delete (stored again meanwhile): they are held,
        and touched ``now``."""
        held = list(held)
        with self._transaction():
            self._add(server, held, touched=now)
            self.db.executemany("UPDATE chunks SET touched = ?1 WHERE chunk_id = ?2 AND touched < ?1",
                                ((now, c) for c, _ in held))

    def over_replicated(self, alive: set[str], copies: int, after: str, limit: int
                        ) -> list[tuple[str, int, list[str]]]:
        """Up to ``limit`` chunks, by id after ``after``, with more than ``copies`` live
        copies: ``(chunk_id, size, live holders)``. Snapshot objects are left out: a prune
        deletes no root object (only ``forget`` does)."""
        if not alive:
            return []
        live = ",".join("?" * len(alive))
        rows = self.db.execute(
            "SELECT c.chunk_id, c.size, group_concat(l.server, ' ') FROM chunks c"
            f" JOIN locations l ON l.chunk_id = c.chunk_id AND l.server IN ({live})"
            " WHERE c.chunk_id > ? AND c.chunk_id NOT IN (SELECT snapshot_id FROM snapshots)"
            " GROUP BY c.chunk_id HAVING COUNT(l.server) > ?"
            " ORDER BY c.chunk_id LIMIT ?",
            (*sorted(alive), after, copies, limit)).fetchall()
        return [(chunk_id, size, sorted(servers.split(" "))) for chunk_id, size, servers in rows]

    def claim_trims(self, alive: set[str], copies: int, drops: Iterable[tuple[str, str]]
                    ) -> list[tuple[str, str]]:
        """Remove the records of these ``(chunk_id, server)`` copies, each only while its
        chunk keeps more than ``copies`` live copies; the ones removed."""
        claimed = []
        with self._transaction():
            for chunk_id, server in drops:
                holders = self.holders([chunk_id]).get(chunk_id, [])
                if server in holders and sum(h in alive for h in holders) > copies:
                    self.db.execute("DELETE FROM locations WHERE chunk_id = ? AND server = ?",
                                    (chunk_id, server))
                    claimed.append((chunk_id, server))
        return claimed

    def record_prune(self, started: float, cutoff: float):
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO prunes VALUES (?, ?, -1)", (started, cutoff))

    def finish_prune(self, started: float, deleted: int):
        with self._transaction():
            self.db.execute("UPDATE prunes SET deleted = ? WHERE started = ?", (deleted, started))

    def last_prune_cutoff(self) -> float | None:
        """The latest cutoff of a prune that deleted chunks (or may have: one cut short): a
        backup older than that may have counted on one (None when no prune deleted any)."""
        return self.db.execute("SELECT MAX(cutoff) FROM prunes WHERE deleted != 0").fetchone()[0]

_SUMMARY_COLUMNS = "snapshot_id, time, host, paths, tags, tree, parent, files, dirs, bytes, repo"


def _summary(row) -> SnapshotSummary:
    snapshot_id, time_, host, paths, tags, tree, parent, files, dirs, size, repo = row
    return SnapshotSummary(snapshot_id, time_, host, json.loads(paths), tree, json.loads(tags),
                           parent, files, dirs, size, repo)


def _version_of(path: str) -> int | None:
    """The schema version of the catalog at ``path``; None when there is none yet (no file,
    or an empty database); -1 when the file is not a database SQLite can read."""
    if not os.path.exists(path):
        return None
    try:
        db = sqlite3.connect(path)
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            (tables,) = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return -1
    if version == 0 and tables == 0:
        return None
    return version


def _move_aside(path: str, version: int) -> str:
    """Rename the catalog (and its WAL files) with a suffix naming its version and the time."""
    label = "unreadable" if version < 0 else f"v{version}"
    aside = f"{path}.{label}-{time.strftime('%Y%m%dT%H%M%S')}"
    while os.path.exists(aside):
        aside += "+"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception. Inside a
    transaction left open (``_Pending``) it is a savepoint: an exception undoes its own
    writes only (the pending ones stay pending), and success commits them with it."""

    def __init__(self, db):
        self.db = db
        self.nested = False

    def __enter__(self):
        self.nested = self.db.in_transaction
        self.db.execute("SAVEPOINT step" if self.nested else "BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        if not kind:
            if self.nested:
                self.db.execute("RELEASE step")
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # (some errors, a full disk among them, roll back all)
            if self.nested:
                self.db.execute("ROLLBACK TO step")
                self.db.execute("RELEASE step")
            else:
                self.db.execute("ROLLBACK")
        return False


class _Pending:
    """Writes left in an open transaction (begun if none is). Without a savepoint: one costs
    a copy of each page it changes (the whole catalog's worth every few seconds, measured
    in a first backup of 50,000 files), and what such writes leave on an exception is
    true all the same (copies the servers told of, touches, heartbeats)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        return False
