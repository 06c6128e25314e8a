"""When a starting manager may serve clients, driven with a fake clock."""

import pytest
from twisted.internet.task import Clock

from sdbackup.services.safemode import SafeMode

A, B, C = "tcp:a:1", "tcp:b:1", "tcp:c:1"


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1000)
    return clock


def policy(clock, *expected, timeout=30.0, settle=3.0) -> SafeMode:
    return SafeMode(frozenset(expected), clock.seconds(), timeout, settle)


def test_known_servers_all_reported(clock):
    safe = policy(clock, A, B, C)
    assert safe.waiting_for() == "0 of 3 known servers have reported"
    for address in (A, B):
        safe.server_registered(address, clock.seconds())
        safe.server_reported(address, 10)
        clock.advance(1)
        assert safe.ready_reason(clock.seconds()) is None
    assert safe.waiting_for() == "2 of 3 known servers have reported"
    safe.server_registered(C, clock.seconds())
    assert safe.ready_reason(clock.seconds()) is None  # registered is not reported
    safe.server_reported(C, 0)
    assert safe.ready_reason(clock.seconds()) == "all 3 known servers reported"


def test_a_known_server_missing_waits_for_the_timeout(clock):
    safe = policy(clock, A, B, C, timeout=30.0)
    for address in (A, B):
        safe.server_registered(address, clock.seconds())
        safe.server_reported(address, 10)
    # No settling when the catalog knew its servers: it waits for C...
    assert safe.next_check(clock.seconds()) == 1030.0
    clock.advance(29.9)
    assert safe.ready_reason(clock.seconds()) is None
    # ...until the timeout.
    clock.advance(0.1)
    assert safe.ready_reason(clock.seconds()) == "safe mode timeout of 30 s"
    assert safe.next_check(clock.seconds()) is None


def test_the_timeout_needs_one_server_reported(clock):
    safe = policy(clock, A, timeout=5.0)
    clock.advance(60)
    assert safe.ready_reason(clock.seconds()) is None
    assert safe.next_check(clock.seconds()) is None  # only a report can help now
    safe.server_registered(A, clock.seconds())
    assert safe.ready_reason(clock.seconds()) is None
    safe.server_reported(A, 3)
    assert safe.ready_reason(clock.seconds()) is not None


def test_a_fresh_cluster_is_ready_at_once(clock):
    safe = policy(clock)
    assert safe.waiting_for() == "waiting for storage servers to report"
    safe.server_registered(A, clock.seconds())
    assert safe.ready_reason(clock.seconds()) is None
    safe.server_reported(A, 0)
    assert safe.ready_reason(clock.seconds()) == "a fresh cluster: the first server holds nothing"


def test_a_lost_catalog_settles_once_no_server_registers_anymore(clock):
    safe = policy(clock, settle=3.0)
    safe.server_registered(A, clock.seconds())
    safe.server_reported(A, 5)  # it holds something: the catalog was lost, wait for others
    assert safe.ready_reason(clock.seconds()) is None
    assert safe.waiting_for() == "1 servers have reported; waiting for more"
    clock.advance(2)
    safe.server_registered(B, clock.seconds())  # a new registration restarts the wait
    safe.server_reported(B, 0)  # (only the first server to report tells a fresh cluster)
    clock.advance(2)
    assert safe.ready_reason(clock.seconds()) is None
    assert safe.next_check(clock.seconds()) == 1005.0
    clock.advance(1)
    assert safe.ready_reason(clock.seconds()) == "no new server for 3 s"


def test_settling_waits_for_a_registered_server_to_finish_reporting(clock):
    safe = policy(clock, settle=3.0)
    safe.server_registered(A, clock.seconds())
    safe.server_reported(A, 5)
    safe.server_registered(B, clock.seconds())  # a long inventory under way
    clock.advance(10)
    assert safe.ready_reason(clock.seconds()) is None
    safe.server_reported(B, 10**6)
    assert safe.ready_reason(clock.seconds()) == "no new server for 3 s"


def test_a_server_lost_before_reporting_is_not_waited_for(clock):
    safe = policy(clock, settle=3.0)
    safe.server_registered(A, clock.seconds())
    safe.server_reported(A, 5)
    safe.server_registered(B, clock.seconds())
    safe.server_lost(B)
    clock.advance(3)
    assert safe.ready_reason(clock.seconds()) == "no new server for 3 s"


def test_a_known_server_registering_again_must_report_again(clock):
    safe = policy(clock, A, B)
    for address in (A, B):
        safe.server_registered(address, clock.seconds())
    safe.server_reported(A, 1)
    safe.server_registered(A, clock.seconds())  # its link broke and came back
    safe.server_reported(B, 1)
    assert safe.ready_reason(clock.seconds()) is None
    safe.server_reported(A, 1)
    assert safe.ready_reason(clock.seconds()) == "all 2 known servers reported"


def test_an_unknown_server_reporting_does_not_stand_for_a_known_one(clock):
    safe = policy(clock, A, B, timeout=30.0)
    safe.server_registered(C, clock.seconds())
    safe.server_reported(C, 0)
    safe.server_registered(A, clock.seconds())
    safe.server_reported(A, 0)
    assert safe.ready_reason(clock.seconds()) is None
    assert safe.waiting_for() == "1 of 2 known servers have reported"
