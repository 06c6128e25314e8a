"""``twistd sdbackup-manager``: options and the service they build."""

from twisted.python import usage

from sdbackup.services.manager import ManagerService


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--data FOLDER] [--replicas N]"
    longdesc = (
        "The sdbackup manager: places chunks on storage servers, keeps the catalog of "
        "snapshots and copies (SQLite in the data folder) and tracks live servers."
    )
    optParameters = [
        ["listen", "l", "tcp:5000", "Endpoint to listen on (Twisted endpoint string)."],
        ["data", "d", "manager_data", "Folder for the catalog."],
        ["replicas", "r", 2, "Copies of every chunk: a primary and N-1 replicas.", int],
        ["dead-after", None, 15.0,
         "Seconds without a heartbeat after which a server is declared dead.", float],
        ["repair-interval", None, 5.0,
         "Seconds between looks for chunks with fewer live copies than --replicas.", float],
        ["repair-rate", None, 50.0, "MiB/s that re-replication may copy at most.", float],
    ]

    def postOptions(self):
        if self["replicas"] < 1:
            raise usage.UsageError("--replicas must be at least 1")
        for name in ("dead-after", "repair-interval", "repair-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")


def makeService(options, reactor=None):
    return ManagerService(
        listen=options["listen"], data=options["data"], replicas=options["replicas"],
        dead_after=options["dead-after"], repair_interval=options["repair-interval"],
        repair_rate=options["repair-rate"] * 1024 * 1024, reactor=reactor,
    )
