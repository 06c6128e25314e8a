"""Re-replication (``services/repair.py``): every chunk back at the replication factor.

Real servers, sockets and catalog; the manager alone runs on a fake clock
(``twisted.internet.task.Clock``), so the SETTLE time, the copy time-out and the passes are
timed exactly, and no periodic tick runs (a ``--repair-interval`` of 1000 s): each pass is
started by the test (``tick``, as the periodic tick does) or by the manager itself
(``soon``: a death, a drain). The servers send their news of chunks stored (``ChunksAdded``)
when the manager asks for it, as a commit does, so a test knows when it has arrived. Copies
are not paced here (that is ``test_guarantees.py``).
"""

import os
import sqlite3

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from sdbackup import hashing
from sdbackup.protocols.messages import (
    ChunkNeed,
    ChunkRef,
    DrainServer,
    Locate,
    PlacementRequest,
    StoreChunks,
)
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.repair import Repairer

GiB = 1024**3
#: The repairer's times, as promised (not imported: a test must tell them changed): a chunk
#: stored is left alone for 2 s (its chain's notices may be on their way), and a holder that
#: does not answer a repair order is given up after 120 s.
SETTLE = 2.0
REPAIR_TIMEOUT = 120.0
#: And a pass after chunks were added judges those alone, but every chunk again after any other
#: news, or ten minutes after the last pass that did.
FULL_PASS_EVERY = 600.0


@attrs.define
class Rig:
    """A cluster whose manager runs on ``clock``, and a client made of protocol messages."""

    cluster: object
    clock: task.Clock
    client: object

    @property
    def manager(self):
        return self.cluster.manager.manager

    @property
    def repair(self):
        return self.manager.repair

    def servers(self) -> list:
        """The servers, by address (the order in which a chunk's holders are tried)."""
        return sorted(self.cluster.servers, key=lambda s: s.server.address)


@pytest_twisted.async_yield_fixture
async def start(make_cluster, monkeypatch):
    """Start a cluster of ``servers`` and ``replicas``; its manager's clock made a fake one
    once the first pass (leaving the safe mode) has ended."""
    monkeypatch.setattr("sdbackup.services.server.NOTIFY_DELAY", 1000.0)
    clients = []

    async def make(servers: int = 3, replicas: int = 2) -> Rig:
        cluster = await make_cluster(
            servers=servers, replicas=replicas, repair_interval=1000.0, dead_after=1000.0
        )
        manager = cluster.manager.manager
        await cluster.until(lambda: manager.repair.running is None, what="the first pass's end")
        clock = task.Clock()
        clock.advance(reactor.seconds())  # (tickets expire by the servers' real clocks)
        manager.clock = clock
        manager.repair.rate = float("inf")
        client = await cluster.wire_client()
        clients.append(client)
        return Rig(cluster, clock, client)

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
def repair_log():
    """The events the repairer logs."""
    events = []

    def observe(event):
        if event.get("log_namespace") == "sdbackup.services.repair.Repairer":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def failures_logged(events) -> list[tuple]:
    return [
        (e["chunk"], e["source"], e["why"]) for e in events if e["log_format"].startswith("repair of {chunk}")
    ]


def copies_logged(events) -> list[int]:
    return [e["count"] for e in events if e["log_format"] == "repair: copied {count} chunks"]


async def store(rig: Rig, holders: list, pieces: list[bytes]) -> list[str]:
    """Store ``pieces`` on exactly ``holders`` (one chain, under a ticket of the manager) and
    wait until the manager records those copies (from the servers' own notices)."""
    ids = [hashing.chunk_id(p) for p in pieces]
    chain = [s.server.address for s in holders]
    await rig.client.servers.request(
        chain[0],
        StoreChunks(
            chunks=[ChunkRef(c, len(p), hashing.checksum(p)) for c, p in zip(ids, pieces, strict=True)],
            forward_to=chain[1:],
            ticket=rig.cluster.ticket(ids, chain),
            payload=b"".join(pieces),
        ),
    )
    await news(rig)

    async def recorded():
        return await recorded_holders(rig, ids) == {c: sorted(chain) for c in ids}

    await rig.cluster.until(recorded, what="the manager recording the copies")
    return ids


async def news(rig: Rig):
    """Have every server send its news now (as a commit does); it is handled on return."""
    await rig.manager._sync_notices()
    await rig.manager.db(rig.manager.catalog.holders, [])  # (queued after the news' records)


async def recorded_holders(rig: Rig, ids: list[str]) -> dict[str, list[str]]:
    """The copies the manager's catalog records (live servers or not)."""
    return await rig.manager.db(rig.manager.catalog.holders, ids)


async def located(rig: Rig, ids: list[str]) -> dict[str, list[str]]:
    """Where a client is told the chunks are."""
    reply = await rig.client.ask(Locate(chunk_ids=ids))
    return {c: sorted(holders) for c, holders in reply.holders.items()}


def holding(rig: Rig, chunk_id: str) -> list[str]:
    """The running servers with the chunk on disk."""
    return sorted(s.server.address for s in rig.cluster.servers if s.running and s.store.has(chunk_id))


async def ended(rig: Rig, timeout: float = 5.0):
    """Wait for the pass under way (and any it starts as it ends) to end."""
    await rig.cluster.until(lambda: rig.repair.running is None, timeout, "the pass's end")


async def run_pass(rig: Rig):
    """A tick that must start a pass; wait for its end."""
    assert rig.repair.tick() is not None, "the tick started no pass"
    await ended(rig)


def answer_orders(server, script: list):
    """Make ``server`` answer its next repair orders (``ReplicateChunk``) as ``script`` says:
    "fail" (its disk errs), "hang" (never an answer), a Deferred (wait for it, then fail);
    then as it should. Returns the chunk ids ordered, in order."""
    real = server.server.handle_ReplicateChunk
    orders = []

    async def handle(msg, connection):
        orders.append(msg.chunk_id)
        step = script.pop(0) if script else None
        if step is None:
            return await real(msg, connection)
        if step == "hang":
            await defer.Deferred()
        if isinstance(step, defer.Deferred):
            await step
        raise RemoteError(f"cannot read {msg.chunk_id}: input/output error", "io-error")

    server.server.handle_ReplicateChunk = handle
    return orders


def pieces(count: int, size: int = 100) -> list[bytes]:
    return [os.urandom(size + i) for i in range(count)]


# --- back to the factor ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_dead_servers_chunks_are_copied_back_in_one_pass_each_once(start, repair_log):
    """More chunks than a batch (256) lose a copy: one pass copies every one of them to the
    server that lacked it, counts their bytes once and logs their number; an idle cluster
    (before, and after) is not scanned."""
    rig = await start(servers=3, replicas=2)
    a, b, c = rig.servers()
    assert rig.repair.tick() is None  # idle: nothing may have left a chunk short
    data = pieces(260)
    ids = await store(rig, [a, b], data)
    rig.clock.advance(SETTLE + 1)
    await run_pass(rig)  # the new chunks are judged: none is short
    assert rig.repair.tick() is None
    assert copies_logged(repair_log) == []

    await rig.cluster.stop_server(b)  # the manager's soon(): a pass starts
    await ended(rig, timeout=30)

    wanted = sorted([a.server.address, c.server.address])
    assert {i: holding(rig, i) for i in ids} == {i: wanted for i in ids}
    assert await located(rig, ids) == {i: wanted for i in ids}
    assert rig.repair.copied_bytes == sum(len(p) for p in data)
    assert copies_logged(repair_log) == [260]
    assert rig.repair.tick() is None


@pytest_twisted.ensureDeferred
async def test_a_chunk_with_one_copy_left_gets_every_missing_copy_at_once(start):
    rig = await start(servers=3, replicas=3)
    a, b, c = rig.servers()
    [data] = pieces(1, 7000)
    [chunk] = await store(rig, [b], [data])
    rig.clock.advance(SETTLE + 1)
    await run_pass(rig)
    everyone = sorted(s.server.address for s in (a, b, c))
    assert holding(rig, chunk) == everyone
    assert await located(rig, [chunk]) == {chunk: everyone}
    assert rig.repair.copied_bytes == 2 * len(data)
    assert rig.repair.tick() is None


@pytest_twisted.ensureDeferred
async def test_the_copy_goes_to_the_most_free_space_counting_1_gib_as_equal(start):
    """Servers within 1 GiB of the most free space are equals, and the lowest address wins
    among equals: just under 1 GiB less counts as equal, just over does not."""
    rig = await start(servers=4, replicas=2)
    holder, low, middle, high = rig.servers()
    most = 64 * GiB
    free = {holder: most, high: most, middle: most - (GiB - 1_000_000), low: most - (GiB + 1_000_000)}
    for server, bytes_free in free.items():
        server.store.disk_space = lambda bytes_free=bytes_free: (bytes_free, 128 * GiB)
    await rig.cluster.until(
        lambda: all(rig.manager.live[s.server.address].free_bytes == f for s, f in free.items()),
        what="the heartbeats",
    )
    [chunk] = await store(rig, [holder], pieces(1, 5000))
    rig.clock.advance(SETTLE + 1)
    await run_pass(rig)
    assert holding(rig, chunk) == sorted([holder.server.address, middle.server.address])


@pytest_twisted.ensureDeferred
async def test_new_copies_are_recorded_and_charged_to_their_servers_only(start):
    """The holder names one more server than it copied to (a lie): only the server the manager
    sent the copy to is recorded and counted, and it is charged the bytes, so the next
    placement goes to the others."""
    rig = await start(servers=3, replicas=2)
    a, b, c = rig.servers()
    real = a.server.handle_ReplicateChunk

    async def naming_one_more(msg, connection):
        reply = await real(msg, connection)
        return attrs.evolve(reply, holders=["tcp:127.0.0.1:1", *reply.holders])

    a.server.handle_ReplicateChunk = naming_one_more
    [data] = pieces(1, 6000)
    [chunk] = await store(rig, [a], [data])
    rig.clock.advance(SETTLE + 1)
    await run_pass(rig)
    # Among servers as free and as charged, the lowest address takes the copy.
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])
    assert await recorded_holders(rig, [chunk]) == {chunk: sorted([a.server.address, b.server.address])}
    assert rig.repair.copied_bytes == len(data)

    other = hashing.chunk_id(os.urandom(100))
    placement = await rig.client.ask(PlacementRequest(chunks=[ChunkNeed(other, 1000)]))
    assert sorted(placement.assignments[other]) == sorted([a.server.address, c.server.address])


# --- when a pass runs -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_new_chunk_is_left_for_2_seconds_then_copied_by_the_next_tick(start):
    """The other copies of a chunk just stored may not be reported yet: a pass within SETTLE
    seconds leaves it alone, and a tick after them copies it (one at exactly SETTLE, too)."""
    rig = await start(servers=3, replicas=2)
    a, b, _ = rig.servers()
    [chunk] = await store(rig, [a], pieces(1, 3000))

    rig.clock.advance(SETTLE - 0.5)
    await run_pass(rig)  # started by the chunk's news alone: the tick finds a pass needed
    assert holding(rig, chunk) == [a.server.address]
    rig.clock.advance(0.5)  # exactly SETTLE seconds: still a pass to come
    await run_pass(rig)
    rig.clock.advance(0.001)
    await run_pass(rig)
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])
    assert rig.repair.tick() is None  # nothing is left to settle


@pytest_twisted.ensureDeferred
async def test_a_failed_copy_keeps_its_holder_and_is_tried_again_by_the_next_tick(start, repair_log):
    """A holder whose disk errs fails the copy: its copy stays listed, nothing is tried again
    at once, the next tick does; a soon() during a pass starts one more as it ends."""
    rig = await start(servers=3, replicas=2)
    a, b, _ = rig.servers()
    [data] = pieces(1, 4000)
    [chunk] = await store(rig, [a], [data])
    rig.clock.advance(SETTLE + 1)
    released = defer.Deferred()
    orders = answer_orders(a, ["fail", released, "fail"])

    rig.repair.soon()
    await ended(rig)
    assert orders == [chunk]
    assert holding(rig, chunk) == [a.server.address]
    assert await located(rig, [chunk]) == {chunk: [a.server.address]}
    reason = f"cannot read {chunk}: input/output error"
    assert failures_logged(repair_log) == [(chunk[:16], a.server.address, reason)]

    rig.repair.tick()
    await rig.cluster.until(lambda: len(orders) == 2, what="the second order")
    rig.repair.soon()  # something else went short meanwhile: one more pass after this one
    released.callback(None)
    await ended(rig)
    assert orders == [chunk] * 3
    assert holding(rig, chunk) == [a.server.address]

    await run_pass(rig)
    assert orders == [chunk] * 4
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])
    assert await located(rig, [chunk]) == {chunk: sorted([a.server.address, b.server.address])}
    assert rig.repair.copied_bytes == len(data)
    assert len(failures_logged(repair_log)) == 3
    assert rig.repair.tick() is None


@pytest_twisted.ensureDeferred
async def test_a_pass_after_new_chunks_judges_those_alone_until_other_news_or_ten_minutes(start):
    """A first backup adds chunks all along, and a pass over every chunk at each tick cost
    the manager more and more of its CPU (70% by 350,000 chunks). A pass after new chunks
    judges them alone; after other news (here ``soon``), or ten minutes after the last pass
    over every chunk, a pass judges every chunk again. The catalog here loses a copy of
    ``old`` silently, as no part of the cluster does, to tell which passes look at it."""
    rig = await start(servers=3, replicas=2)
    a, b, _ = rig.servers()
    [old] = await store(rig, [a, b], pieces(1, 1000))
    rig.clock.advance(SETTLE + 1)
    rig.repair.soon()
    await ended(rig)  # every chunk judged, now
    await rig.manager.db(rig.manager.catalog.remove_locations, b.server.address, [old])

    async def after_new_chunk() -> tuple[int, int]:
        """The copies of ``old`` and of a new chunk after the pass its news starts."""
        [new] = await store(rig, [a], pieces(1, 2000))
        rig.clock.advance(SETTLE + 1)
        await run_pass(rig)
        copies = await recorded_holders(rig, [old, new])
        return len(copies[old]), len(copies[new])

    assert await after_new_chunk() == (1, 2)  # the new chunk judged, not the old one
    rig.clock.advance(FULL_PASS_EVERY - 3 * (SETTLE + 1))
    assert await after_new_chunk() == (1, 2)  # not ten minutes yet
    assert await after_new_chunk() == (2, 2)  # ten minutes: every chunk

    await rig.manager.db(rig.manager.catalog.remove_locations, b.server.address, [old])
    assert await after_new_chunk() == (1, 2)
    rig.repair.soon()
    await ended(rig)
    assert len((await recorded_holders(rig, [old]))[old]) == 2


@pytest_twisted.ensureDeferred
async def test_a_pass_that_fails_is_run_again_by_the_next_tick(start, logged_errors):
    """The catalog errs once: the pass fails (and says so), the next tick runs one again."""
    rig = await start(servers=3, replicas=2)
    a, b, _ = rig.servers()
    [chunk] = await store(rig, [a], pieces(1, 2000))
    rig.clock.advance(SETTLE + 1)
    catalog = rig.manager.catalog
    real = catalog.under_replicated

    def failing_once(*args):
        catalog.under_replicated = real
        raise sqlite3.OperationalError("disk I/O error")

    catalog.under_replicated = failing_once
    await run_pass(rig)
    assert [e["log_failure"].value.args for e in logged_errors.flush(sqlite3.OperationalError)] == [
        ("disk I/O error",)
    ]
    assert holding(rig, chunk) == [a.server.address]
    await run_pass(rig)
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])


@pytest_twisted.ensureDeferred
async def test_a_chunk_no_server_can_take_waits_until_one_has_room(start):
    """The only other server is full: nothing is copied (and nothing fails), and the chunk is
    copied by the first tick once that server has room again."""
    rig = await start(servers=2, replicas=2)
    a, b = rig.servers()
    [chunk] = await store(rig, [a], pieces(1, 2500))
    rig.clock.advance(SETTLE + 1)
    b.store.disk_space = lambda: (0, 128 * GiB)
    live_b = rig.manager.live[b.server.address]
    await rig.cluster.until(lambda: live_b.full, what="the manager seeing the full disk")
    await run_pass(rig)
    assert holding(rig, chunk) == [a.server.address]

    del b.store.disk_space
    await rig.cluster.until(lambda: not live_b.full, what="the manager seeing room")
    await run_pass(rig)
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])


# --- holders that cannot give their copy ------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
@pytest_twisted.ensureDeferred
async def test_a_draining_holder_with_a_bad_copy_is_dropped_and_the_next_holder_used(start, damage):
    """Draining ``a``: its copy does not count, so the chunk it shares with ``b`` needs one on
    ``c``. ``a`` is asked first, its copy is missing or corrupt: its record goes, and ``b``
    gives the copy in the same pass."""
    rig = await start(servers=3, replicas=2)
    a, b, c = rig.servers()
    [data] = pieces(1, 5000)
    [chunk] = await store(rig, [a, b], [data])
    rig.clock.advance(SETTLE + 1)
    path = a.store.path_for(chunk)
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 10)

    await rig.client.ask(DrainServer(address=a.server.address))  # the manager's soon()
    await ended(rig)
    others = sorted([b.server.address, c.server.address])
    assert holding(rig, chunk) == others
    assert await located(rig, [chunk]) == {chunk: others}
    assert rig.repair.copied_bytes == len(data)


@pytest_twisted.ensureDeferred
async def test_a_holder_that_never_answers_is_given_up_after_the_time_out(start, repair_log):
    """``a`` never answers a repair order: after REPAIR_TIMEOUT seconds the next holder gives
    the copy; a chunk ``a`` alone holds waits for the next tick."""
    rig = await start(servers=3, replicas=3)
    a, b, c = rig.servers()
    everyone = sorted(s.server.address for s in (a, b, c))
    [first] = await store(rig, [a, b], pieces(1, 3000))
    rig.clock.advance(SETTLE + 1)
    orders = answer_orders(a, ["hang"])
    rig.repair.tick()
    await rig.cluster.until(lambda: orders == [first], what="the order to a")
    rig.clock.advance(REPAIR_TIMEOUT - 0.5)
    assert failures_logged(repair_log) == []  # still waiting for a (b would be asked at once)
    await task.deferLater(reactor, 0.1)
    assert rig.repair.running is not None
    assert holding(rig, first) == sorted([a.server.address, b.server.address])
    rig.clock.advance(0.5)
    await ended(rig)
    assert holding(rig, first) == everyone
    assert await located(rig, [first]) == {first: everyone}

    [second] = await store(rig, [a], pieces(1, 4000))
    rig.clock.advance(SETTLE + 1)
    orders = answer_orders(a, ["hang"])
    rig.repair.tick()
    await rig.cluster.until(lambda: orders == [second], what="the order to a")
    rig.clock.advance(REPAIR_TIMEOUT)
    await ended(rig)
    assert holding(rig, second) == [a.server.address]
    await run_pass(rig)
    assert holding(rig, second) == everyone
    why = "TimeoutError('no answer to ReplicateChunk within 120 s')"
    assert failures_logged(repair_log) == [
        (first[:16], a.server.address, why),
        (second[:16], a.server.address, why),
    ]


@pytest_twisted.ensureDeferred
async def test_a_new_repairer_looks_at_once_and_leaves_a_failed_copy_to_the_next_tick(start):
    """A manager's repairer as it starts: its first tick runs a pass (nothing has looked yet),
    and a copy that pass fails waits for the next tick, as in any other pass."""
    rig = await start(servers=3, replicas=2)
    a, b, _ = rig.servers()
    [chunk] = await store(rig, [a], pieces(1, 3500))
    rig.clock.advance(SETTLE + 1)
    rig.manager.repair = Repairer(rig.manager, float("inf"))
    orders = answer_orders(a, ["fail"])
    await run_pass(rig)
    assert orders == [chunk]
    assert holding(rig, chunk) == [a.server.address]
    await run_pass(rig)
    assert orders == [chunk, chunk]
    assert holding(rig, chunk) == sorted([a.server.address, b.server.address])
