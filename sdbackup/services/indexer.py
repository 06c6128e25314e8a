"""The snapshot index: the manager's list of snapshots, read from the objects the servers hold.

Servers say which snapshot objects they hold, in their inventories and their
ChunksAdded notices; a client's CommitSnapshot names one it has just stored.
Each one the catalog lacks is fetched from a live holder, verified (checksum,
id, envelope), decoded and added to the catalog, a few at a time. This is how
a manager whose catalog was lost lists every snapshot again once the servers
have reported: no flag, no special path. A snapshot object that is not valid
is logged and skipped, never indexed. One the catalog remembers as forgotten is
not indexed either: the server reporting it is told to delete it.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup import objects
from sdbackup.limits import shorten
from sdbackup.names import escape
from sdbackup.objects import Kind
from sdbackup.protocols.messages import DeleteSnapshots, SnapshotSummary
from sdbackup.services.objectreads import ObjectInvalid, ObjectUnavailable, read_object

#: Snapshot objects fetched at once.
INDEX_AT_ONCE = 8
#: Seconds a server may take to delete forgotten snapshot objects.
DELETE_TIMEOUT = 60.0


class UnknownSnapshot(Exception):
    """No live server can give the snapshot object."""

    code = "unknown-snapshot"


class BadSnapshot(ObjectInvalid):
    """The object named as a snapshot is not a valid one."""


def summarize(snapshot_id: str, snapshot: objects.Snapshot) -> SnapshotSummary:
    """What the index lists of a snapshot; ``ValueError`` when its counts are not counts."""
    counts = snapshot.summary
    return SnapshotSummary(
        snapshot_id=snapshot_id, time=snapshot.time_ns / 1e9, host=snapshot.host,
        paths=[escape(p) for p in snapshot.paths], tree=snapshot.tree.hex(),
        tags=list(snapshot.tags), parent=snapshot.parent.hex(),
        files=counts.get("files", 0), dirs=counts.get("dirs", 0), bytes=counts.get("bytes", 0),
    )


class SnapshotIndexer:
    """Indexes the snapshot objects the servers report. ``manager`` gives ``live``, ``db``,
    ``catalog`` and ``clock``."""

    log = Logger()

    def __init__(self, manager, at_once: int = INDEX_AT_ONCE):
        self.manager = manager
        self.at_once = at_once
        self._queue: dict[str, None] = {}  # waiting, in order (a dict as an ordered set)
        self._running: dict[str, list[defer.Deferred]] = {}  # in flight -> who waits for it
        self._bad: set[str] = set()
        self._workers = 0
        self._idle: list[defer.Deferred] = []

    @property
    def pending(self) -> int:
        """Snapshots waiting or being read."""
        return len(self._queue) + len(self._running)

    async def learn(self, snapshot_ids: list[str], server):
        """``server`` (a ``LiveServer``) holds these snapshot objects: queue those the index
        lacks (read in the background). Those that were forgotten are not indexed: the server
        is told to delete them (it was down when they were forgotten)."""
        if not snapshot_ids:
            return
        manager = self.manager
        forgotten = await manager.db(manager.catalog.forgotten_among, snapshot_ids)
        if forgotten:
            await manager.db(manager.catalog.drop_forgotten_objects, forgotten)
            d = defer.ensureDeferred(self._delete_forgotten(server, forgotten))
            d.addErrback(lambda f: self.log.failure("deleting forgotten snapshots", f))
        unknown = await manager.db(manager.catalog.unknown_snapshots, snapshot_ids)
        for snapshot_id in unknown:
            if snapshot_id not in self._bad and snapshot_id not in self._running:
                self._queue[snapshot_id] = None
        while self._queue and self._workers < self.at_once:
            self._workers += 1
            d = defer.ensureDeferred(self._work())
            d.addErrback(lambda f: self.log.failure("snapshot indexing failed", f))

    async def _delete_forgotten(self, server, snapshot_ids: list[str]):
        self.log.info("server {address} holds {count} forgotten snapshots: deleting them",
                      address=server.address, count=len(snapshot_ids))
        try:
            await server.connection.request(DeleteSnapshots(snapshot_ids=snapshot_ids),
                                            DELETE_TIMEOUT, self.manager.clock)
        except Exception as e:  # it reports them again when it registers again
            self.log.warn("server {address} did not delete forgotten snapshots: {why}",
                          address=server.address, why=shorten(e))

    def idle(self) -> defer.Deferred:
        """Fires once nothing is waiting or being read."""
        if not self.pending:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    async def ensure(self, snapshot_id: str) -> SnapshotSummary:
        """The snapshot's summary, reading and indexing its object first if the index lacks it.

        Raises ``UnknownSnapshot`` when no live server gives it, ``BadSnapshot``
        when it is not a valid snapshot object.
        """
        if snapshot_id not in self._running:
            manager = self.manager
            summary = await manager.db(manager.catalog.snapshot, snapshot_id)
            if summary is not None:
                return summary
        return await self._index(snapshot_id)

    async def _work(self):
        try:
            while self._queue:
                snapshot_id = next(iter(self._queue))
                del self._queue[snapshot_id]
                try:
                    await self._index(snapshot_id)
                except BadSnapshot as e:
                    self.log.warn("snapshot {snapshot} skipped: {why}", snapshot=snapshot_id[:16],
                                  why=shorten(e))
                except UnknownSnapshot as e:
                    self.log.warn("snapshot {snapshot} cannot be indexed now: {why}",
                                  snapshot=snapshot_id[:16], why=shorten(e))
        finally:
            self._workers -= 1
            self._check_idle()

    def _index(self, snapshot_id: str) -> defer.Deferred:
        """Read and index one snapshot; a second caller waits for the same read."""
        waiter = defer.Deferred()
        waiting = self._running.get(snapshot_id)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._queue.pop(snapshot_id, None)
        self._running[snapshot_id] = [waiter]
        d = defer.ensureDeferred(self._read(snapshot_id))
        d.addBoth(self._done, snapshot_id)
        return waiter

    def _done(self, result, snapshot_id: str):
        if isinstance(result, Failure) and result.check(BadSnapshot):
            self._bad.add(snapshot_id)
        for waiter in self._running.pop(snapshot_id):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        self._check_idle()

    def _check_idle(self):
        if not self.pending and not self._workers:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    async def _read(self, snapshot_id: str) -> SnapshotSummary:
        manager = self.manager
        if snapshot_id in self._bad:
            raise BadSnapshot(f"snapshot {snapshot_id[:16]} is not a valid snapshot object")
        holders = (await manager.db(manager.catalog.holders, [snapshot_id])).get(snapshot_id, [])
        live = [h for h in holders if h in manager.live]
        if not live:
            raise UnknownSnapshot(f"no live server holds snapshot {snapshot_id[:16]}"
                                  + (f" (it was held by {', '.join(holders)})" if holders else ""))
        try:
            _, payload = await read_object(manager.live, live, snapshot_id, (Kind.SNAPSHOT,),
                                           manager.clock)
        except ObjectInvalid as e:
            raise BadSnapshot(str(e)) from None
        except ObjectUnavailable as e:
            raise UnknownSnapshot(str(e)) from None
        try:
            summary = summarize(snapshot_id, objects.decode_snapshot(payload))
        except ValueError as e:  # ObjectFormatError is one
            raise BadSnapshot(f"snapshot {snapshot_id[:16]} cannot be read: {e}") from None
        await manager.db(manager.catalog.add_snapshot, summary)
        return summary
