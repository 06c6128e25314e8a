"""When a starting manager may serve clients: its safe mode, as a pure policy.

Like HDFS's name node, a manager that has just started knows nothing it can
trust about where chunks are until the storage servers have reported what
they hold; before that, it would answer "no copy" for chunks that are safe on
a server still reconnecting, and its list of snapshots would be short. So it
answers clients "starting" until one of these holds:

* every server its catalog knows has registered and sent its whole inventory;
* the catalog knew no server (a fresh cluster, or a lost catalog) and the
  first server to report holds nothing: a fresh cluster is ready at once;
* the catalog knew no server, some have reported, every registered one has,
  and ``settle`` seconds passed without a new registration;
* ``timeout`` seconds passed since the start and at least one server reported.

``SafeMode`` only keeps counts and compares times it is given: the manager
tells it what happens and asks it, and tests drive it with any clock.
"""

import attrs


@attrs.define
class SafeMode:
    #: The servers the catalog knew at the start.
    expected: frozenset
    #: When the manager started (seconds, on the manager's clock).
    started: float
    timeout: float = 30.0
    settle: float = 3.0
    #: Servers connected and registered, not yet reported: address -> when they registered.
    registering: dict = attrs.Factory(dict)
    #: Servers that sent their whole inventory: address -> chunks they hold.
    reported: dict = attrs.Factory(dict)
    last_registration: float | None = None
    #: Whether the first server to report held nothing (None until one reported).
    first_report_empty: bool | None = None

    def server_registered(self, address: str, now: float):
        self.registering[address] = now
        self.reported.pop(address, None)
        self.last_registration = now

    def server_reported(self, address: str, chunks: int):
        """``address`` sent its final inventory page: it holds ``chunks`` chunks."""
        self.registering.pop(address, None)
        if self.first_report_empty is None:
            self.first_report_empty = chunks == 0
        self.reported[address] = chunks

    def server_lost(self, address: str):
        """A registered server went away before it reported: nobody waits for it."""
        self.registering.pop(address, None)

    def ready_reason(self, now: float) -> str | None:
        """Why the manager may leave safe mode now; None while it must wait."""
        if self.expected and self.expected <= set(self.reported):
            return f"all {len(self.expected)} known servers reported"
        if not self.expected and self.first_report_empty:
            return "a fresh cluster: the first server holds nothing"
        if (not self.expected and self.reported and not self.registering
                and now - self.last_registration >= self.settle):
            return f"no new server for {self.settle:g} s"
        if self.reported and now - self.started >= self.timeout:
            return f"safe mode timeout of {self.timeout:g} s"
        return None

    def next_check(self, now: float) -> float | None:
        """When the passing of time alone may make the manager ready (None: only an event can)."""
        times = [self.started + self.timeout]
        if not self.expected and self.last_registration is not None:
            times.append(self.last_registration + self.settle)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def waiting_for(self) -> str:
        """What the manager waits for, for a user."""
        if self.expected:
            count = len(self.expected & set(self.reported))
            return f"{count} of {len(self.expected)} known servers have reported"
        if self.reported:
            return f"{len(self.reported)} servers have reported; waiting for more"
        return "waiting for storage servers to report"
