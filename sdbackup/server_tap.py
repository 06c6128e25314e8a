"""``twistd sdbackup-server``: options and the service they build."""

from twisted.python import usage

from sdbackup.services.server import StorageService


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--data FOLDER] [--manager ENDPOINT]"
    longdesc = (
        "An sdbackup storage server: holds verified chunk files in its data folder, "
        "replicates them to the servers the manager names, and serves restores."
    )
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
    ]

    def postOptions(self):
        if self["data"] is None:
            self["data"] = f"data_{_port_of(self['listen'])}"
        for name in ("heartbeat", "scrub-interval", "scrub-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")


def _port_of(listen: str) -> str:
    """The port named in a ``tcp:PORT`` style endpoint, for the default data folder."""
    for part in listen.split(":")[1:]:
        if part.isdigit():
            return part
        if part.startswith("port="):
            return part[len("port="):]
    raise usage.UsageError(f"give --data: no port in {listen!r} to name data_<port>")


def makeService(options, reactor=None):
    return StorageService(
        listen=options["listen"], data=options["data"], manager=options["manager"],
        advertise=options["advertise"], heartbeat=options["heartbeat"],
        scrub_interval=options["scrub-interval"], scrub_rate=options["scrub-rate"] * 1024 * 1024,
        reactor=reactor,
    )
