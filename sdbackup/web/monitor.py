"""The manager's window on the cluster: its metrics, its history and its dashboard.

``ManagerMonitor`` is started by ``ManagerService`` once the ``Manager`` exists. It
times the manager's requests, samples the cluster (``ClusterWatch``), keeps recent
events (``EventLog``), and serves ``--metrics`` and ``--web`` on their own
listeners. Either may be off; with both off nothing here runs.
"""

from prometheus_client.core import CounterMetricFamily
from twisted.internet import defer
from twisted.logger import Logger

from sdbackup.metrics import (
    Metrics,
    MetricsRoot,
    gauge,
    https_options,
    listen_http,
    metrics_endpoint,
)
from sdbackup.services.history import DEFAULT_INTERVAL, DEFAULT_SAMPLES, ClusterWatch, EventLog
from sdbackup.web import status as status_json
from sdbackup.web.endpoints import dashboard_endpoint, is_loopback
from sdbackup.web.site import Dashboard, read_password


class ManagerMonitor:
    log = Logger()

    def __init__(self, service, metrics: str | None = None, web: str | None = None,
                 web_password_file: str | None = None, history_interval: float = DEFAULT_INTERVAL,
                 history_samples: int = DEFAULT_SAMPLES,
                 stale_after: float = status_json.DEFAULT_STALE_AFTER):
        self.service = service
        # Refused here, before anything starts, when the rules forbid the address.
        self.metrics_endpoint = None if metrics is None else metrics_endpoint(service, metrics)
        self.https = https_options(service)
        self.web_endpoint = None if web is None else dashboard_endpoint(
            web, web_password_file, self.https is not None)
        self.password = None if web_password_file is None else read_password(web_password_file)
        self.history_interval = history_interval
        self.history_samples = history_samples
        self.stale_after = stale_after
        self.metrics = Metrics()
        self.watch: ClusterWatch | None = None
        self.events: EventLog | None = None
        #: Fire with the listening ports (tests read the ephemeral port numbers from them).
        self.metrics_listening: defer.Deferred | None = None
        self.web_listening: defer.Deferred | None = None
        self._ports = []
        #: address -> the disk size it last told: shown for servers that died since.
        self.disk_sizes: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.metrics_endpoint is not None or self.web_endpoint is not None

    def start(self):
        if not self.enabled:
            return
        manager = self.service.manager
        self.watch = ClusterWatch(manager, self.history_interval, self.history_samples)
        self.events = EventLog([manager, manager.repair], manager.clock)
        m = self.metrics
        stored = m.counter("sdbackup_stored_bytes",
                           "Bytes of new chunk copies the servers told of (every replica).")

        def on_request(msg):
            if type(msg).__name__ == "ChunksAdded":
                added = sum(c.size for c in msg.chunks)
                stored.inc(added)
                self.watch.stored_bytes += added

        m.instrument(manager, on_request)
        m.count_log_events([manager, manager.repair], {
            "snapshot {snapshot} committed: {host}, {files} files, {size} bytes": (
                m.counter("sdbackup_snapshots_committed", "Snapshots committed."), None),
            "repair: copied {count} chunks": (
                m.counter("sdbackup_repaired_chunks", "Chunks copied again by repair."), "count"),
            "server {address} quarantined {count} corrupt copies; repairing them": (
                m.counter("sdbackup_corrupt_copies_reported",
                          "Corrupt copies the servers reported."), "count"),
        })
        m.add_reading(self._readings)
        self.events.start()
        self.watch.start()
        reactor = self.service.reactor
        if self.metrics_endpoint is not None:
            self.metrics_listening = self._listen(reactor, self.metrics_endpoint, MetricsRoot(m),
                                                  "metrics", self.https)
        if self.web_endpoint is not None:
            site = Dashboard(self.status, m, self.password)
            # Plain HTTP on loopback (a browser on this host, or through an SSH tunnel).
            tls = None if is_loopback(self.web_endpoint) else self.https
            self.web_listening = self._listen(reactor, self.web_endpoint, site, "dashboard", tls)

    def _listen(self, reactor, endpoint: str, root, what: str, tls) -> defer.Deferred:
        d = listen_http(reactor, endpoint, root, tls)

        def listened(port):
            self._ports.append(port)
            self.log.info("sdbackup-manager {what} on port {port}", what=what,
                          port=port.getHost().port)
            return port

        d.addCallback(listened)
        d.addErrback(self.service.fail, f"cannot serve the {what} on {endpoint}")
        return d

    def status(self) -> dict:
        """The dashboard's JSON now."""
        manager = self.service.manager
        live = [status_json.LiveView(s.address, s.free_bytes, s.chunk_count, s.last_seen,
                                     s.total_bytes, s.scrub_done, s.scrub_total)
                for s in manager.live.values()]
        self.disk_sizes.update((s.address, s.total_bytes) for s in live if s.total_bytes)
        return status_json.status(manager.clock.seconds(), manager.state, manager.replicas, live,
                                  self.watch.history.items(), self.events.events.items(),
                                  manager.repair.running is not None, self.stale_after,
                                  manager.repair.copied_bytes, self.disk_sizes)

    def _readings(self):
        manager = self.service.manager
        yield gauge("sdbackup_servers_alive", "Storage servers connected and heartbeating.",
                    len(manager.live))
        yield gauge("sdbackup_connections_open", "Connections open to the manager.",
                    len(manager.connections))
        yield gauge("sdbackup_ready", "1 once out of safe mode.", int(manager.ready))
        copied = CounterMetricFamily("sdbackup_repaired_bytes", "Bytes copied again by repair "
                                     "(every new copy).")
        copied.add_metric([], manager.repair.copied_bytes)
        yield copied
        yield gauge("sdbackup_repair_running", "1 while a repair pass is under way.",
                    int(manager.repair.running is not None))
        yield gauge("sdbackup_server_free_bytes", "Bytes free on each live server's disk.",
                    labels={"server": ""}, values=[({"server": s.address}, s.free_bytes)
                                                   for s in manager.live.values()])
        yield gauge("sdbackup_server_size_bytes", "Size of each live server's disk (its data "
                    "folder's file system).", labels={"server": ""},
                    values=[({"server": s.address}, s.total_bytes) for s in manager.live.values()
                            if s.total_bytes])
        sample = self.watch.history.latest
        if sample is None:
            return
        yield gauge("sdbackup_servers_known", "Storage servers the catalog knows.",
                    len(sample.servers))
        yield gauge("sdbackup_chunks", "Chunks (and objects) the catalog knows.", sample.chunks)
        yield gauge("sdbackup_chunks_under_replicated",
                    "Chunks with some but fewer live copies than the replication factor.",
                    sample.under_replicated)
        yield gauge("sdbackup_chunks_missing", "Chunks with no live copy.", sample.missing)
        yield gauge("sdbackup_snapshots", "Snapshots indexed.", sample.snapshots)
        yield gauge("sdbackup_server_stored_chunks", "Copies each server holds, per the catalog.",
                    labels={"server": ""}, values=[({"server": a}, u.chunks)
                                                   for a, u in sorted(sample.usage.items())])
        yield gauge("sdbackup_server_stored_bytes", "Bytes of copies each server holds, per the "
                    "catalog.", labels={"server": ""},
                    values=[({"server": a}, u.bytes) for a, u in sorted(sample.usage.items())])
        yield gauge("sdbackup_health_sampled_timestamp_seconds",
                    "When the chunk counts above were read from the catalog (Unix time).",
                    sample.time)

    async def stop(self):
        if not self.enabled:
            return
        self.metrics.stop()
        if self.events is not None:
            self.events.stop()
        for port in self._ports:
            await port.stopListening()
        if self.watch is not None:
            await self.watch.stop()
