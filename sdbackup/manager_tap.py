"""``twistd sdbackup-manager``: options and the service they build."""

from twisted.python import usage

from sdbackup import tlsconfig
from sdbackup.limits import DEFAULT_REPLICAS, MAX_REPLICAS
from sdbackup.logformat import with_log_format
from sdbackup.metrics import check_observability_options
from sdbackup.services.manager import READ_DATA_INTERVAL, ManagerService
from sdbackup.services.prune import DEFAULT_GRACE, DEFAULT_RATE
from sdbackup.tickets import DEFAULT_KEY_INTERVAL, DEFAULT_LIFETIME
from sdbackup.web.endpoints import ListenRefused, dashboard_endpoint


class Options(usage.Options):
    synopsis = ("[--listen ENDPOINT] [--data FOLDER] [--replicas N] "
                "[--tls-ca FILE --tls-cert FILE --tls-key FILE | --insecure]")
    longdesc = (
        "The sdbackup manager: places chunks on storage servers, keeps an index of the "
        "snapshots and copies they hold (SQLite in the data folder, rebuilt from the servers "
        "when lost) and tracks live servers. After a start it answers clients 'starting' "
        "until the servers have reported what they hold (safe mode). Without TLS options it "
        "listens on loopback only."
    )
    optFlags = tlsconfig.OPTION_FLAGS
    optParameters = [
        ["listen", "l", "tcp:5000", "Endpoint to listen on (Twisted endpoint string)."],
        ["data", "d", "manager_data", "Folder for the catalog."],
        ["replicas", "r", DEFAULT_REPLICAS, "Copies of every chunk: a primary and N-1 replicas.", int],
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
        ["metrics", None, None,
         "Serve Prometheus metrics at /metrics on this endpoint, e.g. tcp:9100 (loopback "
         "unless it names an interface; another needs TLS or --insecure; HTTPS with TLS)."],
        ["web", None, None,
         "Serve the dashboard on this endpoint, e.g. tcp:8080 (loopback only)."],
        ["web-password-file", None, None,
         "File whose first line is the password the dashboard asks for (HTTP basic auth)."],
        ["history-interval", None, 30.0,
         "Seconds between the samples of chunk health the dashboard and metrics show.", float],
        ["ticket-lifetime", None, DEFAULT_LIFETIME,
         "Seconds a placement's tickets let servers store and forward its chunks.", float],
        ["ticket-key-interval", None, DEFAULT_KEY_INTERVAL,
         "Seconds a key signs placement tickets before a new one does (at least "
         "--ticket-lifetime).", float],
        ["prune-grace", None, DEFAULT_GRACE,
         "Seconds a prune spares chunks a backup stored or counted on (and snapshots "
         "forgotten) before its start: longer than any backup takes (0 is safe only while no "
         "backup runs).", float],
        ["prune-rate", None, DEFAULT_RATE,
         "Chunk copies a prune deletes per second at most, over all servers.", float],
        ["read-data-interval", None, READ_DATA_INTERVAL,
         "Seconds after a check --read-data ends before another may start (each re-reads "
         "every disk whole; 0: no wait, still one at a time).", float],
        ["log-format", None, "text", "Log as text or json (one twisted.logger event a line)."],
        *tlsconfig.OPTION_PARAMETERS,
    ]

    def postOptions(self):
        if not 1 <= self["replicas"] <= MAX_REPLICAS:
            raise usage.UsageError(f"--replicas must be between 1 and {MAX_REPLICAS}")
        for name in ("dead-after", "repair-interval", "repair-rate", "ticket-lifetime"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["prune-rate"] <= 0:
            raise usage.UsageError("--prune-rate must be positive")
        for name in ("safe-mode-timeout", "safe-mode-settle", "prune-grace", "read-data-interval"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")
        if self["ticket-key-interval"] < self["ticket-lifetime"]:
            raise usage.UsageError("--ticket-key-interval must be at least --ticket-lifetime")
        self["transport"] = tlsconfig.transport_from_options(self, "manager")
        try:
            self["transport"].listen_description(self["listen"])
        except tlsconfig.AddressRefused as e:
            raise usage.UsageError(str(e)) from None
        if self["history-interval"] <= 0:
            raise usage.UsageError("--history-interval must be positive")
        check_observability_options(self)
        if self["web-password-file"] is not None and self["web"] is None:
            raise usage.UsageError("--web-password-file needs --web")
        if self["web"] is not None:
            try:
                dashboard_endpoint(self["web"], self["web-password-file"],
                                   self["transport"].tls is not None)
            except ListenRefused as e:
                raise usage.UsageError(str(e)) from None


def makeService(options, reactor=None):
    try:
        manager = ManagerService(
            listen=options["listen"], data=options["data"], replicas=options["replicas"],
            dead_after=options["dead-after"], repair_interval=options["repair-interval"],
            repair_rate=options["repair-rate"] * 1024 * 1024,
            safe_mode_timeout=options["safe-mode-timeout"],
            safe_mode_settle=options["safe-mode-settle"], reactor=reactor,
            metrics=options["metrics"], web=options["web"],
            web_password_file=options["web-password-file"],
            history_interval=options["history-interval"], transport=options["transport"],
            ticket_lifetime=options["ticket-lifetime"],
            ticket_key_interval=options["ticket-key-interval"],
            prune_grace=options["prune-grace"], prune_rate=options["prune-rate"],
            read_data_interval=options["read-data-interval"],
        )
    except (OSError, ValueError) as e:  # an unreadable or empty --web-password-file
        raise usage.UsageError(str(e)) from None
    return with_log_format(manager, options["log-format"])
