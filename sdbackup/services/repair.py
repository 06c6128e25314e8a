"""Re-replication: bringing every chunk back to the replication factor.

Every chunk or object a server reported is kept at the replication factor
until a prune deletes it (``prune.py``). A pass copies chunks with too few live copies
from a live holder to other servers (``ReplicateChunk``: the holder sends its
verified copy, as the kind it is, along the chain of a ticket the manager
signs, as a client's store goes). Passes start when
something may have left a chunk short (a server died or came back, a copy was
found corrupt, chunks were added, a check ended), and the periodic tick runs
one only then, so an idle cluster is not scanned again and again. When only
chunks were added since the last pass, a pass judges those alone (the
catalog's index by ``added``): during a first backup of 1,000,000 files, a
pass every tick over every chunk took 70% of the manager's CPU by the
350,000th. Anything else that can leave any chunk short, a copy that could
not be made, and ``FULL_PASS_EVERY`` seconds, make the next pass judge every
chunk again. Copies are
paced to ``rate`` bytes a second, a few at once, so repairs never starve
client traffic. A starting manager (safe mode) repairs nothing: a server not
yet reported is not a lost one.
"""

from twisted.internet import defer
from twisted.logger import Logger

from sdbackup.limits import shorten
from sdbackup.placement import place_chunks
from sdbackup.protocols.messages import ReplicateChunk
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.pacing import Pace

#: Under-replicated chunks fetched from the catalog at a time, and copies under way at once.
REPAIR_BATCH = 256
REPAIR_COPIES_AT_ONCE = 4
#: Seconds the manager waits for one repair copy.
REPAIR_TIMEOUT = 120.0
#: Seconds a newly stored chunk is left alone: the notices of its other copies, sent by
#: the rest of its chain within 1 s (NOTIFY_DELAY) of storing, may still be on their way.
SETTLE = 2.0
#: Seconds after which a pass judges every chunk again, even if only new ones were added
#: (should the wall clock, which ``added`` is in, have moved back, say).
FULL_PASS_EVERY = 600.0
#: Free space is compared in steps of this many bytes when placing copies.
PLACEMENT_GRANULARITY = 1024**3


class Repairer:
    """``manager`` gives ``live``, ``db``, ``catalog``, ``clock``, ``replicas``, ``ready``
    and ``loads``."""

    log = Logger()

    def __init__(self, manager, rate: float):
        self.manager = manager
        self.rate = rate
        self.running: defer.Deferred | None = None
        #: Something may have left a chunk short since the last pass looked.
        self.needed = True
        #: Bytes copied again since the start (each new copy counted once), for metrics.
        self.copied_bytes = 0
        self._again = False
        self._paced = Pace()
        #: Until then some chunks are too new to judge: passes are needed again.
        self._settling_until = 0.0
        #: Every chunk added before this was judged, and nothing else may have left one
        #: short since (None: the next pass judges them all).
        self._judged: float | None = None
        self._last_full = float("-inf")
        self._news = 0  # calls of ``soon``: one during a pass leaves every chunk to judge

    def soon(self):
        """Something may have left chunks short: start a pass unless one is under way (it
        goes on until nothing is left to do)."""
        self.needed = True
        self._judged = None  # any chunk may be short now
        self._news += 1
        if self.running is not None:
            self._again = True  # the pass under way may have looked already
        return self.tick()

    def chunks_added(self):
        """New chunks were stored: judge their copies once their chain's notices are in."""
        self.needed = True
        self._settling_until = self.manager.clock.seconds() + SETTLE

    def tick(self):
        """Start a pass if one is needed and allowed."""
        if self.running is None and self.needed and self.manager.ready:
            self.needed = False
            self.running = defer.ensureDeferred(self._pass())
            self.running.addErrback(self._failed)
            self.running.addBoth(self._done)
        return self.running

    def _failed(self, failure):
        self.needed = True
        self.log.failure("repair pass failed", failure)

    def _done(self, result):
        self.running = None
        if self._again:
            self._again = False
            self.tick()
        return result

    async def _pass(self):
        manager = self.manager
        repaired = 0
        now = manager.clock.seconds()
        cutoff = now - SETTLE
        if now <= self._settling_until:
            # The newest chunks are judged by a later pass (one exactly SETTLE old too: the
            # catalog gives only chunks added before now - SETTLE).
            self.needed = True
        since = self._judged
        if since is None or since > cutoff or now - self._last_full >= FULL_PASS_EVERY:
            since, self._last_full = None, now  # every chunk
        self._judged = None  # until this pass has judged them all (a failed one has not)
        news, judged = self._news, False
        while manager.live:
            # Copies on draining servers do not count: their chunks are copied to the others.
            draining = manager.draining & set(manager.live)
            counting = set(manager.live) - draining
            wanted = min(manager.replicas, len(counting))
            work = await manager.db(manager.catalog.under_replicated, counting, wanted,
                                    REPAIR_BATCH, cutoff, draining, since)
            if not work:
                judged = True
                break
            # A few workers share the batch (a semaphore would nest a callback per chunk).
            pending = iter(work)

            async def worker(wanted=wanted, pending=pending):
                return sum([await self._copy(*w, wanted) for w in pending])

            results = await defer.gatherResults(
                [defer.ensureDeferred(worker()) for _ in range(REPAIR_COPIES_AT_ONCE)])
            done = sum(results)
            repaired += done
            if done < len(work):
                self.needed = True  # some could not be copied now: the next tick tries again
            if not done:
                break
        if judged and self._news == news:
            self._judged = cutoff  # the next pass judges the chunks added since
        if repaired:
            self.log.info("repair: copied {count} chunks", count=repaired)

    async def _copy(self, chunk_id: str, size: int, holders: list[str], wanted: int) -> bool:
        manager = self.manager
        loads = manager.loads(excluding=holders)
        counted = [h for h in holders if h not in manager.draining]
        need = min(wanted - len(counted), len(loads))
        if need < 1:
            return False
        targets = place_chunks(loads, [(chunk_id, size)], need, PLACEMENT_GRANULARITY)[chunk_id]
        await self._pace(size)
        for source in holders:
            server = manager.live.get(source)
            if server is None:
                continue
            # The copy travels as a store does: under a ticket naming the chain, so the
            # targets take it, and the source sends it nowhere else.
            ticket = manager.tickets.issue([chunk_id], [source, *targets], manager.clock.seconds())
            try:
                reply = await server.connection.request(
                    ReplicateChunk(chunk_id=chunk_id, forward_to=targets, ticket=ticket),
                    REPAIR_TIMEOUT, manager.clock)
            except RemoteError as e:
                if e.code in ("chunk-corrupt", "chunk-missing"):
                    await manager.db(manager.catalog.remove_locations, source, [chunk_id])
                    continue  # try the next holder
                self.log.warn("repair of {chunk} from {source} failed: {why}",
                              chunk=chunk_id[:16], source=source, why=shorten(e.reason))
                return False
            except Exception as e:
                self.log.warn("repair of {chunk} from {source} failed: {why}",
                              chunk=chunk_id[:16], source=source, why=shorten(e))
                continue
            for address in reply.holders:
                if address not in targets:
                    continue  # (only where the manager sent it; the copies report themselves too)
                if address in manager.live:
                    manager.live[address].assigned += size
                await manager.db(manager.catalog.add_locations, address, [(chunk_id, size)])
                self.copied_bytes += size  # (a holder it names but was not sent is no copy)
            return True
        return False

    async def _pace(self, size: int):
        await self._paced.take(self.manager.clock, size, self.rate)
