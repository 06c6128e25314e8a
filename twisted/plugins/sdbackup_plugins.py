"""The twistd plugins: ``twistd sdbackup-manager`` and ``twistd sdbackup-server``.

No ``__init__.py`` in this folder: it is a portion of Twisted's plugin package.
"""

from twisted.application.service import ServiceMaker

sdbackup_manager = ServiceMaker(
    "sdbackup manager", "sdbackup.manager_tap",
    "sdbackup manager: places chunks, keeps the catalog", "sdbackup-manager",
)
sdbackup_server = ServiceMaker(
    "sdbackup server", "sdbackup.server_tap",
    "sdbackup storage server: stores and replicates verified chunks", "sdbackup-server",
)
