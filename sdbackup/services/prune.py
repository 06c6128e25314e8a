"""``sdbackup prune``: delete what no snapshot reaches, trim copies above the factor.

A prune is a mark and a sweep, run by the manager:

1. *Mark.* From every listed snapshot, and every snapshot forgotten less than the
   grace period ago, the walk follows the envelope refs alone (as ``dagcheck``
   does: no key, no body), reading each tree and chunk list object once, and
   records every id it reaches in a temporary table of the catalog.
2. *Sweep.* Every chunk the catalog knows that is not marked, and that no backup
   stored or counted on since the mark started minus the grace period (its
   ``touched`` time: stored, placement ``known``, HasChunks ``held``, Locate), is
   claimed (its records go, in one catalog transaction that checks ``touched``
   again, so nothing counts on it from then on) and deleted on every live server
   holding it (``DeleteChunks``), at most ``rate`` copies a second. A server keeps
   a file written or stored again within the grace period, and says so; its
   record comes back.
3. *Trim.* Chunks with more live copies than the replication factor lose the
   copies on the servers with the least free space, never below the factor, and
   never while a repair pass (which may be copying from them) runs.

Why a backup under way loses nothing is argued in docs/architecture.rst
("Pruning"); ``verify_commit`` is the last guard: a backup older than a prune's
cutoff has its snapshot walked at commit, and is refused if it references a
chunk the prune deleted. The decisions (``cutoff``, ``deletable``,
``choose_trims``, ``commit_at_risk``) are pure functions.
"""

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from sdbackup import objects
from sdbackup.limits import shorten
from sdbackup.objects import Kind
from sdbackup.protocols.messages import DeleteChunks, DeleteSnapshots, PruneStatus, SnapshotSummary
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.chunkstore import HEADER_SIZE
from sdbackup.services.dagcheck import READS_AT_ONCE, DagCheck
from sdbackup.services.indexer import DELETE_TIMEOUT
from sdbackup.services.objectreads import ObjectInvalid, ObjectUnavailable, read_object
from sdbackup.services.pacing import Pace

#: The default grace period: longer than any backup is expected to take. A chunk a backup
#: stored or counted on less than this long before a prune's mark began is never deleted.
DEFAULT_GRACE = 24 * 3600.0
#: The default deletion rate, in copies a second over all servers.
DEFAULT_RATE = 2000.0
#: Chunks claimed (and ids sent to one server) at a time; data refs marked at a time.
SWEEP_BATCH = 1000
MARK_BATCH = 2000
#: How far a client's clock may run ahead of the manager's, in seconds: a snapshot's time
#: (its backup's start, by the client's clock) is compared with a prune's cutoff.
CLOCK_SLACK = 600.0
#: Seconds between looks at whether a repair pass has ended, before trimming.
REPAIR_WAIT = 0.5


class PruneError(Exception):
    code = "prune-failed"


# --- the rules --------------------------------------------------------------------------


def cutoff(mark_started: float, grace: float) -> float:
    """Chunks touched at or after this time are spared by a prune whose mark began then."""
    return mark_started - grace


def deletable(marked: bool, touched: float, cut: float) -> bool:
    """Whether a prune may delete a chunk: no snapshot reaches it, and no backup stored or
    counted on it since the cutoff."""
    return not marked and touched < cut


def choose_trims(holders: list[str], free: dict[str, int], copies: int) -> list[str]:
    """Of a chunk's live ``holders``, those whose copies go so that ``copies`` remain: the
    ones on the servers with the least free space (ties: the later address)."""
    if len(holders) <= copies:
        return []
    ranked = sorted(holders, key=lambda address: (-free.get(address, 0), address))
    return ranked[copies:]


def commit_at_risk(snapshot_time: float, last_cutoff: float | None,
                   slack: float = CLOCK_SLACK) -> bool:
    """Whether a snapshot's backup may have counted on a chunk a prune deleted: it began
    (by its client's clock, give or take ``slack``) before that prune's cutoff."""
    return last_cutoff is not None and snapshot_time < last_cutoff + slack


# --- a prune ----------------------------------------------------------------------------


@attrs.define
class PruneRun:
    """One prune: its settings and figures so far (``status`` makes the wire reply)."""

    prune_id: int
    dry_run: bool
    grace: float
    started: float
    cutoff: float
    state: str = "marking"
    finished: float | None = None
    snapshots: int = 0
    objects_read: int = 0
    reachable: int = 0
    unreachable: int = 0
    unreachable_bytes: int = 0
    recent: int = 0
    swept: int = 0
    deleted_chunks: int = 0
    deleted_copies: int = 0
    deleted_bytes: int = 0
    trimmed_copies: int = 0
    trimmed_bytes: int = 0
    error: str = ""
    done: defer.Deferred = attrs.field(factory=defer.Deferred, repr=False)

    @property
    def running(self) -> bool:
        return self.state not in ("done", "failed")

    def status(self, request_id: int, now: float) -> PruneStatus:
        return PruneStatus(
            request_id=request_id, prune_id=self.prune_id, state=self.state,
            dry_run=self.dry_run, elapsed=max(0.0, (self.finished or now) - self.started),
            grace=self.grace, snapshots=self.snapshots, objects_read=self.objects_read,
            reachable=self.reachable, unreachable=self.unreachable,
            unreachable_bytes=self.unreachable_bytes, recent=self.recent, swept=self.swept,
            deleted_chunks=self.deleted_chunks, deleted_copies=self.deleted_copies,
            deleted_bytes=self.deleted_bytes, trimmed_copies=self.trimmed_copies,
            trimmed_bytes=self.trimmed_bytes, error=self.error)


class Pruner:
    """Runs one prune at a time. ``manager`` gives ``live``, ``db``, ``catalog``, ``clock``,
    ``replicas`` and ``repair``."""

    log = Logger()

    def __init__(self, manager, grace: float = DEFAULT_GRACE, rate: float = DEFAULT_RATE):
        self.manager = manager
        self.grace = grace
        self.rate = rate
        #: The prune under way, or the last one.
        self.current: PruneRun | None = None
        self._paced = Pace()

    def start(self, dry_run: bool, who: str = "") -> PruneRun:
        """Start a prune; one under way is refused (``busy``)."""
        if self.current is not None and self.current.running:
            raise RemoteError(f"a prune is under way (started {self._age()} ago)", "busy")
        now = self.manager.clock.seconds()
        run = PruneRun((self.current.prune_id + 1) if self.current else 1, dry_run, self.grace,
                       now, cutoff(now, self.grace))
        self.current = run
        self.log.info("prune {id} started by {who}{dry}: sparing chunks touched in the last "
                      "{grace:.0f} s", id=run.prune_id, who=who, grace=self.grace,
                      dry=" (dry run)" if dry_run else "")
        d = defer.ensureDeferred(self._run(run))
        d.addErrback(self._failed, run)
        d.addBoth(self._finished, run)
        return run

    def _age(self) -> str:
        return f"{self.manager.clock.seconds() - self.current.started:.0f} s"

    def _failed(self, failure, run: PruneRun):
        run.state = "failed"
        run.error = str(failure.value) if failure.check(PruneError, RemoteError) else (
            f"{type(failure.value).__name__}: {failure.value}")
        if failure.check(PruneError):
            self.log.warn("prune {id} stopped: {why}", id=run.prune_id, why=run.error)
        else:
            self.log.failure("prune {id} failed", failure, id=run.prune_id)

    def _finished(self, _, run: PruneRun):
        if run.state != "failed":
            run.state = "done"
            self.log.info(
                "prune {id} done{dry}: {chunks} unreachable chunks ({copies} copies, {bytes} bytes) "
                "deleted, {spared} spared as recent, {trimmed} copies trimmed ({tbytes} bytes)",
                id=run.prune_id, dry=" (dry run: nothing deleted)" if run.dry_run else "",
                chunks=run.deleted_chunks, copies=run.deleted_copies, bytes=run.deleted_bytes,
                spared=run.recent, trimmed=run.trimmed_copies, tbytes=run.trimmed_bytes)
        run.finished = self.manager.clock.seconds()
        run.done.callback(None)

    async def _run(self, run: PruneRun):
        manager = self.manager
        if not run.dry_run:
            # Recorded before anything is deleted: a commit compares its snapshot with it.
            await manager.db(manager.catalog.record_prune, run.started, run.cutoff)
        await self._mark(run)
        run.state = "sweeping"
        try:
            await self._sweep(run)
            run.state = "trimming"
            await self._trim(run)
        finally:
            if not run.dry_run:
                await manager.db(manager.catalog.finish_prune, run.started,
                                 run.deleted_chunks + run.trimmed_copies)

    # --- mark ----------------------------------------------------------------------------

    async def _mark(self, run: PruneRun):
        """Record every id reachable from the roots; any object that cannot be read stops
        the prune (what it references is unknown, so nothing may be deleted)."""
        manager = self.manager
        snapshot_ids, roots = await manager.db(manager.catalog.prune_roots, run.cutoff)
        run.snapshots = len(snapshot_ids)
        # (Key objects of encrypted repositories are roots too: never deleted by a prune.)
        key_ids = list(getattr(manager.indexer, "keys", {}))
        await manager.db(manager.catalog.begin_mark)
        await manager.db(manager.catalog.mark, snapshot_ids + key_ids + roots)
        seen = set(roots)
        frontier = list(roots)
        pending_refs: list[str] = []
        while frontier:
            found: list[str] = []
            objects_left = iter(frontier)

            async def reader(objects_left=objects_left, found=found):
                for object_id in objects_left:
                    children, data_refs = await self._read(object_id)
                    run.objects_read += 1
                    found.extend(children)
                    pending_refs.extend(data_refs)
                    if len(pending_refs) >= MARK_BATCH:
                        batch = pending_refs[:]
                        del pending_refs[:]
                        await manager.db(manager.catalog.mark, batch)

            await defer.gatherResults([defer.ensureDeferred(reader())
                                       for _ in range(READS_AT_ONCE)], consumeErrors=True
                                      ).addErrback(lambda f: f.value.subFailure.raiseException())
            frontier = [c for c in dict.fromkeys(found) if c not in seen]
            seen.update(frontier)
            await manager.db(manager.catalog.mark, frontier)
        await manager.db(manager.catalog.mark, pending_refs)
        run.reachable = await manager.db(manager.catalog.marked_count)

    async def _read(self, object_id: str) -> tuple[list[str], list[str]]:
        """A tree or chunk list object's child objects and data refs."""
        manager = self.manager
        holders = (await manager.db(manager.catalog.holders, [object_id])).get(object_id, [])
        try:
            kind, payload = await read_object(manager.live, holders, object_id,
                                              (Kind.TREE, Kind.LIST), manager.clock)
        except (ObjectUnavailable, ObjectInvalid) as e:
            raise PruneError(f"object {object_id[:16]} cannot be read ({shorten(e)}): a prune "
                             f"deletes nothing while a snapshot's objects are unreadable (see "
                             f"sdbackup check)") from None
        envelope = objects.open_envelope(payload, kind)
        return ([ref.hex() for ref in envelope.tree_refs],
                [ref.hex() for ref in envelope.data_refs])

    # --- sweep ---------------------------------------------------------------------------

    async def _sweep(self, run: PruneRun):
        manager = self.manager
        # A first pass counts (the progress's total; all a dry run does).
        after = ""
        while page := await manager.db(manager.catalog.unreachable, after, SWEEP_BATCH):
            after = page[-1][0]
            for _, size, touched, copies in page:
                if deletable(False, touched, run.cutoff):
                    run.unreachable += 1
                    run.unreachable_bytes += size
                    if run.dry_run:
                        run.deleted_chunks += 1
                        run.deleted_copies += copies
                        run.deleted_bytes += (size + HEADER_SIZE) * copies
                else:
                    run.recent += 1
        if run.dry_run:
            run.swept = run.unreachable
            return
        after = ""
        while page := await manager.db(manager.catalog.unreachable, after, SWEEP_BATCH):
            after = page[-1][0]
            wanted = [c for c, _, touched, _ in page if deletable(False, touched, run.cutoff)]
            if not wanted:
                continue
            # Checked again, and unrecorded, in one transaction: from here on nothing counts on
            # these (a backup asking is told to store them again).
            claimed = await manager.db(manager.catalog.claim_unreachable, wanted, run.cutoff)
            sizes = {c: size for c, size, _ in claimed}
            by_server: dict[str, list[str]] = {}
            for chunk_id, _, holders in claimed:
                for address in holders:
                    by_server.setdefault(address, []).append(chunk_id)
            gone = await self._delete(by_server, sizes, run, trimming=False)
            run.deleted_chunks += len(gone)
            run.swept += len(claimed)

    async def _delete(self, by_server: dict[str, list[str]], sizes: dict[str, int],
                      run: PruneRun, trimming: bool) -> set[str]:
        """Delete on each live server the chunks given for it, all servers at once, paced;
        put back the records of what a server kept. The chunks deleted somewhere."""
        manager = self.manager
        servers = [(manager.live[a], ids) for a, ids in by_server.items() if a in manager.live]
        # (A server down now deletes nothing: its next inventory records its copies again,
        # as new and so touched, and a later prune deletes them.)
        await self._pace(sum(len(ids) for _, ids in servers))
        replies = await defer.DeferredList(
            [server.connection.request(DeleteChunks(chunk_ids=ids, min_age=run.grace),
                                       DELETE_TIMEOUT, manager.clock)
             for server, ids in servers], consumeErrors=True)
        gone = set()
        now = manager.clock.seconds()
        for (server, ids), (ok, reply) in zip(servers, replies, strict=True):
            if not ok:
                # Its copies stay unrecorded until its next inventory, which records them again.
                self.log.warn("prune: server {address} did not delete {count} chunks: {why}",
                              address=server.address, count=len(ids),
                              why=shorten(reply.getErrorMessage()))
                continue
            if reply.kept:
                await manager.db(manager.catalog.restore_copies, server.address,
                                 [(c, sizes[c]) for c in reply.kept if c in sizes], now)
            gone.update(reply.chunk_ids)
            if trimming:
                run.trimmed_copies += len(reply.chunk_ids)
                run.trimmed_bytes += reply.freed_bytes
            else:
                run.deleted_copies += len(reply.chunk_ids)
                run.deleted_bytes += reply.freed_bytes
        return gone

    async def _pace(self, copies: int):
        await self._paced.take(self.manager.clock, copies, self.rate)

    # --- trim ----------------------------------------------------------------------------

    async def _trim(self, run: PruneRun):
        manager = self.manager
        after = ""
        while True:
            while not run.dry_run and manager.repair.running is not None:
                # A repair pass may be copying from a copy this would delete.
                await task.deferLater(manager.clock, REPAIR_WAIT)
            # Copies on a draining server do not count toward the factor, and are not trimmed
            # (the drain moves them).
            counting = set(manager.live) - getattr(manager, "draining", set())
            page = await manager.db(manager.catalog.over_replicated, counting, manager.replicas,
                                    after, SWEEP_BATCH)
            if not page:
                return
            after = page[-1][0]
            free = {a: s.free_bytes for a, s in manager.live.items()}
            drops = [(chunk_id, address) for chunk_id, _, holders in page
                     for address in choose_trims(holders, free, manager.replicas)]
            sizes = {chunk_id: size for chunk_id, size, _ in page}
            if run.dry_run:
                run.trimmed_copies += len(drops)
                run.trimmed_bytes += sum(sizes[c] + HEADER_SIZE for c, _ in drops)
                continue
            counting = set(manager.live) - getattr(manager, "draining", set())
            claimed = await manager.db(manager.catalog.claim_trims, counting, manager.replicas,
                                       drops)
            by_server: dict[str, list[str]] = {}
            for chunk_id, address in claimed:
                by_server.setdefault(address, []).append(chunk_id)
            await self._delete(by_server, sizes, run, trimming=True)

    # --- commits -------------------------------------------------------------------------

    async def verify_commit(self, summary: SnapshotSummary):
        """Refuse a new snapshot that references a chunk a prune deleted (its backup ran
        longer than the grace period): it is forgotten again, and the client is told.

        A prune under way whose cutoff the backup may predate is waited for first."""
        manager = self.manager
        run = self.current
        if (run is not None and run.running and not run.dry_run
                and commit_at_risk(summary.time, run.cutoff)):
            d = defer.Deferred()
            run.done.addBoth(lambda result: (d.callback(None), result)[1])
            await d
        last = await manager.db(manager.catalog.last_prune_cutoff)
        if not commit_at_risk(summary.time, last):
            return
        walk = await DagCheck(manager).run([summary])
        if not walk.missing:
            return
        known = await manager.db(manager.catalog.sizes, walk.missing)
        deleted = [m for m in walk.missing if m not in known]
        if not deleted:
            return  # held on servers down now: no prune's doing
        forgotten = await manager.db(manager.catalog.forget_snapshots, [summary.snapshot_id],
                                     manager.clock.seconds())
        if forgotten:
            await defer.DeferredList(
                [s.connection.request(DeleteSnapshots(snapshot_ids=forgotten), DELETE_TIMEOUT,
                                      manager.clock) for s in manager.live.values()],
                consumeErrors=True)
        self.log.warn("refused snapshot {snapshot}: its backup began before a prune's cutoff and "
                      "references {count} chunks that prune deleted", count=len(deleted),
                      snapshot=summary.snapshot_id[:16])
        raise RemoteError(f"the backup ran longer than the prune grace period ({self.grace:.0f} s)"
                          f" and {len(deleted)} chunks it counted on were pruned meanwhile: run "
                          f"the backup again", "snapshot-incomplete")
