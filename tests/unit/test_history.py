"""The manager's bounded history and its events from log lines."""

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from sdbackup.services.catalog import Catalog
from sdbackup.services.history import EVENTS_KEPT, ClusterWatch, EventLog, Ring, Sample, ticks_to_rest


@attrs.frozen
class At:
    time: float


def test_ring_keeps_the_newest_items_in_order():
    ring = Ring(3)
    for t in range(10):
        ring.add(At(t))

    assert [i.time for i in ring.items()] == [7, 8, 9]
    assert len(ring) == 3
    assert ring.latest == At(9)


def test_an_empty_ring_has_no_latest_and_a_ring_cannot_be_empty():
    assert Ring(1).latest is None
    with pytest.raises(ValueError):
        Ring(0)


def test_healthy_chunks_are_those_neither_short_nor_missing():
    assert Sample(0.0, chunks=10, under_replicated=3, missing=2, servers_alive=2,
                  snapshots=1).healthy == 5


#: Where the test classes log: not the global publisher.
PUBLISHER = LogPublisher()


class Manager:
    log = Logger(observer=PUBLISHER)

    def died(self, address):
        self.log.warn("server {address} declared dead: {why}", address=address, why="test")


class Other:
    log = Logger(observer=PUBLISHER)

    def died(self, address):
        self.log.warn("server {address} declared dead: {why}", address=address, why="test")


def test_event_log_keeps_known_events_of_its_sources_only():
    manager, other = Manager(), Other()
    clock = Clock()
    clock.advance(100)
    events = EventLog([manager], clock, publisher=PUBLISHER)
    events.start()
    try:
        manager.died("tcp:a:1")
        other.died("tcp:b:2")  # another manager in the same process
        manager.log.info("something else about {address}", address="tcp:a:1")
    finally:
        events.stop()
    manager.died("tcp:a:1")  # after the stop: not heard

    assert [(e.time, e.kind, e.text) for e in events.events.items()] == [
        (100.0, "server-dead", "server tcp:a:1 died: test")]


def test_event_log_is_bounded():
    manager = Manager()
    events = EventLog([manager], Clock(), publisher=PUBLISHER)
    for i in range(EVENTS_KEPT + 10):
        events({"log_format": "repair: copied {count} chunks", "log_source": manager, "count": i})

    kept = events.events.items()
    assert len(kept) == EVENTS_KEPT
    assert kept[-1].text == f"repair copied {EVENTS_KEPT + 9} chunks"


def test_a_sample_costs_a_small_share_of_the_catalog_thread_at_most():
    """A million chunks take seconds to sample: the slower a sample, the more ticks pass
    before the next, so that backups' requests seldom wait behind one."""
    assert ticks_to_rest(0.005, 30.0) == 0  # a small catalog: a sample every tick
    assert ticks_to_rest(1.5, 30.0) == 0  # 5% of 30 s
    assert ticks_to_rest(1.6, 30.0) == 1
    assert ticks_to_rest(4.3, 30.0) == 2  # measured at a million chunks: one every 90 s
    assert ticks_to_rest(4.3, 30.0, share=0.5) == 0


class Catalogued:
    """What ``ClusterWatch`` reads of a manager, with a real catalog whose reads take
    ``cost`` seconds on the watch's timer."""

    def __init__(self, catalog):
        self.catalog, self.clock, self.live, self.replicas = catalog, Clock(), {}, 2
        self.repair = attrs.make_class("Repair", {"copied_bytes": attrs.field(default=0)})()
        self.cost, self.now = 0.0, 0.0

    def db(self, function, *args):
        self.now += self.cost
        return defer.succeed(function(*args))

    def timer(self):
        return self.now


def test_the_watch_samples_less_often_while_its_samples_are_slow(tmp_path):
    catalog = Catalog(str(tmp_path / "catalog.db"))
    catalog.add_locations("tcp:127.0.0.1:5001", [("ab" * 32, 10)], added=1.0)
    manager = Catalogued(catalog)
    watch = ClusterWatch(manager, interval=30.0, timer=manager.timer)
    watch.start()
    manager.clock.pump([30.0] * 3)  # quick samples: one a tick
    assert [s.time for s in watch.history.items()] == [0.0, 30.0, 60.0, 90.0]
    assert watch.history.latest.chunks == 1

    manager.cost = 4.0  # 4 s a sample: one every 3 ticks
    manager.clock.pump([30.0] * 7)
    assert [s.time for s in watch.history.items()][4:] == [120.0, 210.0, 300.0]

    manager.cost = 0.0  # the catalog quick again: after the rest, every tick again
    manager.clock.pump([30.0] * 4)
    assert [s.time for s in watch.history.items()][7:] == [390.0, 420.0]
    watch.stop()
    catalog.close()
