"""Promises of README.rst that no other test held to, against the services in this process
(the list of promises and their tests: issue 11)."""

import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python import usage

from sdbackup import manager_tap, server_tap
from sdbackup.client.backup import Backup
from sdbackup.client.session import STARTING_RETRY, STARTING_WAIT, ClientError, Session
from sdbackup.protocols.messages import ListSnapshots, Locate
from sdbackup.protocols.peer import RemoteError
from sdbackup.services.manager import ManagerService

from .backups import make_backup

#: README: "--dead-after, --repair-interval, --repair-rate, --history-interval and the connection
#: options must be positive" (the manager); "Every option in seconds or MiB, and the connection
#: options, must be positive" (the server). tests/unit/test_options.py has the others.
CONNECTION_OPTIONS = ["--handshake-timeout", "--idle-timeout", "--max-connections",
                      "--max-connections-per-host"]


@pytest.mark.parametrize("option", ["--history-interval", *CONNECTION_OPTIONS])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_managers_history_and_connection_options_must_be_positive(option, value, tmp_path):
    with pytest.raises(usage.UsageError, match=f"^{option} must be positive$"):
        manager_tap.Options().parseOptions(["--data", str(tmp_path), option, value])


@pytest.mark.parametrize("option", CONNECTION_OPTIONS)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_servers_connection_options_must_be_positive(option, value, tmp_path):
    with pytest.raises(usage.UsageError, match=f"^{option} must be positive$"):
        server_tap.Options().parseOptions(["--data", str(tmp_path / "data"), option, value])


@pytest.mark.parametrize("option", ["--safe-mode-timeout", "--safe-mode-settle"])
def test_a_safe_mode_wait_of_zero_is_taken(option, tmp_path):
    """README: "the two safe-mode options cannot be negative": zero is a value they take."""
    options = manager_tap.Options()
    options.parseOptions(["--data", str(tmp_path), option, "0"])
    assert options[option.lstrip("-")] == 0


@pytest.mark.parametrize("tap", [manager_tap, server_tap])
@pytest.mark.parametrize("given", [("--tls-ca",), ("--tls-cert", "--tls-key"), ("--tls-ca", "--tls-key")])
def test_the_tls_files_are_given_together_or_not_at_all(tap, given, tmp_path):
    """README: "--tls-ca FILE, --tls-cert FILE, --tls-key FILE ... Given together, or not at all"."""
    pem = tmp_path / "some.pem"
    pem.write_text("whatever\n")
    arguments = ["--data", str(tmp_path / "data")]
    for option in given:
        arguments += [option, str(pem)]
    with pytest.raises(usage.UsageError, match=r"^give all of --tls-ca, --tls-cert and --tls-key, or none$"):
        tap.Options().parseOptions(arguments)


@pytest_twisted.ensureDeferred
async def test_the_manager_names_the_live_holders_or_every_recorded_one_when_none_is_live(
        make_cluster):
    """README (Restores): "The manager names only the live holders of a chunk or tree (all
    recorded ones when none is live)". Two servers and two copies: no repair can move a copy."""
    cluster = await make_cluster(servers=2, replicas=2)
    client = await cluster.wire_client()
    try:
        backup = make_backup("holders")
        await client.backup(backup)
        chunk_id = backup.data[0][0]
        first, second = cluster.servers
        both = sorted([first.server.address, second.server.address])
        located = (await client.ask(Locate(chunk_ids=[chunk_id, backup.tree_id]))).holders
        assert {k: sorted(v) for k, v in located.items()} == {chunk_id: both, backup.tree_id: both}

        await cluster.stop_server(first)
        located = (await client.ask(Locate(chunk_ids=[chunk_id, backup.tree_id]))).holders
        assert located == {chunk_id: [second.server.address],
                           backup.tree_id: [second.server.address]}

        await cluster.stop_server(second)
        located = (await client.ask(Locate(chunk_ids=[chunk_id]))).holders
        assert sorted(located[chunk_id]) == both
    finally:
        await client.close()


def copies(cluster) -> dict[str, int]:
    """How many running servers hold each chunk, from their chunk files."""
    counts: dict[str, int] = {}
    for server in cluster.servers:
        if server.running:
            for chunk_id in server.store.chunk_ids():
                counts[chunk_id] = counts.get(chunk_id, 0) + 1
    return counts


async def fully_replicated(cluster) -> bool:
    total, under, missing = await cluster.chunk_health()
    return total > 0 and under == 0 and missing == 0


@pytest_twisted.ensureDeferred
async def test_no_repair_runs_while_the_manager_starts_and_one_does_once_it_serves(make_cluster):
    """README (A manager that starts): "No repair runs while it starts: a server not yet back
    is not a lost one." A known server is missing at the restart: its chunks look short of
    copies, yet nothing is copied until the safe mode ends."""
    cluster = await make_cluster(servers=3, replicas=2, safe_mode_timeout=5.0)
    client = await cluster.wire_client()
    try:
        await client.backup(make_backup("starting"))
    finally:
        await client.close()
    await cluster.until(lambda: fully_replicated(cluster), what="two copies of everything")
    absent = max(cluster.servers, key=lambda s: s.store.count())
    others = [s for s in cluster.servers if s is not absent]
    held_before = {s.server.address: set(s.store.chunk_ids()) for s in others}

    old = cluster.manager
    await old.stopService()
    await absent.stopService()
    await cluster.start_manager(f"tcp:{cluster.manager_address.rsplit(':', 1)[1]}", old.data)
    manager = cluster.manager.manager
    await cluster.until(lambda: len(manager.live) == 2, what="the two others registering")
    await task.deferLater(reactor, 1.5)  # seven --repair-interval ticks of 0.2 s

    assert not manager.ready
    assert {s.server.address: set(s.store.chunk_ids()) for s in others} == held_before
    # Once it serves (the safe-mode time-out), the repair does run: the wait above was no idle one.
    await cluster.until(lambda: manager.ready, what="the safe mode's end")
    await cluster.until(lambda: fully_replicated(cluster), what="the repair")
    assert set(copies(cluster).values()) == {2}


@pytest_twisted.ensureDeferred
async def test_a_server_that_comes_back_counts_once_and_its_extra_copies_are_kept(make_cluster):
    """README (Re-replication): "A server that comes back reports its chunks, which replace what
    the index recorded for it, so no copy is counted twice; extra copies are kept"."""
    cluster = await make_cluster(servers=3, replicas=2)
    client = await cluster.wire_client()
    try:
        backup = make_backup("back")
        await client.backup(backup)
        await cluster.until(lambda: fully_replicated(cluster), what="two copies of everything")
        index = max(range(3), key=lambda i: cluster.servers[i].store.count())
        victim = cluster.servers[index]
        port = victim.port.getHost().port
        its_chunks = set(victim.store.chunk_ids())
        await cluster.stop_server(victim)
        await cluster.until(lambda: fully_replicated(cluster), what="the repair around it")
        assert set(copies(cluster).values()) == {2}

        back = await cluster.add_server(index, f"tcp:{port}")
        await cluster.until(lambda: back.server.address in cluster.manager.manager.live,
                            what="its return")
        await task.deferLater(reactor, 1.0)  # five repair ticks: nothing is taken away
        held = copies(cluster)
        assert {held[c] for c in its_chunks} == {3}, "its copies were kept, beside the new ones"
        assert set(back.store.chunk_ids()) == its_chunks
        located = (await client.ask(Locate(chunk_ids=sorted(its_chunks)))).holders
        assert {len(set(holders)) for holders in located.values()} == {3}
        total, under, missing = await cluster.chunk_health()
        assert (total, under, missing) == (len(held), 0, 0)
    finally:
        await client.close()


# --- a client and a manager that is still starting --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_command_waits_for_a_starting_manager_then_gives_up_with_its_reason(tmp_path):
    """README: "While the manager is starting, every command but status waits for it, for up to
    120 seconds, after printing why on standard error"; then "1 ... the manager's reason when it
    is still starting after 120 seconds". A manager no server reached stays starting; the
    client's waits run on a clock the test moves (the link to the manager is real)."""
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor)
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        told = []
        session = await Session(reactor, f"tcp:127.0.0.1:{port}", notice=told.append).connect()
        # Its waits (0.5 s between tries, the 120 s bound, the request's time-out) on a clock
        # the test moves; its connection stays on the reactor.
        clock = task.Clock()
        session.reactor = clock
        try:
            asking = defer.ensureDeferred(session.ask(ListSnapshots()))
            waited_at = []
            while not asking.called:
                assert clock.seconds() <= 2 * STARTING_WAIT, "it waits on and on"
                # Answered "starting": the client sleeps STARTING_RETRY on the clock (until then
                # only the request's time-out is due, far later).
                retry = clock.seconds() + STARTING_RETRY
                if any(call.getTime() <= retry for call in clock.getDelayedCalls()):
                    waited_at.append(clock.seconds())
                    clock.advance(STARTING_RETRY)
                else:
                    await task.deferLater(reactor, 0.005)
            with pytest.raises(RemoteError) as refused:
                await asking
        finally:
            await session.close()
    finally:
        await manager.stopService()
    assert refused.value.code == "starting"
    assert refused.value.reason.startswith("the manager is starting: "), refused.value.reason
    assert told == [f"{refused.value.reason}; waiting"]
    # Asked again every half second for 120 s, and not beyond.
    assert waited_at == [i * STARTING_RETRY for i in range(len(waited_at))]
    assert 120.0 < clock.seconds() <= 120.0 + STARTING_RETRY


# --- a backup whose chunks no server takes ---------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_backup_gives_up_on_a_chunk_after_4_store_attempts(make_cluster, tmp_path,
                                                                   monkeypatch):
    """README (When things fail, Backups): a failing primary "is excluded for the rest of the
    backup, and the pack's chunks are placed again without it, up to 4 attempts". Every server
    refuses every store (a full disk); there are five, so the bound, not the servers, ends it."""
    cluster = await make_cluster(servers=5, replicas=1)
    for server in cluster.servers:
        server.store.reserve = 2**62  # the disk refuses every write
    address_of = {s.server: s.server.address for s in cluster.servers}
    refusals = []

    def observe(event):  # each server logs each store it refuses
        if event.get("log_format") == "refused a store: {why}" and event.get("log_source") in address_of:
            refusals.append(address_of[event["log_source"]])

    monkeypatch.chdir(tmp_path)
    os.makedirs("src")
    with open("src/a.txt", "wb") as f:
        f.write(b"no server takes this\n")
    globalLogPublisher.addObserver(observe)
    try:
        session = await cluster.session()
        try:
            with pytest.raises(ClientError) as failed:
                await Backup(session, ["src"]).run()
        finally:
            await session.close()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert str(failed.value).startswith("could not store chunks after 4 attempts: "), failed.value
    assert len(refusals) == 4 and len(set(refusals)) == 4, refusals  # four servers, one each
    assert all(server.store.count() == 0 for server in cluster.servers)
    client = await cluster.wire_client()
    try:
        assert (await client.ask(ListSnapshots())).snapshots == []  # no snapshot object stored
    finally:
        await client.close()
