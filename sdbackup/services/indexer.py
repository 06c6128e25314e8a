"""The snapshot index: the manager's list of snapshots, read from the objects the servers hold.

Servers say which snapshot objects they hold, in their inventories and their
ChunksAdded notices; a client's CommitSnapshot names one it has just stored.
Each one the catalog lacks is fetched from a live holder, verified (checksum,
id, envelope), decoded and added to the catalog, a few at a time. This is how
a manager whose catalog was lost lists every snapshot again once the servers
have reported: no flag, no special path. A snapshot object that is not valid
is logged and skipped, never indexed. One the catalog remembers as forgotten is
not indexed either: the server reporting it is told to delete it.

Key objects (an encrypted repository's wrapped keys, ``sdbackup.sealing``) are
kept with the snapshots on the servers and reported the same way: the indexer
reads them too, and keeps which repository each belongs to in ``keys``, in
memory: every start rebuilds it from the servers' reports. A removed key is
remembered as forgotten in the catalog, as a snapshot is.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup import objects, sealing
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
        repo=snapshot.repo or sealing.DEFAULT_REPO,
    )


def same_content(a: SnapshotSummary, b: SnapshotSummary) -> bool:
    """Whether two snapshots list the same files: one may replace the other (a tag change)."""
    return (a.tree, a.host, sorted(a.paths)) == (b.tree, b.host, sorted(b.paths))


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
        #: Originals not indexed yet -> the snapshot a tag change replaced each with (a rebuilt
        #: index may read a replacement before its original).
        self._replaced_by: dict[str, SnapshotSummary] = {}
        #: Original -> (generation, summary) of the latest version of its line read since the
        #: manager started: a rebuilt index keeps only the latest of the versions it reads.
        self._lines: dict[str, tuple[int, SnapshotSummary]] = {}
        self._workers = 0
        self._idle: list[defer.Deferred] = []
        #: Key objects read: id -> repository. Removed ones are forgotten (in the catalog).
        self.keys: dict[str, str] = {}
        #: Key objects stored since the manager started and not committed yet (an ``init``
        #: under way, or one that died): not listed; an ``init`` racing them wins.
        self.uncommitted_keys: set[str] = set()
        self._stored_now: set[str] = set()

    @property
    def pending(self) -> int:
        """Snapshots waiting or being read."""
        return len(self._queue) + len(self._running)

    async def learn(self, snapshot_ids: list[str], server, stored_now: bool = False):
        """``server`` (a ``LiveServer``) holds these snapshot objects: queue those the index
        lacks (read in the background). Those that were forgotten are not indexed: the server
        is told to delete them (it was down when they were forgotten). ``stored_now``: they
        were just stored (not reported in an inventory): a key object among them is not
        listed until its client commits it."""
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
            if snapshot_id in self.keys:
                continue
            if snapshot_id not in self._bad and snapshot_id not in self._running:
                self._queue[snapshot_id] = None
                if stored_now:
                    self._stored_now.add(snapshot_id)
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
        summary = await self._index(snapshot_id)
        if not isinstance(summary, SnapshotSummary):
            raise BadSnapshot(f"{snapshot_id[:16]} is a key object, not a snapshot")
        return summary

    async def ensure_key(self, key_id: str) -> str:
        """The repository of a key object, reading it first if it is not known yet; raises
        as ``ensure`` does."""
        manager = self.manager
        if await manager.db(manager.catalog.forgotten_among, [key_id]):
            raise UnknownSnapshot(f"key {key_id[:16]} was removed")
        repo = self.keys.get(key_id)
        if repo is None:
            repo = await self._index(key_id)
        if not isinstance(repo, str):
            raise BadSnapshot(f"{key_id[:16]} is a snapshot, not a key object")
        return repo

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
        self._stored_now.discard(snapshot_id)
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
        found = await self.read(snapshot_id)
        if isinstance(found, str):
            return found  # a key object's repository (``keys`` has it now)
        summary, snapshot = found
        await self._list(summary, snapshot)
        return summary

    async def read(self, snapshot_id: str) -> tuple[SnapshotSummary, objects.Snapshot]:
        """A snapshot object from a live holder, verified and decoded, not indexed."""
        manager = self.manager
        if snapshot_id in self._bad:
            raise BadSnapshot(f"snapshot {snapshot_id[:16]} is not a valid snapshot object")
        holders = (await manager.db(manager.catalog.holders, [snapshot_id])).get(snapshot_id, [])
        live = [h for h in holders if h in manager.live]
        if not live:
            raise UnknownSnapshot(f"no live server holds snapshot {snapshot_id[:16]}"
                                  + (f" (it was held by {', '.join(holders)})" if holders else ""))
        try:
            kind, payload = await read_object(manager.live, live, snapshot_id,
                                              (Kind.SNAPSHOT, Kind.KEY), manager.clock)
        except ObjectInvalid as e:
            raise BadSnapshot(str(e)) from None
        except ObjectUnavailable as e:
            raise UnknownSnapshot(str(e)) from None
        if kind == Kind.KEY:
            try:
                repo = sealing.decode_key(payload).repo
            except ValueError as e:
                raise BadSnapshot(f"key {snapshot_id[:16]} cannot be read: {e}") from None
            if not await manager.db(manager.catalog.forgotten_among, [snapshot_id]):
                self.keys[snapshot_id] = repo  # (unless removed while it was read)
                if snapshot_id in self._stored_now:
                    self.uncommitted_keys.add(snapshot_id)
            return repo
        try:
            snapshot = objects.decode_snapshot(payload)
            summary = summarize(snapshot_id, snapshot)
        except ValueError as e:  # ObjectFormatError is one
            raise BadSnapshot(f"snapshot {snapshot_id[:16]} cannot be read: {e}") from None
        return summary, snapshot

    async def _list(self, summary: SnapshotSummary, snapshot: objects.Snapshot):
        """Index a snapshot read from a server. One a ``tag`` wrote (it names its ``original``)
        replaces its original when that holds the same content (root tree, host, paths), so
        an original left on a server that was down when it was replaced, read again by an
        index rebuilt from the servers, is not listed again: ``sdbackup tag`` cannot hide or
        swap content, only its tags. Of two versions of one line (the same original), the one
        of the later ``generation`` stays listed."""
        manager = self.manager
        snapshot_id = summary.snapshot_id
        original = snapshot.original.hex()
        if original and original != snapshot_id:
            newest = self._lines.get(original)
            if (newest is not None and newest[1].snapshot_id != snapshot_id
                    and same_content(newest[1], summary)):
                if newest[0] > snapshot.generation:  # a later version is listed: this one is stale
                    await self.replace(newest[1], snapshot_id)
                    return
                await self.replace(summary, newest[1].snapshot_id)
            self._lines[original] = (snapshot.generation, summary)
            old = await manager.db(manager.catalog.snapshot, original)
            if old is None:
                self._replaced_by[original] = summary
            elif same_content(old, summary):
                await self.replace(summary, original)
                return
        newer = self._replaced_by.get(snapshot_id)
        if newer is not None and same_content(newer, summary):
            await self.replace(newer, snapshot_id)
            return
        await manager.db(manager.catalog.add_snapshot, summary)

    async def replace(self, summary: SnapshotSummary, replaced: str):
        """List ``summary`` instead of ``replaced`` at once, and have every live server delete
        the replaced object (one down now deletes it when it reports it: it is forgotten)."""
        manager = self.manager
        await manager.db(manager.catalog.replace_snapshot, summary, replaced, manager.clock.seconds())
        self._replaced_by.pop(replaced, None)
        self.log.info("snapshot {snapshot} replaced by {replacement} (a tag change)",
                      snapshot=replaced[:16], replacement=summary.snapshot_id[:16])
        for server in list(manager.live.values()):
            d = defer.ensureDeferred(self._delete_forgotten(server, [replaced]))
            d.addErrback(lambda f: self.log.failure("deleting a replaced snapshot", f))
