"""``--log-format json``: twisted.logger's JSON lines on standard output, for log shippers.

twistd chooses its log observer after ``makeService``, from ``--logger`` or from an
``ILogObserver`` component of the application it builds around the service. The
tap returns its service inside ``LogFormat``, which sets that component when twistd
adds it to the application: the process then writes one JSON event per line
(``twisted.logger.eventsFromJSONLogFile`` reads them back) instead of text.
"""

import sys

from twisted.application import service
from twisted.logger import ILogObserver, jsonFileLogObserver

FORMATS = ("text", "json")


def json_stdout_observer():
    """The JSON observer; also usable as ``twistd --logger sdbackup.logformat.json_stdout_observer``."""
    return jsonFileLogObserver(sys.stdout)


class LogFormat(service.MultiService):
    """Runs ``inner``; tells twistd's application to log through ``observer``."""

    def __init__(self, inner: service.IService, observer):
        super().__init__()
        self.observer = observer
        inner.setServiceParent(self)

    def setServiceParent(self, parent):
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:  # twistd's Application
            set_component(ILogObserver, self.observer)
        return super().setServiceParent(parent)


def with_log_format(inner: service.IService, log_format: str) -> service.IService:
    """``inner`` as it is for text logs, wrapped in ``LogFormat`` for JSON."""
    if log_format == "json":
        return LogFormat(inner, json_stdout_observer())
    return inner
