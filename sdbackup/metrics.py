"""Prometheus metrics of one process (manager or storage server), in the text format.

Each service owns a ``Metrics``: its own ``CollectorRegistry`` (several services may
run in one process, as in the tests). Three sources feed it:

* ``instrument(handler)`` times every ``handle_<Message>`` of the service's handler
  and counts requests, outcomes and the chunk bytes they carry, for every connection
  that serves it (listener, manager link);
* ``count_log_events`` turns the service's own structured log events (a corrupt copy
  quarantined, a repair pass done) into counters, so no handler needs a hook;
* ``add_reading`` adds gauges read at scrape time from the service's state (chunks held,
  free bytes, servers alive, ...): nothing on a request's path keeps them up to date.

``MetricsPage`` serves ``/metrics`` from the reactor thread: every reading is of memory
the reactor owns, or a quick ``statvfs``.
"""

import functools
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer, ssl
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import resource, server

from sdbackup.logformat import FORMATS
from sdbackup.tlsconfig import AddressRefused
from sdbackup.web.endpoints import loopback_by_default

# No ``*_created`` series beside every counter: Prometheus does not need them here.
disable_created_metrics()

#: Request latency buckets, in seconds: from a catalog lookup to a slow replicated store.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def payload_size(msg) -> int:
    """Chunk bytes a message carries (0 for messages without a payload)."""
    payload = getattr(msg, "payload", None)
    return len(payload) if isinstance(payload, bytes | bytearray | memoryview) else 0


class _Readings:
    """A collector calling functions that yield metric families at scrape time."""

    def __init__(self):
        self.functions = []

    def collect(self):
        for f in self.functions:
            yield from f()


class Metrics:
    """One process's metrics."""

    log = Logger()

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdbackup_requests", "Requests handled, by message type and outcome.",
                                ["message", "outcome"], registry=r)
        self.latency = Histogram("sdbackup_request_duration_seconds",
                                 "Seconds from a request's arrival to its answer, by message type.",
                                 ["message"], buckets=LATENCY_BUCKETS, registry=r)
        self.received = Counter("sdbackup_received_bytes",
                                "Chunk bytes received in requests, by the sender's role (client: "
                                "backups; server: replication and repair).", ["peer"], registry=r)
        self.sent = Counter("sdbackup_sent_bytes", "Chunk bytes sent in answers, by the "
                            "asker's role.", ["peer"], registry=r)
        self.replicated = Counter("sdbackup_replicated_bytes",
                                  "Chunk bytes forwarded to a replica after storing them here.",
                                  registry=r)
        self._readings = _Readings()
        r.register(self._readings)
        self._log_counters: list = []

    # --- requests ----------------------------------------------------------------

    def instrument(self, handler, on_request=None):
        """Time every ``handle_*`` method of ``handler`` (wrapped on the instance, so every
        connection using it is measured); ``on_request(msg)`` sees each request first."""
        for name in dir(type(handler)):
            if name.startswith("handle_"):
                setattr(handler, name, self._timed(name[len("handle_"):], getattr(handler, name),
                                                   on_request))

    def _timed(self, message: str, method, on_request):
        @functools.wraps(method)
        def timed(msg, connection):
            start = time.perf_counter()
            peer = str(getattr(connection, "peer_role", None) or "unknown")
            self.received.labels(peer).inc(payload_size(msg))
            if on_request is not None:
                on_request(msg)
            d = defer.maybeDeferred(method, msg, connection)
            d.addBoth(self._answered, message, msg, start, peer)
            return d

        return timed

    def _answered(self, result, message: str, msg, start: float, peer: str):
        self.latency.labels(message).observe(time.perf_counter() - start)
        failed = isinstance(result, Failure)
        self.requests.labels(message, "error" if failed else "ok").inc()
        if not failed:
            self.sent.labels(peer).inc(payload_size(result))
            if getattr(msg, "forward_to", None) and payload_size(msg):
                self.replicated.inc(payload_size(msg))
        return result

    # --- readings at scrape time ----------------------------------------------------

    def add_reading(self, f):
        """``f()`` yields metric families (``gauge(...)``) each time /metrics is read."""
        self._readings.functions.append(f)

    # --- counters from log events -----------------------------------------------------

    def count_log_events(self, sources, formats: dict, publisher=globalLogPublisher):
        """Count the log events of ``sources`` by format: ``{log_format: (counter, field)}``
        adds the event's ``field`` (1 when None) to ``counter``."""

        def observe(event):
            counted = formats.get(event.get("log_format"))
            if counted is None or not any(event.get("log_source") is s for s in sources):
                return
            counter, field = counted
            amount = 1 if field is None else event.get(field, 0)
            if isinstance(amount, int) and amount >= 0:
                counter.inc(amount)

        publisher.addObserver(observe)
        self._log_counters.append((publisher, observe))

    def counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, registry=self.registry)

    def stop(self):
        for publisher, observe in self._log_counters:
            publisher.removeObserver(observe)
        self._log_counters.clear()

    def text(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, documentation: str, value=None, labels: dict | None = None,
          values: list[tuple[dict, float]] = ()) -> GaugeMetricFamily:
    """A gauge with one value, or one value per label set in ``values``."""
    if value is not None:
        return GaugeMetricFamily(name, documentation, value=value)
    names = sorted(labels or (values[0][0] if values else {}))
    family = GaugeMetricFamily(name, documentation, labels=names)
    for label_values, v in values:
        family.add_metric([label_values[n] for n in names], v)
    return family


class MetricsPage(resource.Resource):
    """``/metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.text()


class MetricsRoot(resource.Resource):
    """The site root of a ``--metrics`` listener: ``/metrics``, and a pointer to it."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.putChild(b"metrics", MetricsPage(metrics))

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"sdbackup metrics are at /metrics\n"


def listen_http(reactor, description: str, root: resource.Resource,
                tls_options=None) -> defer.Deferred:
    """Serve ``root`` on ``description`` (loopback when it names no interface), over TLS with
    ``tls_options`` (a ``CertificateOptions``); fires with the listening port."""
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    factory = site if tls_options is None else TLSMemoryBIOFactory(tls_options, False, site)
    return serverFromString(reactor, loopback_by_default(description)).listen(factory)


def https_options(service):
    """TLS for an HTTP listener of ``service``: its own certificate, no client certificate
    asked (browsers and Prometheus check the server against the cluster's CA). None
    without TLS."""
    identity = getattr(getattr(service, "transport", None), "tls", None)
    if identity is None:
        return None
    return ssl.CertificateOptions(privateKey=identity.own.privateKey.original,
                                  certificate=identity.own.original,
                                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def metrics_endpoint(service, description: str) -> str:
    """Where ``--metrics`` of ``service`` listens (``metrics_endpoint_for`` its transport)."""
    return metrics_endpoint_for(getattr(service, "transport", None), description)


def metrics_endpoint_for(transport, description: str) -> str:
    """Where ``--metrics`` listens: loopback when it names no interface, and the rule of the
    process's own port (``AddressRefused`` beyond loopback without TLS or ``--insecure``)."""
    description = loopback_by_default(description)
    return transport.listen_description(description) if transport is not None else description


def check_observability_options(options):
    """The ``--log-format`` and ``--metrics`` options every daemon takes, checked once its
    ``transport`` is known (a usage error for the tap to show)."""
    if options["log-format"] not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}")
    if options["metrics"] is not None:
        try:
            metrics_endpoint_for(options["transport"], options["metrics"])
        except AddressRefused as e:
            raise usage.UsageError(f"--metrics: {e}") from None


class ServerMetrics:
    """A storage server's ``--metrics`` listener and what it reports."""

    def __init__(self, service, endpoint: str):
        self.service = service
        self.endpoint = metrics_endpoint(service, endpoint)
        self.metrics = Metrics()
        self.listening: defer.Deferred | None = None
        self._port = None

    def start(self):
        """Once the service built its ``server``: measure it and listen."""
        server_ = self.service.server
        m = self.metrics
        m.instrument(server_)
        corrupt = m.counter("sdbackup_corrupt_copies_found",
                            "Copies found corrupt here (by a read or the scrub) and quarantined.")
        m.count_log_events([server_], {"chunk {chunk} is corrupt: quarantined": (corrupt, None)})
        m.add_reading(lambda: self._readings(server_))
        self.listening = listen_http(self.service.reactor, self.endpoint, MetricsRoot(m),
                                     https_options(self.service))
        self.listening.addCallback(self._listened)
        self.listening.addErrback(self.service.fail, f"cannot serve metrics on {self.endpoint}")

    def _listened(self, port):
        self._port = port
        self.service.log.info("sdbackup-server metrics on port {port}", port=port.getHost().port)
        return port

    @staticmethod
    def _readings(server_):
        store = server_.store
        yield gauge("sdbackup_chunks_held", "Chunk files held here (data, trees, lists, "
                    "snapshots).", store.count())
        yield gauge("sdbackup_free_bytes", "Bytes free on the data folder's file system.",
                    store.free_bytes())
        yield gauge("sdbackup_connections_open", "Connections open to this server.",
                    len(server_.connections))
        scrubbed = CounterMetricFamily("sdbackup_scrubbed_bytes", "Bytes re-read and re-hashed "
                                       "by scrubs (a check with --read-data, or the periodic one).")
        scrubbed.add_metric([], server_.scrubbed_bytes)
        yield scrubbed
        yield gauge("sdbackup_scrub_chunks_total", "Chunks the scrub under way checks (0 when "
                    "none runs).", server_.scrub_total)
        yield gauge("sdbackup_scrub_chunks_done", "Chunks the scrub under way has checked.",
                    server_.scrub_done)
        manager = server_.manager
        yield gauge("sdbackup_manager_connected", "1 while registered with the manager.",
                    int(manager is not None and manager.connected))

    async def stop(self):
        self.metrics.stop()
        if self._port is not None:
            await self._port.stopListening()
