"""The packer and the store: chunks and objects sent to the cluster, each confirmed.

The last stages of a backup (walk -> tree builder -> chunker -> packer ->
store). ``Uploader.store`` takes a data chunk or an object (tree, chunk list,
snapshot) and says when it is confirmed. Blobs are gathered into batches (at
most ``BATCH_BYTES`` or ``BATCH_CHUNKS``); for each batch the manager says
which blobs it already holds (``known``) and where the others go, with a
signed ticket for each chain of servers (the servers store under it only); the new
ones travel in packs, one kind per pack (``StoreChunks(kind=...)``), to their
primaries, which answer only once every replica confirmed them. A server
that fails is left out and its packs are placed again (``STORE_ATTEMPTS``).
At most ``BATCHES_IN_FLIGHT`` batches are under way, so memory stays bounded
whatever is backed up; up to ``SMALL_BATCHES_IN_FLIGHT`` while together they
hold at most ``BATCH_BYTES`` (batches of tiny files wait on round trips, not on
bytes). Nothing here blocks: ``store`` queues, the caller
waits in ``room`` when too much is queued.

``HeldCheck`` asks the manager, in large pages, whether the chunks of files
taken unchanged from the parent snapshot still have a live copy.

Both report to a ``Signal``: the tree builder sleeps on it while it waits
for confirmations, and it keeps the first failure, which ends the backup.
"""

from collections import deque
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sdbackup.client.session import ClientError, Session, first_error
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ChunkNeed, ChunkRef, HasChunks, PlacementRequest, StoreChunks
from sdbackup.protocols.peer import RemoteError
from sdbackup.tickets import TICKET_EXPIRED

BATCH_BYTES = 4 * 1024 * 1024
BATCH_CHUNKS = 256
BATCHES_IN_FLIGHT = 2
SMALL_BATCHES_IN_FLIGHT = 6
#: Chunks sent in one StoreChunks: at most this many bytes (a larger chunk goes alone) ...
PACK_BYTES = 1024 * 1024
#: ... and this many chunks.
PACK_CHUNKS = 128
#: Placements a chunk gets before the backup gives up on it.
STORE_ATTEMPTS = 4
#: Refusals that another server may not have: the chunk is placed elsewhere.
RETRYABLE = {"replication-failed", "disk-full", "io-error", "checksum-mismatch", "internal"}
#: Ids remembered as stored or held during a backup (twice this at most): a repeat among
#: the recent ones is not placed again; an older one is, and the manager says ``known``.
KNOWN_IDS = 50_000
#: Chunk ids asked about in one HasChunks at most, and HasChunks under way at once. A page
#: goes as soon as it has CHECK_EAGER ids while the manager is not busy with another, so
#: pages grow only when the manager is slower than the walk.
HAS_CHUNKS_PAGE = 50_000
CHECKS_IN_FLIGHT = 2
CHECK_EAGER = 2048


class Signal:
    """Wakes whoever waits when a request of the pipeline finishes; keeps the first failure."""

    def __init__(self):
        self.failure: Failure | None = None
        self._waiting: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        """Fires on the next change, or now if a failure is kept: a request that fails before
        it is sent (a message that cannot be encoded, a closed link) fails the signal inside
        ``flush``, before its caller waits, and nothing would fire it again."""
        if self.failure is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result=None):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return result

    def fail(self, failure: Failure):
        if self.failure is None:
            self.failure = failure
        self.fire()

    def check(self):
        """Raise the first failure, if there was one."""
        if self.failure is not None:
            self.failure.raiseException()


class RecentIds:
    """Ids seen lately: a set that forgets its older half when it grows past ``limit``."""

    def __init__(self, limit: int = KNOWN_IDS):
        self.limit = limit
        self._new: set[bytes] = set()
        self._old: set[bytes] = set()

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._new or chunk_id in self._old

    def add(self, chunk_id: bytes):
        self._new.add(chunk_id)
        if len(self._new) >= self.limit:
            self._old, self._new = self._new, set()


class Blob:
    """Something to store: its kind, bytes and checksum (hex)."""

    __slots__ = ("checksum", "data", "kind")

    def __init__(self, kind: str, data: bytes, checksum: str):
        self.kind = kind
        self.data = data
        self.checksum = checksum


class _Batch:
    __slots__ = ("blobs", "size")

    def __init__(self):
        self.blobs: dict[bytes, Blob] = {}
        self.size = 0


class Uploader:
    """Stores blobs on the cluster, a batch at a time; each blob once per backup."""

    log = Logger()

    def __init__(self, session: Session, signal: Signal, warn: Callable[[str], None],
                 after_batch: Callable[[], None] | None = None):
        self.session = session
        self.signal = signal
        self.warn = warn
        #: Called once a batch is confirmed and its bytes let go of.
        self.after_batch = after_batch
        #: File data sent (chunks the cluster did not have), and every kind's bytes sent.
        self.new_bytes = 0
        self.sent_bytes = 0
        self._batch = _Batch()
        self._queue: deque[_Batch] = deque()
        self._sending = 0
        self._sending_bytes = 0  # in the batches under way
        #: Blobs waiting in a batch or under way, and who waits for each.
        self._waiters: dict[bytes, list] = {}
        self._known = RecentIds()
        self._failed_servers: set[str] = set()  # servers that failed us: not used again
        self._degraded = False

    # --- what the tree builder calls -----------------------------------------------------

    def store(self, kind: str, chunk_id: bytes, data: bytes, then: Callable[[], None],
              checksum: str = "") -> bool:
        """Store a blob; True if the cluster has it already (``then`` is not called), else
        ``then()`` is called once every replica confirmed it. ``checksum`` (hex) defaults to
        the id, as for data chunks."""
        if chunk_id in self._known:
            return True
        waiters = self._waiters.get(chunk_id)
        if waiters is not None:
            waiters.append(then)
            return False
        self._waiters[chunk_id] = [then]
        batch = self._batch
        batch.blobs[chunk_id] = Blob(kind, data, checksum or chunk_id.hex())
        batch.size += len(data)
        if batch.size >= BATCH_BYTES or len(batch.blobs) >= BATCH_CHUNKS:
            self.flush()
        return False

    def is_known(self, chunk_id: bytes) -> bool:
        return chunk_id in self._known

    def mark_known(self, chunk_ids):
        for chunk_id in chunk_ids:
            self._known.add(chunk_id)

    def flush(self):
        """Send the batch being filled now, full or not."""
        if self._batch.blobs:
            self._queue.append(self._batch)
            self._batch = _Batch()
            self._pump()

    @property
    def busy(self) -> bool:
        """True while some blob waits for its confirmation."""
        return bool(self._waiters)

    async def room(self):
        """Wait while a full batch is queued behind those under way (backpressure)."""
        while self._queue:
            self.signal.check()
            await self.signal.wait()
        self.signal.check()

    async def store_now(self, kind: str, chunk_id: bytes, data: bytes, checksum: str = ""):
        """Store one blob and wait for its confirmation (the snapshot object)."""
        done = []
        if self.store(kind, chunk_id, data, lambda: done.append(True), checksum):
            return
        self.flush()
        while not done:
            self.signal.check()
            await self.signal.wait()

    # --- sending -------------------------------------------------------------------------

    def _pump(self):
        while self._queue and self._may_send(self._queue[0]) and self.signal.failure is None:
            batch = self._queue.popleft()
            self._sending += 1
            self._sending_bytes += batch.size
            d = defer.ensureDeferred(self._send(batch))
            d.addErrback(self.signal.fail)
            d.addBoth(self._sent, batch.size)

    def _may_send(self, batch: _Batch) -> bool:
        """Room for ``batch`` under way: ``BATCHES_IN_FLIGHT`` batches, more while small.

        A first backup of 200,000 files of a few hundred bytes waited on the manager's
        placements two batches at a time (61-69 s); six small ones at a time took 53 s."""
        if self._sending < BATCHES_IN_FLIGHT:
            return True
        return (self._sending < SMALL_BATCHES_IN_FLIGHT
                and self._sending_bytes + batch.size <= BATCH_BYTES)

    def _sent(self, _, size: int):
        self._sending -= 1
        self._sending_bytes -= size
        self._pump()
        self.signal.fire()

    async def _send(self, batch: _Batch):
        needs = [ChunkNeed(chunk_id.hex(), len(blob.data)) for chunk_id, blob in batch.blobs.items()]
        placement = await self.session.ask(PlacementRequest(
            chunks=needs, exclude=sorted(self._failed_servers)))
        await self._store_placed(placement, batch.blobs, STORE_ATTEMPTS)
        placed = set(placement.known) | set(placement.assignments)
        if len(placed) != len(batch.blobs):
            raise ClientError("the manager placed other chunks than were asked for")
        self._confirm(batch.blobs)

    def _confirm(self, blobs: dict):
        callbacks = []
        for chunk_id in blobs:
            self._known.add(chunk_id)
            callbacks += self._waiters.pop(chunk_id, ())
        blobs.clear()  # the bytes are on the servers now: let them go
        for then in callbacks:
            try:
                then()
            except Exception:
                self.signal.fail(Failure())
        if self.after_batch is not None:
            self.after_batch()

    def _note_degraded(self, placement):
        fewest = min((len(s) for s in placement.assignments.values()), default=placement.replicas)
        if fewest < placement.replicas and not self._degraded:
            self._degraded = True
            self.warn(f"only {fewest} of {placement.replicas} copies of some chunks: fewer servers "
                      f"are alive than the replication factor")

    async def _store_placed(self, placement, blobs: dict, attempts: int):
        """Send placed blobs in packs, one pack per kind and group of servers."""
        self._note_degraded(placement)
        groups: dict[tuple, list] = {}
        for chunk_id, servers in placement.assignments.items():
            key = bytes.fromhex(chunk_id)
            blob = blobs[key]
            groups.setdefault((blob.kind, tuple(servers)), []).append((key, blob))
        # The manager's signed word for each chain: the servers store under it, and only it.
        tickets = {tuple(ticket.chain): ticket for ticket in placement.tickets}
        sends = [defer.ensureDeferred(self._store_pack(kind, pack, list(servers), blobs, attempts,
                                                       tickets.get(servers)))
                 for (kind, servers), items in groups.items() for pack in packs(items)]
        await defer.gatherResults(sends, consumeErrors=True).addErrback(first_error)

    async def _store_pack(self, kind: str, pack: list, servers: list[str], blobs: dict,
                          attempts: int, ticket):
        """Store a pack on ``servers`` under the placement's ``ticket``; when one fails, place
        the pack again without it (when the ticket expired, place it again as it was)."""
        primary = servers[0]
        refs = [ChunkRef(chunk_id.hex(), len(blob.data), blob.checksum) for chunk_id, blob in pack]
        payload = b"".join(blob.data for _, blob in pack)
        # The pack holds the bytes now: each blob keeps a view of its part (for a retry), so
        # a batch's bytes are in memory once, not twice.
        view, offset = memoryview(payload), 0
        for _, blob in pack:
            size = len(blob.data)
            blob.data = view[offset : offset + size]
            offset += size
        # Built outside the ``try``: a pack this client cannot describe is its own bug, not a
        # server's failure to be placed around.
        store = StoreChunks(chunks=refs, forward_to=servers[1:], kind=kind, ticket=ticket,
                            payload=payload)
        try:
            reply = await self.session.servers.request(primary, store)
        except RemoteError as e:
            if e.code == TICKET_EXPIRED:
                failed, why = None, e.reason
            elif e.code not in RETRYABLE:
                raise ClientError(f"server {primary} could not store chunks: {e.reason}") from e
            failed, why = e.culprit or primary, e.reason
        except defer.CancelledError:
            raise  # the backup was interrupted: not the server's fault
        except Exception as e:  # refused, lost or timed out
            failed, why = primary, f"server {primary} is unreachable: {e}"
        else:
            if reply.chunk_ids != [ref.chunk_id for ref in refs]:
                raise ClientError(f"server {primary} confirmed other chunks than were sent")
            size = sum(ref.size for ref in refs)
            self.sent_bytes += size
            if kind == Kind.DATA:
                self.new_bytes += size
            return
        if attempts <= 1:
            raise ClientError(f"could not store chunks after {STORE_ATTEMPTS} attempts: {why}")
        if failed is not None and failed not in self._failed_servers:
            self._failed_servers.add(failed)
            self.log.warn("{why}; placing chunks elsewhere", why=why)
        # Chunks that landed on a live server before the failure count as held; repair adds
        # their other copies.
        placement = await self.session.ask(PlacementRequest(
            chunks=[ChunkNeed(ref.chunk_id, ref.size) for ref in refs],
            exclude=sorted(self._failed_servers)))
        await self._store_placed(placement, blobs, attempts - 1)


def packs(items: list) -> list[list]:
    """``(id, blob)`` items in packs of at most PACK_BYTES (a larger blob alone) and
    PACK_CHUNKS blobs."""
    found, pack, size = [], [], 0
    for item in items:
        length = len(item[1].data)
        if pack and (size + length > PACK_BYTES or len(pack) == PACK_CHUNKS):
            found.append(pack)
            pack, size = [], 0
        pack.append(item)
        size += length
    if pack:
        found.append(pack)
    return found


class HeldCheck:
    """Whether the chunks of files taken from the parent snapshot still have a live copy.

    Asked in pages of up to ``HAS_CHUNKS_PAGE`` ids, ``CHECKS_IN_FLIGHT`` at
    once; ids found held count as known to the uploader, so a new file that
    shares them is not placed again.
    """

    def __init__(self, session: Session, uploader: Uploader, signal: Signal):
        self.session = session
        self.uploader = uploader
        self.signal = signal
        self._page: list[tuple[list, Callable]] = []
        self._ids: dict[bytes, None] = {}
        self._queue: deque = deque()
        self._asking = 0
        #: Checks not answered yet (the tree builder bounds them).
        self.waiting = 0

    def check(self, chunk_ids, then: Callable[[bool], None]) -> bool:
        """True if every chunk is known held now (``then`` is not called); else
        ``then(all_held)`` is called once the manager answered."""
        unknown = [c for c in chunk_ids if not self.uploader.is_known(c)]
        if not unknown:
            return True
        self._page.append((unknown, then))
        self._ids.update(dict.fromkeys(unknown))
        self.waiting += 1
        if len(self._ids) >= HAS_CHUNKS_PAGE or (
                len(self._ids) >= CHECK_EAGER and not self._queue and self._asking < CHECKS_IN_FLIGHT):
            self.flush()
        return False

    def flush(self):
        if self._page:
            self._queue.append((list(self._ids), self._page))
            self._page, self._ids = [], {}
            self._pump()

    @property
    def busy(self) -> bool:
        return bool(self._page or self._queue or self._asking)

    def _pump(self):
        while self._queue and self._asking < CHECKS_IN_FLIGHT and self.signal.failure is None:
            ids, page = self._queue.popleft()
            self._asking += 1
            d = defer.ensureDeferred(self._ask(ids, page))
            d.addErrback(self.signal.fail)
            d.addBoth(self._answered)

    def _answered(self, _):
        self._asking -= 1
        self._pump()
        self.signal.fire()

    async def _ask(self, ids: list[bytes], page: list):
        reply = await self.session.ask(HasChunks(chunk_ids=[c.hex() for c in ids]))
        held = {bytes.fromhex(c) for c in reply.chunk_ids}
        self.uploader.mark_known(held)
        self.waiting -= len(page)
        for chunk_ids, then in page:
            try:
                then(all(c in held for c in chunk_ids))
            except Exception:
                self.signal.fail(Failure())
