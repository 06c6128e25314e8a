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
        ["reserve", None, "1GiB",
         "Free space to keep on the data folder's file system (such as 500MiB, 2G, 0): below "
         "it the server reports itself full and refuses stores, and the manager places "
         "chunks on the others."],
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
        try:
            self["reserve"] = parse_size(self["reserve"])
        except ValueError as e:
            raise usage.UsageError(f"--reserve: {e}") from None
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


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``500MiB``, ``2G`` (binary), ``1.5GB`` (decimal) or a plain number."""
    number = text.strip().rstrip("BbIiKkMmGgTt ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (such as 500MiB, 2G or 0)") from None
    if unit not in _UNITS or not 0 <= value < 2**63 / _UNITS[unit]:
        raise ValueError(f"{text!r} is not a size (such as 500MiB, 2G or 0)")
    return int(value * _UNITS[unit])


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
        reserve=options["reserve"],
    )
    return with_log_format(server, options["log-format"])
