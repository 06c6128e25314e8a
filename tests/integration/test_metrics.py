"""``--metrics`` and ``--web`` of an in-process cluster, read over HTTP as Prometheus and a
browser would: the numbers match what the cluster holds after a backup and after a death."""

import base64
import json
import os

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers

from sdbackup import hashing, pki, tlsconfig
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ChunkRef, FetchChunk, StoreChunks
from sdbackup.services.manager import ManagerService
from sdbackup.services.server import StorageService

from .backups import make_backup

LOOPBACK = "tcp:0:interface=127.0.0.1"


async def get(port: int, path: str, password: bytes | None = None) -> tuple[int, bytes]:
    headers = Headers()
    if password is not None:
        headers.addRawHeader(b"authorization", b"Basic " + base64.b64encode(b"admin:" + password))
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode(),
                                            headers)
    return response.code, await readBody(response)


async def scrape(port: int) -> dict:
    """``{(name, frozenset(labels)): value}`` of every sample on /metrics."""
    code, body = await get(port, "/metrics")
    assert code == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def with_monitoring(cluster, **options):
    """Restart the cluster's manager with ``options`` (``metrics``, ``web``, ...); its ports."""
    cluster.options.update(history_interval=0.1, **options)
    await cluster.restart_manager()
    await cluster.until_ready()
    monitor = cluster.manager.monitor
    ports = {}
    if monitor.metrics_listening is not None:
        ports["metrics"] = (await monitor.metrics_listening).getHost().port
    if monitor.web_listening is not None:
        ports["web"] = (await monitor.web_listening).getHost().port
    return ports


async def until_sampled(cluster, condition, what: str):
    """Wait until the manager's newest health sample satisfies ``condition``."""
    watch = cluster.manager.monitor.watch
    return await cluster.until(lambda: watch.history.latest is not None
                               and condition(watch.history.latest), what=what)


@pytest_twisted.ensureDeferred
async def test_manager_metrics_follow_backups_and_a_death(cluster):
    ports = await with_monitoring(cluster, metrics=LOOPBACK)
    client = await cluster.wire_client()
    try:
        await client.backup(make_backup("one"))
        known, _, _ = await cluster.chunk_health()
        await until_sampled(cluster, lambda s: s.chunks == known and s.snapshots == 1,
                            "a sample after the backup")
        first = await scrape(ports["metrics"])

        assert value(first, "sdbackup_servers_alive") == 3
        assert known > 0 and value(first, "sdbackup_chunks") == known
        assert value(first, "sdbackup_chunks_missing") == 0
        assert value(first, "sdbackup_snapshots") == 1
        assert value(first, "sdbackup_snapshots_committed_total") == 1
        assert value(first, "sdbackup_requests_total", message="CommitSnapshot", outcome="ok") == 1
        assert value(first, "sdbackup_request_duration_seconds_count",
                     message="CommitSnapshot") == 1
        # Every copy of every chunk was told of by its server, and counted once.
        copies = sum(value(first, "sdbackup_server_stored_chunks", server=s.server.address)
                     for s in cluster.servers)
        assert copies == 2 * known
        assert value(first, "sdbackup_stored_bytes_total") > 0

        await client.backup(make_backup("two"))
        second = await scrape(ports["metrics"])
        placements = ("sdbackup_requests_total", {"message": "PlacementRequest", "outcome": "ok"})
        assert value(second, placements[0], **placements[1]) > value(first, placements[0],
                                                                     **placements[1])
        assert value(second, "sdbackup_snapshots_committed_total") == 2

        await cluster.stop_server(cluster.servers[0])
        after_death = await scrape(ports["metrics"])
        assert value(after_death, "sdbackup_servers_alive") == 2
        dead = frozenset({"server": cluster.servers[0].server.address}.items())
        assert ("sdbackup_server_free_bytes", dead) in first
        assert ("sdbackup_server_free_bytes", dead) not in after_death
        for s in cluster.servers:
            size = value(first, "sdbackup_server_size_bytes", server=s.server.address)
            assert size > value(first, "sdbackup_server_free_bytes", server=s.server.address)
        assert ("sdbackup_server_size_bytes", dead) not in after_death

        async def repaired():
            _, under, missing = await cluster.chunk_health()
            return under == 0 and missing == 0
        await cluster.until(repaired, what="the chunks the dead server held copied again")
        repaired_samples = await scrape(ports["metrics"])
        assert value(repaired_samples, "sdbackup_repaired_bytes_total") > 0
        assert value(repaired_samples, "sdbackup_repaired_chunks_total") > 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_server_metrics_count_what_it_stores_and_serves(cluster, tmp_path):
    server = StorageService(LOOPBACK, str(tmp_path / "extra"), cluster.manager_address,
                            heartbeat=0.2, reconnect_delay=0.2, reactor=reactor, metrics=LOOPBACK)
    server.startService()
    client = await cluster.wire_client()
    try:
        await server.when_registered()
        port = (await server.metrics.listening).getHost().port
        payload = os.urandom(5000)
        chunk_id = hashing.chunk_id(payload)
        await client.servers.request(server.server.address, StoreChunks(
            chunks=[ChunkRef(chunk_id, len(payload), hashing.checksum(payload))],
            forward_to=[], kind=Kind.DATA, ticket=cluster.ticket([chunk_id], [server.server.address]),
            payload=payload))
        await client.servers.request(server.server.address, FetchChunk(chunk_id=chunk_id))

        samples = await scrape(port)

        assert value(samples, "sdbackup_chunks_held") == 1
        assert value(samples, "sdbackup_received_bytes_total", peer="client") == len(payload)
        assert value(samples, "sdbackup_sent_bytes_total", peer="client") == len(payload)
        assert value(samples, "sdbackup_received_bytes_total", peer="server") == 0
        assert value(samples, "sdbackup_requests_total", message="StoreChunks", outcome="ok") == 1
        assert value(samples, "sdbackup_requests_total", message="FetchChunk", outcome="ok") == 1
        assert value(samples, "sdbackup_free_bytes") > 0
        assert value(samples, "sdbackup_connections_open") >= 1
        assert value(samples, "sdbackup_manager_connected") == 1
        assert value(samples, "sdbackup_scrubbed_bytes_total") == 0

        await server.server.scrub()
        samples = await scrape(port)
        assert value(samples, "sdbackup_scrubbed_bytes_total") == len(payload)
        assert value(samples, "sdbackup_scrub_chunks_total") == 0  # no pass under way now
    finally:
        await client.close()
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_status_json_shows_servers_health_snapshots_and_deaths(cluster):
    ports = await with_monitoring(cluster, web=LOOPBACK)
    client = await cluster.wire_client()
    try:
        await client.backup(make_backup("one", host="db-host-7"))
        known, _, _ = await cluster.chunk_health()
        await until_sampled(cluster, lambda s: s.snapshots == 1, "a sample after the backup")
        code, body = await get(ports["web"], "/api/status")
        assert code == 200
        status = json.loads(body)

        assert {s["address"]: s["state"] for s in status["servers"]} == {
            s.server.address: "alive" for s in cluster.servers}
        assert status["health"]["chunks"] == known
        assert status["health"]["missing"] == 0
        assert [h["host"] for h in status["snapshots"]["hosts"]] == ["db-host-7"]
        assert "db-host-7" in status["charts"]["snapshots"]
        assert "/home/me" not in body.decode()  # no paths, no file names
        for server in status["servers"]:
            # The disk's size came with the heartbeats; used is what is not free, and this
            # cluster's chunks are part of it.
            assert server["total_bytes"] > server["free_bytes"] > 0
            assert server["used_bytes"] == server["total_bytes"] - server["free_bytes"]
            assert 0 < server["cluster_bytes"] <= server["used_bytes"]
            assert server["scrub"] is None
        assert status["repair"]["copied_bytes"] == 0

        dead = cluster.servers[1]
        await cluster.stop_server(dead)
        status = json.loads((await get(ports["web"], "/api/status"))[1])
        states = {s["address"]: s["state"] for s in status["servers"]}
        assert states[dead.server.address] == "dead"
        assert status["servers_alive"] == 2
        assert any(e["kind"] == "server-dead" and dead.server.address in e["text"]
                   for e in status["events"])
        page = (await get(ports["web"], "/"))[1]
        assert b"dashboard.js" in page
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_status_json_shows_a_scrub_under_way_within_a_heartbeat_or_two(cluster):
    ports = await with_monitoring(cluster, web=LOOPBACK)
    client = await cluster.wire_client()
    scrubbing = None
    try:
        await client.backup(make_backup("one"))
        server = cluster.servers[2].server
        held = server.store.count()

        async def scrub_shown():
            status = json.loads((await get(ports["web"], "/api/status"))[1])
            return {s["address"]: s["scrub"] for s in status["servers"]}

        # A slow scrub: each chunk takes seconds at 10 bytes a second. The heartbeat is every
        # 0.2 s here: the page shows the scrub within a few seconds, loaded machine or not.
        scrubbing = defer.ensureDeferred(server.scrub(rate=10))
        scrubs = await cluster.until(lambda: defer.ensureDeferred(scrub_shown()).addCallback(
            lambda shown: shown if shown[server.address] else None), timeout=3,
            what="the scrub shown on the dashboard")
        assert scrubs[server.address]["total"] == held > 1
        assert 1 <= scrubs[server.address]["done"] < held
        assert [a for a, scrub in scrubs.items() if scrub] == [server.address]

        scrubbing.cancel()
        await cluster.until(lambda: defer.ensureDeferred(scrub_shown()).addCallback(
            lambda shown: shown[server.address] is None), timeout=3,
            what="the scrub's end shown on the dashboard")
    finally:
        if scrubbing is not None:
            scrubbing.cancel()
            await scrubbing.addErrback(lambda f: f.trap(defer.CancelledError))
        await client.close()


@pytest_twisted.ensureDeferred
async def test_dashboard_with_a_password_refuses_requests_without_it(cluster, tmp_path):
    password_file = tmp_path / "web-password"
    password_file.write_text("s3cret horse\n")
    ports = await with_monitoring(cluster, web=LOOPBACK, web_password_file=str(password_file))

    assert (await get(ports["web"], "/api/status"))[0] == 401
    assert (await get(ports["web"], "/", password=b"wrong"))[0] == 401
    code, body = await get(ports["web"], "/api/status", password=b"s3cret horse")
    assert code == 200 and json.loads(body)["state"] == "ready"


@pytest_twisted.ensureDeferred
async def test_a_manager_with_tls_serves_its_metrics_over_https_only(tmp_path):
    ca = pki.create_ca()
    pki.save_ca(str(tmp_path), ca)
    cert, key = pki.save_certificate(str(tmp_path), "manager", pki.issue(ca, "manager", "manager"))
    identity = tlsconfig.load_identity(pki.ca_paths(str(tmp_path))[0], cert, key)
    manager = ManagerService(LOOPBACK, str(tmp_path / "manager"), reactor=reactor,
                             transport=tlsconfig.Transport(tls=identity), metrics=LOOPBACK)
    manager.startService()
    try:
        port = (await manager.monitor.metrics_listening).getHost().port
        trust = ssl.Certificate.loadPEM(ca.certificate)
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        response = await agent.request(b"GET", f"https://127.0.0.1:{port}/metrics".encode())
        body = (await readBody(response)).decode()

        assert response.code == 200
        assert "sdbackup_servers_alive 0.0" in body
        with pytest.raises(ResponseNeverReceived):  # plaintext HTTP gets no answer
            await get(port, "/metrics")
    finally:
        await manager.stopService()
