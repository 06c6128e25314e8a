"""The manager's catalog: snapshots, their files, and where every chunk lives.

SQLite in WAL mode with ``synchronous=FULL``; every commit is one transaction,
so a crash leaves a file either fully recorded or absent. Tables::

    servers(address, first_seen, last_seen, free_bytes, chunk_count)
    locations(chunk_id, server)                   -- confirmed copies
    snapshots(snapshot_id, time, host, paths, files, bytes, finished)
    files(snapshot_id, path, kind, mode, mtime_ns, size, file_hash, link_target,
          ctime_ns, inode)
    file_chunks(snapshot_id, path, seq, chunk_id, size, checksum)

A chunk's size and checksum live with the file that uses it: a chunk known
only from a server's report (for example from an interrupted backup) can still
be deduplicated, and restores need no other table.

Every method blocks: the manager runs them on one dedicated thread.
"""

import json
import os
import secrets
import sqlite3
from collections.abc import Iterable

from sdbackup.protocols.messages import ChunkRef, FileEntry, SnapshotSummary, StoredChunk

SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    address TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    free_bytes INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS locations (
    chunk_id TEXT NOT NULL,
    server TEXT NOT NULL,
    PRIMARY KEY (chunk_id, server)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS locations_by_server ON locations (server, chunk_id);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    host TEXT NOT NULL,
    paths TEXT NOT NULL,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    finished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS files (
    snapshot_id TEXT NOT NULL REFERENCES snapshots (snapshot_id),
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    file_hash TEXT NOT NULL,
    link_target TEXT NOT NULL,
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (snapshot_id, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_chunks (
    snapshot_id TEXT NOT NULL,
    path TEXT NOT NULL,
    seq INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, path, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS file_chunks_by_chunk ON file_chunks (chunk_id);
"""


#: Chunks listed with a file; a larger file's others come a page at a time.
INLINE_CHUNKS = 4096
#: Chunks in one page of a listing, so that the answer fits in a frame.
PAGE_CHUNKS = 16_384


class CatalogError(Exception):
    code = "catalog-error"


class UnknownSnapshot(CatalogError):
    code = "unknown-snapshot"


class MissingChunks(CatalogError):
    code = "missing-chunks"


class Catalog:
    """The catalog in one SQLite file. Not thread-safe: use it from one thread."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    def _transaction(self):
        return _Transaction(self.db)

    # --- servers and locations -------------------------------------------

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

    def replace_locations(self, server: str, chunk_ids: Iterable[str]):
        """Make ``server``'s recorded copies exactly the ones it reported."""
        with self._transaction():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS reported (chunk_id TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM temp.reported")
            self.db.executemany(
                "INSERT OR IGNORE INTO temp.reported VALUES (?)", ((c,) for c in chunk_ids)
            )
            self.db.execute(
                "DELETE FROM locations WHERE server = ? "
                "AND chunk_id NOT IN (SELECT chunk_id FROM temp.reported)",
                (server,),
            )
            self.db.execute(
                "INSERT OR IGNORE INTO locations SELECT chunk_id, ? FROM temp.reported",
                (server,),
            )
            self.db.execute("DELETE FROM temp.reported")

    def holders(self, chunk_ids: Iterable[str]) -> dict[str, list[str]]:
        """The servers recorded as holding each chunk (live or not)."""
        result: dict[str, list[str]] = {}
        for chunk_id, server in self._select_in(
            "SELECT chunk_id, server FROM locations WHERE chunk_id IN ({}) ORDER BY server",
            chunk_ids,
        ):
            result.setdefault(chunk_id, []).append(server)
        return result

    def _select_in(self, sql: str, values: Iterable[str], batch: int = 500):
        values = list(values)
        for start in range(0, len(values), batch):
            part = values[start : start + batch]
            yield from self.db.execute(sql.format(",".join("?" * len(part))), part)

    def chunk_stats(self, alive: set[str], replicas: int) -> tuple[int, int, int]:
        """``(chunks in use, with some but fewer than replicas live copies, with none)``."""
        live = ",".join("?" * len(alive)) or "NULL"
        total, under, missing = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(copies > 0 AND copies < ?), 0),"
            " COALESCE(SUM(copies = 0), 0) FROM ("
            " SELECT u.chunk_id, COUNT(l.server) AS copies"
            " FROM (SELECT DISTINCT chunk_id FROM file_chunks) u"
            f" LEFT JOIN locations l ON l.chunk_id = u.chunk_id AND l.server IN ({live})"
            " GROUP BY u.chunk_id)",
            (replicas, *sorted(alive)),
        ).fetchone()
        return total, under, missing

    def under_replicated(self, alive: set[str], copies: int,
                         limit: int) -> list[tuple[str, int, list[str]]]:
        """Up to ``limit`` chunks in use with at least one but fewer than ``copies`` live
        copies: ``(chunk_id, size, live holders)``."""
        if not alive:
            return []
        live = ",".join("?" * len(alive))
        rows = self.db.execute(
            "SELECT u.chunk_id, u.size, group_concat(l.server, ' ') FROM"
            " (SELECT chunk_id, MAX(size) AS size FROM file_chunks GROUP BY chunk_id) u"
            f" JOIN locations l ON l.chunk_id = u.chunk_id AND l.server IN ({live})"
            " GROUP BY u.chunk_id HAVING COUNT(l.server) < ? LIMIT ?",
            (*sorted(alive), copies, limit),
        ).fetchall()
        return [(chunk_id, size, sorted(servers.split(" "))) for chunk_id, size, servers in rows]

    def add_locations(self, server: str, chunk_ids: Iterable[str]):
        with self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO locations VALUES (?, ?)",
                                ((c, server) for c in chunk_ids))

    def remove_locations(self, server: str, chunk_ids: Iterable[str]):
        with self._transaction():
            self.db.executemany("DELETE FROM locations WHERE chunk_id = ? AND server = ?",
                                ((c, server) for c in chunk_ids))

    # --- snapshots -----------------------------------------------------------

    def begin_snapshot(self, host: str, paths: list[str], now: float) -> str:
        snapshot_id = secrets.token_hex(4)
        with self._transaction():
            self.db.execute(
                "INSERT INTO snapshots (snapshot_id, time, host, paths) VALUES (?, ?, ?, ?)",
                (snapshot_id, now, host, json.dumps(paths)),
            )
        return snapshot_id

    def _open_snapshot(self, snapshot_id: str):
        row = self.db.execute(
            "SELECT finished FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)
        ).fetchone()
        if row is None:
            raise UnknownSnapshot(f"no snapshot {snapshot_id}")
        if row[0]:
            raise CatalogError(f"snapshot {snapshot_id} is already finished")

    def commit_files(self, snapshot_id: str, chunks: list[StoredChunk], files: list[FileEntry]):
        """Record confirmed copies, then files whose every chunk has a copy. All or nothing."""
        with self._transaction():
            self._open_snapshot(snapshot_id)
            self.db.executemany(
                "INSERT OR IGNORE INTO locations VALUES (?, ?)",
                ((c.chunk_id, server) for c in chunks for server in c.holders),
            )
            self._check_held(ref.chunk_id for f in files for ref in f.chunks)
            for f in files:
                if f.first_chunk:
                    self._check_staged(snapshot_id, f.path, f.first_chunk)
                else:
                    # A path committed again (overlapping backup paths) is replaced whole.
                    self.db.execute(
                        "DELETE FROM file_chunks WHERE snapshot_id = ? AND path = ?",
                        (snapshot_id, f.path),
                    )
            self.db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (snapshot_id, f.path, f.kind, f.mode, f.mtime_ns, f.size, f.file_hash,
                     f.link_target, f.ctime_ns, f.inode)
                    for f in files
                ),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO file_chunks VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (snapshot_id, f.path, seq, ref.chunk_id, ref.size, ref.checksum)
                    for f in files
                    for seq, ref in enumerate(f.chunks, start=f.first_chunk)
                ),
            )

    def stage_chunks(self, snapshot_id: str, path: str, first_chunk: int, chunks: list[ChunkRef]):
        """Record part of a large file's chunk list; it stays invisible until the file is committed."""
        with self._transaction():
            self._open_snapshot(snapshot_id)
            self._check_held(ref.chunk_id for ref in chunks)
            if first_chunk == 0:
                self.db.execute("DELETE FROM files WHERE snapshot_id = ? AND path = ?",
                                (snapshot_id, path))
                self.db.execute("DELETE FROM file_chunks WHERE snapshot_id = ? AND path = ?",
                                (snapshot_id, path))
            else:
                self._check_staged(snapshot_id, path, first_chunk)
            self.db.executemany(
                "INSERT INTO file_chunks VALUES (?, ?, ?, ?, ?, ?)",
                ((snapshot_id, path, seq, ref.chunk_id, ref.size, ref.checksum)
                 for seq, ref in enumerate(chunks, start=first_chunk)),
            )

    def _check_held(self, chunk_ids: Iterable[str]):
        needed = set(chunk_ids)
        missing = needed - set(self.holders(needed))
        if missing:
            raise MissingChunks(
                f"{len(missing)} chunks have no confirmed copy, "
                f"for example {sorted(missing)[0][:16]}"
            )

    def _check_staged(self, snapshot_id: str, path: str, first_chunk: int):
        (staged,) = self.db.execute(
            "SELECT COUNT(*) FROM file_chunks WHERE snapshot_id = ? AND path = ?",
            (snapshot_id, path),
        ).fetchone()
        if staged != first_chunk:
            raise CatalogError(f"{path}: {staged} chunks staged, the commit expects {first_chunk}")

    def finish_snapshot(self, snapshot_id: str) -> SnapshotSummary:
        with self._transaction():
            self._open_snapshot(snapshot_id)
            self.db.execute(
                "UPDATE snapshots SET finished = 1,"
                " files = (SELECT COUNT(*) FROM files WHERE snapshot_id = ?),"
                " bytes = (SELECT COALESCE(SUM(size), 0) FROM files WHERE snapshot_id = ?)"
                " WHERE snapshot_id = ?",
                (snapshot_id, snapshot_id, snapshot_id),
            )
        return self.snapshot(snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotSummary:
        row = self.db.execute(
            "SELECT snapshot_id, time, host, paths, files, bytes FROM snapshots"
            " WHERE snapshot_id = ? AND finished",
            (snapshot_id,),
        ).fetchone()
        if row is None:
            raise UnknownSnapshot(f"no finished snapshot {snapshot_id}")
        return _summary(row)

    def snapshots(self) -> list[SnapshotSummary]:
        rows = self.db.execute(
            "SELECT snapshot_id, time, host, paths, files, bytes FROM snapshots"
            " WHERE finished ORDER BY time, rowid"
        ).fetchall()
        return [_summary(r) for r in rows]

    def resolve_snapshot(self, ref: str) -> str:
        """A finished snapshot's id from ``latest``, its id, or a unique prefix of it."""
        if ref == "latest":
            row = self.db.execute(
                "SELECT snapshot_id FROM snapshots WHERE finished ORDER BY time DESC, rowid DESC"
            ).fetchone()
            if row is None:
                raise UnknownSnapshot("there are no snapshots yet")
            return row[0]
        rows = self.db.execute(
            "SELECT snapshot_id FROM snapshots WHERE finished"
            " AND substr(snapshot_id, 1, length(?1)) = ?1 AND length(?1) > 0",
            (ref,),
        ).fetchall()
        if len(rows) != 1:
            raise UnknownSnapshot(
                f"no snapshot {ref!r}" if not rows else f"{ref!r} names several snapshots"
            )
        return rows[0][0]

    def list_files(self, snapshot_id: str, after: str, limit: int) -> tuple[list[FileEntry], bool]:
        """A page of a snapshot's files in path order, and whether more follow.

        Each file carries its first ``inline_chunks`` chunks and its
        ``chunk_count``; a page holds at most ``limit`` files and
        ``max_chunks`` chunks, so its answer fits in a frame.
        """
        inline_chunks, max_chunks = INLINE_CHUNKS, PAGE_CHUNKS
        rows = self.db.execute(
            "SELECT path, kind, mode, mtime_ns, size, file_hash, link_target, ctime_ns, inode,"
            " (SELECT COUNT(*) FROM file_chunks c"
            "  WHERE c.snapshot_id = f.snapshot_id AND c.path = f.path)"
            " FROM files f WHERE snapshot_id = ? AND path > ? ORDER BY path LIMIT ?",
            (snapshot_id, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        total = 0
        for index, row in enumerate(rows):
            total += min(row[-1], inline_chunks)
            if total > max_chunks and index > 0:
                rows, more = rows[:index], True
                break
        counts = {row[0]: row[-1] for row in rows}
        rows = [row[:-1] for row in rows]
        chunks: dict[str, list[ChunkRef]] = {}
        if rows:
            for path, chunk_id, size, checksum in self.db.execute(
                "SELECT path, chunk_id, size, checksum FROM file_chunks"
                " WHERE snapshot_id = ? AND path >= ? AND path <= ? AND seq < ?"
                " ORDER BY path, seq",
                (snapshot_id, rows[0][0], rows[-1][0], inline_chunks),
            ):
                chunks.setdefault(path, []).append(ChunkRef(chunk_id, size, checksum))
        files = [
            FileEntry(
                path=path, kind=kind, mode=mode, mtime_ns=mtime_ns, size=size,
                file_hash=file_hash, link_target=link_target, chunks=chunks.get(path, []),
                chunk_count=counts[path], ctime_ns=ctime_ns, inode=inode,
            )
            for path, kind, mode, mtime_ns, size, file_hash, link_target, ctime_ns, inode in rows
        ]
        return files, more

    def list_chunks(self, snapshot_id: str, path: str, first_chunk: int,
                    limit: int) -> tuple[list[ChunkRef], bool]:
        """A page of one file's chunks from ``first_chunk`` on, and whether more follow."""
        rows = self.db.execute(
            "SELECT chunk_id, size, checksum FROM file_chunks"
            " WHERE snapshot_id = ? AND path = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (snapshot_id, path, first_chunk, limit + 1),
        ).fetchall()
        return [ChunkRef(*row) for row in rows[:limit]], len(rows) > limit


def _summary(row) -> SnapshotSummary:
    snapshot_id, time, host, paths, files, size = row
    return SnapshotSummary(snapshot_id, time, host, json.loads(paths), files, size)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False
