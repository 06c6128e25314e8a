"""``twistd sdbackup-server``: options and the service they build."""

from twisted.python import usage

from sdbackup import tlsconfig
from sdbackup.logformat import with_log_format
from sdbackup.metrics import check_observability_options
from sdbackup.services.chunkstore import FolderInUse, lock_folder
from sdbackup.services.server import StorageService


class Options(usage.Options):
    synopsis = ("[--listen ENDPOINT] [--data FOLDER] [--manager ENDPOINT] "
                "[--tls-ca FILE --tls-cert FILE --tls-key FILE | --insecure]")
    longdesc = (
        "An sdbackup storage server: holds verified chunk files in its data folder, "
        "replicates them to the servers the manager names, and serves restores. Without TLS "
        "options it listens on and connects to loopback only."
    )
    optFlags = tlsconfig.OPTION_FLAGS
    optParameters = [
        ["listen", "l", "tcp:5001", "Endpoint to listen on (Twisted endpoint string)."],
        ["data", "d", None, "Data folder (default: data_<port>)."],
        ["manager", "m", "tcp:localhost:5000", "Client endpoint of the manager."],
        ["advertise", "a", None,
         "Client endpoint others use to reach this server (default: tcp:localhost:<port>)."],
        ["heartbeat", None, 5.0, "Seconds between heartbeats to the manager.", float],
        ["scrub-interval", None, 86400.0,
         "Seconds between background passes that re-hash every chunk held.", float],
        ["scrub-rate", None, 20.0, "MiB/s a scrub pass reads at most.", float],
        ["metrics", None, None,
         "Serve Prometheus metrics at /metrics on this endpoint, e.g. tcp:9101 (loopback "
         "unless it names an interface; another needs TLS or --insecure; HTTPS with TLS)."],
        ["log-format", None, "text", "Log as text or json (one twisted.logger event a line)."],
        *tlsconfig.OPTION_PARAMETERS,
    ]

    def postOptions(self):
        if self["data"] is None:
            self["data"] = f"data_{_port_of(self['listen'])}"
        try:  # said now, as a usage error; the store takes the lock itself when it opens
            lock_folder(self["data"]).close()
        except (FolderInUse, OSError) as e:
            raise usage.UsageError(str(e)) from None
        for name in ("heartbeat", "scrub-interval", "scrub-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        transport = self["transport"] = tlsconfig.transport_from_options(self, "server")
        try:
            transport.listen_description(self["listen"])
            transport.check_connect(self["manager"], "reach the manager at")
            if self["advertise"]:
                transport.check_connect(self["advertise"], "advertise")
        except tlsconfig.AddressRefused as e:
            raise usage.UsageError(str(e)) from None
        check_observability_options(self)


def _port_of(listen: str) -> str:
    """The port named in a ``tcp:PORT`` style endpoint, for the default data folder."""
    for part in listen.split(":")[1:]:
        if part.isdigit():
            return part
        if part.startswith("port="):
            return part[len("port="):]
    raise usage.UsageError(f"give --data: no port in {listen!r} to name data_<port>")


def makeService(options, reactor=None):
    server = StorageService(
        listen=options["listen"], data=options["data"], manager=options["manager"],
        advertise=options["advertise"], heartbeat=options["heartbeat"],
        scrub_interval=options["scrub-interval"], scrub_rate=options["scrub-rate"] * 1024 * 1024,
        reactor=reactor, metrics=options["metrics"], transport=options["transport"],
    )
    return with_log_format(server, options["log-format"])
