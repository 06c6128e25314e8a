"""``twistd sdbackup-manager``: options and the service they build."""

from twisted.python import usage

from sdbackup.services.manager import ManagerService


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--data FOLDER] [--replicas N]"
    longdesc = (
        "The sdbackup manager: places chunks on storage servers, keeps an index of the "
        "snapshots and copies they hold (SQLite in the data folder, rebuilt from the servers "
        "when lost) and tracks live servers. After a start it answers clients 'starting' "
        "until the servers have reported what they hold (safe mode)."
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
        ["safe-mode-timeout", None, 30.0,
         "Seconds after a start at which the manager serves clients once any server has "
         "reported, even if servers it knew are still missing.", float],
        ["safe-mode-settle", None, 3.0,
         "With a new or lost catalog: seconds without a new server registering after which "
         "the servers that reported are taken as the cluster.", float],
    ]

    def postOptions(self):
        if self["replicas"] < 1:
            raise usage.UsageError("--replicas must be at least 1")
        for name in ("dead-after", "repair-interval", "repair-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        for name in ("safe-mode-timeout", "safe-mode-settle"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")


def makeService(options, reactor=None):
    return ManagerService(
        listen=options["listen"], data=options["data"], replicas=options["replicas"],
        dead_after=options["dead-after"], repair_interval=options["repair-interval"],
        repair_rate=options["repair-rate"] * 1024 * 1024,
        safe_mode_timeout=options["safe-mode-timeout"],
        safe_mode_settle=options["safe-mode-settle"], reactor=reactor,
    )
