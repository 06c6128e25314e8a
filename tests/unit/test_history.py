"""The manager's bounded history and its events from log lines."""

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from sdbackup.services.history import EVENTS_KEPT, EventLog, Ring, Sample


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
