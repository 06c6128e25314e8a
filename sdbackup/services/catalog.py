"""The manager's catalog: an index of what the storage servers hold.

Everything here can be rebuilt from the servers' reports: chunk locations from
their inventories, snapshots from the snapshot objects they hold. Nothing
about files is kept (the tree objects on the servers hold that), so the
catalog grows with chunks and snapshots, not with files per snapshot.

SQLite in WAL mode with ``synchronous=NORMAL``: a crash of the process loses nothing, a
power loss may lose the last writes, which the servers' inventories bring back (a FULL
sync of every ChunksAdded notice took a third of the manager's time in a first backup of
50,000 files). The schema version is ``PRAGMA user_version``. Tables::

    servers(address, first_seen, last_seen, free_bytes, chunk_count)
    chunks(chunk_id, size)              -- every chunk or object ever reported
    locations(chunk_id, server)         -- copies the servers reported
    snapshots(snapshot_id, time, host, paths, tags, tree, parent, files, dirs, bytes)
    forgotten(snapshot_id, at)          -- forgotten snapshots: a server that was down when
                                        -- they were forgotten is told to delete them

A catalog of another version (older, newer, or not a catalog at all) is moved
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
#: 4 added forgotten.
SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE servers (
    address TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    free_bytes INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL
);
CREATE TABLE chunks (
    chunk_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    -- When a server first told of it in a ChunksAdded (0: from an inventory). A chunk
    -- that new may have copies whose notices are still on their way: repair waits.
    added REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE locations (
    chunk_id TEXT NOT NULL,
    server TEXT NOT NULL,
    PRIMARY KEY (chunk_id, server)
) WITHOUT ROWID;
CREATE INDEX locations_by_server ON locations (server, chunk_id);
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
    bytes INTEGER NOT NULL
);
CREATE INDEX snapshots_by_time ON snapshots (time, snapshot_id);
CREATE TABLE forgotten (
    snapshot_id TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""

#: Values bound in one ``IN (...)`` list.
_IN_BATCH = 500


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
        if version is not None and version != SCHEMA_VERSION:
            self.moved_aside = _move_aside(path, version)
            self.log.warn("catalog {path} has schema version {version}, not {expected}: moved "
                          "to {aside}; a fresh index is rebuilt from what the servers hold",
                          path=path, version=version, expected=SCHEMA_VERSION,
                          aside=self.moved_aside)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if version != SCHEMA_VERSION:
            with self._transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.execute("CREATE TEMP TABLE reported (server TEXT NOT NULL, chunk_id TEXT NOT NULL,"
                        " PRIMARY KEY (server, chunk_id)) WITHOUT ROWID")

    def close(self):
        self.db.close()

    def _transaction(self):
        return _Transaction(self.db)

    def _select_in(self, sql: str, values: Iterable, *before):
        """Rows of ``sql`` (with one ``{}`` for an ``IN`` list) over ``values``, in batches."""
        values = list(values)
        for start in range(0, len(values), _IN_BATCH):
            part = values[start : start + _IN_BATCH]
            yield from self.db.execute(sql.format(",".join("?" * len(part))), (*before, *part))

    # --- servers -------------------------------------------------------------------

    def record_server(self, address: str, free_bytes: int, chunk_count: int, now: float):
        with self._transaction():
            self.db.execute(
                "INSERT INTO servers VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE "
                "SET last_seen=excluded.last_seen, free_bytes=excluded.free_bytes, "
                "chunk_count=excluded.chunk_count",
                (address, now, now, free_bytes, chunk_count),
            )

    def servers(self) -> list[tuple[str, float, int, int]]:
        """Every server ever seen: ``(address, last_seen, free_bytes, chunk_count)``."""
        return self.db.execute(
            "SELECT address, last_seen, free_bytes, chunk_count FROM servers ORDER BY address"
        ).fetchall()

    def server_addresses(self) -> set[str]:
        """The servers the catalog knows: those a starting manager waits for."""
        return {row[0] for row in self.db.execute("SELECT address FROM servers")}

    # --- chunks and locations ---------------------------------------------------------

    def _add(self, server: str, held: list[tuple[str, int]], added: float = 0.0):
        self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?)",
                            ((chunk_id, size, added) for chunk_id, size in held))
        self.db.executemany("INSERT OR IGNORE INTO locations VALUES (?, ?)",
                            ((chunk_id, server) for chunk_id, _ in held))

    def add_locations(self, server: str, held: Iterable[tuple[str, int]], reporting: bool = False,
                      added: float = 0.0):
        """``server`` holds these ``(chunk_id, size)``; ``reporting``: its inventory is under
        way, and they count as reported in it; ``added``: when a chunk new to the catalog
        was stored (0 when it is no news, such as a repair's copy)."""
        held = list(held)
        with self._transaction():
            self._add(server, held, added)
            if reporting:
                self.db.executemany("INSERT OR IGNORE INTO temp.reported VALUES (?, ?)",
                                    ((server, chunk_id) for chunk_id, _ in held))

    def begin_report(self, server: str):
        """An inventory of ``server`` starts: nothing counts as reported in it yet."""
        with self._transaction():
            self.db.execute("DELETE FROM temp.reported WHERE server = ?", (server,))

    def report_page(self, server: str, held: Iterable[tuple[str, int]], final: bool):
        """A page of ``server``'s inventory. Its copies count at once; the final page makes its
        recorded copies exactly the ones reported since ``begin_report``."""
        held = list(held)
        with self._transaction():
            self._add(server, held)
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
        """``(chunks known, with some but fewer than replicas live copies, with none)``."""
        live = ",".join("?" * len(alive)) or "NULL"
        total, under, missing = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(copies > 0 AND copies < ?), 0),"
            " COALESCE(SUM(copies = 0), 0) FROM ("
            " SELECT c.chunk_id, COUNT(l.server) AS copies FROM chunks c"
            f" LEFT JOIN locations l ON l.chunk_id = c.chunk_id AND l.server IN ({live})"
            " GROUP BY c.chunk_id)",
            (replicas, *sorted(alive)),
        ).fetchone()
        return total, under, missing

    def under_replicated(self, alive: set[str], copies: int, limit: int,
                         added_before: float = float("inf")) -> list[tuple[str, int, list[str]]]:
        """Up to ``limit`` chunks added before ``added_before`` with at least one but fewer
        than ``copies`` live copies: ``(chunk_id, size, live holders)``. Every chunk held
        counts: nothing is collected yet."""
        if not alive:
            return []
        live = ",".join("?" * len(alive))
        rows = self.db.execute(
            "SELECT c.chunk_id, c.size, group_concat(l.server, ' ') FROM chunks c"
            f" JOIN locations l ON l.chunk_id = c.chunk_id AND l.server IN ({live})"
            " WHERE c.added < ? GROUP BY c.chunk_id HAVING COUNT(l.server) < ? LIMIT ?",
            (*sorted(alive), added_before, copies, limit),
        ).fetchall()
        return [(chunk_id, size, sorted(servers.split(" "))) for chunk_id, size, servers in rows]

    # --- snapshots -------------------------------------------------------------------------

    def add_snapshot(self, summary: SnapshotSummary):
        """Index a snapshot (read from its object); indexing it again, or one forgotten (read
        while it was forgotten), changes nothing."""
        with self._transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO snapshots SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM forgotten WHERE snapshot_id = ?1)",
                (summary.snapshot_id, summary.time, summary.host, json.dumps(summary.paths),
                 json.dumps(summary.tags), summary.tree, summary.parent, summary.files,
                 summary.dirs, summary.bytes),
            )

    def snapshot(self, snapshot_id: str) -> SnapshotSummary | None:
        row = self.db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM snapshots WHERE snapshot_id = ?",
                              (snapshot_id,)).fetchone()
        return None if row is None else _summary(row)

    def snapshots(self) -> list[SnapshotSummary]:
        """Every snapshot, oldest first."""
        rows = self.db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM snapshots ORDER BY time, snapshot_id").fetchall()
        return [_summary(r) for r in rows]

    def snapshot_page(self, after: tuple[float, str] | None, limit: int) -> list[SnapshotSummary]:
        """Up to ``limit`` snapshots, oldest first, after the one made at ``after``
        ``(time, snapshot_id)`` (from the first when None).

        A row that is no valid summary (indexed before fields were bounded) is left out:
        one over-long host must not break every listing.
        """
        where, values = "", ()
        if after is not None:
            where, values = "WHERE time > ? OR (time = ? AND snapshot_id > ?)", (after[0], *after)
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
            self.db.executemany("DELETE FROM snapshots WHERE snapshot_id = ?",
                                ((s,) for s in forgotten))
            self.db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?, ?)",
                                ((s, now) for s in forgotten))
            self._drop_objects(forgotten)
        return forgotten

    def _drop_objects(self, object_ids: list[str]):
        self.db.executemany("DELETE FROM locations WHERE chunk_id = ?", ((c,) for c in object_ids))
        self.db.executemany("DELETE FROM chunks WHERE chunk_id = ?", ((c,) for c in object_ids))

    def forgotten_among(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Those of ``snapshot_ids`` that were forgotten."""
        return [row[0] for row in self._select_in(
            "SELECT snapshot_id FROM forgotten WHERE snapshot_id IN ({})",
            list(dict.fromkeys(snapshot_ids)))]

    def drop_forgotten_objects(self, snapshot_ids: Iterable[str]):
        """A server reported forgotten snapshot objects (and is told to delete them): they are
        no chunks to count or repair."""
        with self._transaction():
            self._drop_objects(list(snapshot_ids))


_SUMMARY_COLUMNS = "snapshot_id, time, host, paths, tags, tree, parent, files, dirs, bytes"


def _summary(row) -> SnapshotSummary:
    snapshot_id, time_, host, paths, tags, tree, parent, files, dirs, size = row
    return SnapshotSummary(snapshot_id, time_, host, json.loads(paths), tree, json.loads(tags),
                           parent, files, dirs, size)


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
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False
