"""What the manager remembers of the cluster's recent past, for the dashboard and the metrics.

``ClusterWatch`` takes a ``Sample`` every ``interval`` seconds (chunk health and
usage per server, read on the catalog thread; servers alive, read from the
manager) and keeps them in a ``Ring``: a bounded history, so memory stays the
same however long the manager runs. A sample reads every chunk's copies, seconds
of work at a million chunks: a slow sample is followed by ticks without one
(``ticks_to_rest``), so that sampling never takes more than a small share of the
thread the backups' requests wait on. ``EventLog`` turns the manager's own
structured log events (a server died, came back, a repair pass copied chunks, a
server found corrupt copies) into dashboard events, so no handler needs a hook.
Nothing here touches a request's path: the watch reads state on its own clock.
"""

import collections
import math
import time

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger, globalLogPublisher

#: A sample every 30 s for 6 hours.
DEFAULT_INTERVAL = 30.0
DEFAULT_SAMPLES = 720
#: The share of the catalog thread's time that sampling may take at most.
SAMPLING_SHARE = 0.05
#: Recent events kept for the page.
EVENTS_KEPT = 50
#: Snapshot times kept per host for the timeline.
SNAPSHOTS_PER_HOST = 50


class Ring:
    """The newest ``size`` items, oldest first."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError("a ring holds at least one item")
        self._items = collections.deque(maxlen=size)

    def add(self, item):
        self._items.append(item)

    def items(self) -> list:
        return list(self._items)

    @property
    def latest(self):
        return self._items[-1] if self._items else None

    def __len__(self) -> int:
        return len(self._items)


@attrs.frozen
class ServerUsage:
    """What the catalog says one server holds of this cluster's chunks."""

    chunks: int
    bytes: int


@attrs.frozen
class Sample:
    """The cluster at one moment."""

    time: float
    chunks: int
    under_replicated: int
    missing: int
    servers_alive: int
    snapshots: int
    #: address -> ServerUsage, from the catalog.
    usage: dict = attrs.field(factory=dict)
    #: host -> times of its newest snapshots, oldest first.
    snapshot_times: dict = attrs.field(factory=dict)
    #: Every server the catalog knows: (address, last heartbeat, free bytes, chunk count).
    servers: list = attrs.field(factory=list)
    #: Bytes of new copies the servers told of since the manager started (all replicas).
    stored_bytes: int = 0
    #: Bytes copied again by repair since the manager started.
    repaired_bytes: int = 0

    @property
    def healthy(self) -> int:
        return self.chunks - self.under_replicated - self.missing


@attrs.frozen
class Event:
    time: float
    kind: str
    text: str


def ticks_to_rest(took: float, interval: float, share: float = SAMPLING_SHARE) -> int:
    """Ticks to let pass without a sample after one that took ``took`` seconds, so that
    sampling every ``interval`` seconds keeps the catalog thread busy ``share`` of the time
    at most (a million chunks: 4.3 s a sample, one every 90 s rather than 30)."""
    return max(0, math.ceil(took / share / interval) - 1)


def read_catalog(catalog, alive: set[str], replicas: int) -> tuple:
    """Runs on the catalog thread: chunk health, usage per server, snapshot times per host.

    (Reads the catalog's tables directly: these counts are for operators, not for placement.)
    """
    chunks, under, missing = catalog.chunk_stats(alive, replicas)
    usage = {server: ServerUsage(count, size)
             for server, (count, size) in catalog.usage_by_server().items()}
    times: dict[str, collections.deque] = {}
    count = 0
    for host, when in catalog.db.execute("SELECT host, time FROM snapshots ORDER BY time"):
        times.setdefault(host, collections.deque(maxlen=SNAPSHOTS_PER_HOST)).append(when)
        count += 1
    return (chunks, under, missing, count, usage, {host: list(t) for host, t in times.items()},
            catalog.servers())


class ClusterWatch:
    """Samples the manager's view of the cluster every ``interval`` seconds."""

    log = Logger()

    def __init__(self, manager, interval: float = DEFAULT_INTERVAL, size: int = DEFAULT_SAMPLES,
                 timer=time.monotonic):
        self.manager = manager
        self.interval = interval
        self.history = Ring(size)
        self.timer = timer  # what a sample's cost is measured by (the reactor's clock may jump)
        self._resting = 0  # ticks still to pass without a sample
        self._loop: task.LoopingCall | None = None
        self._sampling: defer.Deferred | None = None
        #: Bytes of new copies the servers told of (``ChunksAdded``), counted by the caller.
        self.stored_bytes = 0

    def start(self):
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.manager.clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> defer.Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._sampling if self._sampling is not None else defer.succeed(None)

    def _tick(self):
        if self._resting:
            self._resting -= 1
        elif self._sampling is None:  # a slow catalog skips a tick rather than piling them up
            self._sampling = defer.ensureDeferred(self.sample())
            self._sampling.addErrback(lambda f: self.log.failure("sampling the cluster", f))
            self._sampling.addBoth(self._sampled)

    def _sampled(self, _):
        self._sampling = None

    async def sample(self) -> Sample:
        manager = self.manager
        alive = set(manager.live)
        began = self.timer()
        chunks, under, missing, snapshots, usage, times, servers = await manager.db(
            read_catalog, manager.catalog, alive, manager.replicas)
        self._resting = ticks_to_rest(self.timer() - began, self.interval)
        sample = Sample(manager.clock.seconds(), chunks, under, missing, len(alive), snapshots,
                        usage, times, servers, self.stored_bytes, manager.repair.copied_bytes)
        self.history.add(sample)
        return sample


#: The manager's log events the dashboard shows: log_format -> (kind, how to tell it).
EVENT_FORMATS = {
    "server {address} declared dead: {why}":
        ("server-dead", lambda e: f"server {e['address']} died: {e['why']}"),
    "server {address} registered: {chunks} chunks, {free} bytes free":
        ("server-up", lambda e: f"server {e['address']} came up with {e['chunks']} chunks"),
    "repair: copied {count} chunks":
        ("repair-done", lambda e: f"repair copied {e['count']} chunks"),
    "server {address} quarantined {count} corrupt copies; repairing them":
        ("corrupt", lambda e: f"server {e['address']} found {e['count']} corrupt copies"),
}


class EventLog:
    """A log observer keeping the events of ``sources`` (the manager and its repairer) whose
    format is in ``EVENT_FORMATS``."""

    def __init__(self, sources, clock, size: int = EVENTS_KEPT, publisher=globalLogPublisher):
        self.sources = list(sources)
        self.clock = clock
        self.events = Ring(size)
        self._publisher = publisher

    def __call__(self, event: dict):
        known = EVENT_FORMATS.get(event.get("log_format"))
        if known is None or not any(event.get("log_source") is s for s in self.sources):
            return
        kind, describe = known
        try:
            text = describe(event)
        except KeyError:
            return
        self.events.add(Event(self.clock.seconds(), kind, text))

    def start(self):
        self._publisher.addObserver(self)

    def stop(self):
        self._publisher.removeObserver(self)
