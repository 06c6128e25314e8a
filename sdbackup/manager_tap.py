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
    ]

    def postOptions(self):
        if self["replicas"] < 1:
            raise usage.UsageError("--replicas must be at least 1")


def makeService(options, reactor=None):
    return ManagerService(
        listen=options["listen"], data=options["data"], replicas=options["replicas"],
        reactor=reactor,
    )
