"""End-to-end fixtures: a real sdbackup cluster as separate ``twistd -n`` processes.

* ``cluster`` (one per test module) starts a manager and three storage servers
  with the virtualenv's ``twistd``, each in its own folder under a temporary
  directory, listening on ports the kernel picks (``tcp:0``) on 127.0.0.1. The
  manager's port is read from its readiness line; a server is ready once it logs
  that it registered with the manager. Every wait has a deadline. Teardown sends
  SIGTERM to every process started, waits, then sends SIGKILL, so nothing is left
  behind even when a test fails.
* ``Cluster.sdbackup(...)`` runs the real ``sdbackup`` command against the
  cluster (``SDBACKUP_MANAGER`` set, output captured, with a timeout), and
  ``Cluster.snapshot_id`` reads the id from its ``snapshot <id> saved`` line.
  The ``run_sdbackup`` fixture runs the command with any environment, for tests
  that need no cluster. (Test modules reach these helpers through fixtures: the
  test folders are not packages, so a test cannot import this conftest.)
* ``no_errors_in_cluster_logs`` (autouse) fails a test during which any cluster
  process logged an error, a critical event or a traceback — what the in-process
  ``logged_errors`` fixture does for tests that run the services in pytest.
* ``start_cluster(...)`` (one or more clusters per test, for the tests that break
  them) starts a cluster with extra options for the manager and the servers, by
  default the short timings of ``FAST_MANAGER_OPTIONS`` and ``FAST_SERVER_OPTIONS``;
  at teardown it stops every process and fails the test if any of them logged an
  error or a traceback. ``Cluster.kill`` SIGKILLs one process,
  ``Cluster.restart_server`` starts a server again on its port with its data
  folder, ``Cluster.kill_manager`` / ``Cluster.start_manager_again`` do the same
  for the manager, and ``Cluster.start_sdbackup`` runs the command in the
  background (a ``Running`` to wait for). ``Cluster.restart_manager(wipe_catalog=True)``
  starts the manager again with its ``manager_data`` deleted: it rebuilds its index
  from what the servers report. ``fast_manager_options`` adds a short safe mode
  (``FAST_SAFE_MODE_OPTIONS``) to the fast timings, for tests that restart the manager.
* ``tls_cluster`` (one per test module) is ``cluster`` with mutual TLS on every link: a
  CA and certificates (``sdbackup.localcluster.CERTIFICATES``) in its ``tls`` folder, the
  manager and servers started with them, ``sdbackup`` run with the client's.
  ``start_cluster(tls=True)`` does the same for one test.
* Every cluster's default repository is initialised as a user must before a first
  backup: encrypted, ``sdbackup`` run with ``SDBACKUP_PASSWORD`` set (``PASSWORD``).
  ``start_cluster(repository="none")`` makes it plaintext, ``repository=None`` leaves
  it uninitialised (for tests of ``init`` itself).
"""

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest

from sdbackup import sealing
from sdbackup.localcluster import make_certificates, tls_environment, tls_options

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
SDBACKUP = BIN / "sdbackup"

#: Seconds a process may take to log that it is ready.
START_TIMEOUT = 30.0
#: Seconds one ``sdbackup`` command may run.
COMMAND_TIMEOUT = 60.0
#: The password of the default repository a ``Cluster`` initialises (in ``client_env``).
PASSWORD = "e2e repository password"
#: Seconds a process gets to exit after SIGTERM, then again after SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds between a storage server's heartbeats (status shows fresh counts soon).
HEARTBEAT = 0.5
SERVERS = 3
#: Short timings for the failure tests: servers seen dead in 1.5 s, repaired within a second
#: or two, every chunk re-hashed every second.
FAST_SERVER_OPTIONS = ("--heartbeat", 0.3, "--scrub-interval", 1, "--scrub-rate", 500)
FAST_MANAGER_OPTIONS = ("--dead-after", 1.5, "--repair-interval", 0.5, "--repair-rate", 500,
                        "--read-data-interval", 0)
#: A restarted manager serves clients once its servers reported, or after 10 s; with a lost
#: catalog, once no new server registered for half a second.
FAST_SAFE_MODE_OPTIONS = ("--safe-mode-timeout", 10, "--safe-mode-settle", 0.5)
LOCALHOST = "interface=127.0.0.1"

MANAGER_LISTENING = re.compile(r"sdbackup-manager listening on port (\d+)")
SERVER_LISTENING = re.compile(r"sdbackup-server listening on port (\d+) as ([^\s,]+)")
SERVER_REGISTERED = re.compile(r"sdbackup-server registered with the manager")
SNAPSHOT_SAVED = re.compile(r"^snapshot (\S+) saved", re.MULTILINE)
#: Log lines that mean something went wrong in a cluster process.
ERROR_LINE = re.compile(r"#(error|critical)\]|Traceback \(most recent call last\)|Unhandled [Ee]rror")


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the child if pytest dies without running teardown (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def base_env() -> dict:
    env = dict(os.environ)
    env.pop("SDBACKUP_MANAGER", None)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the pipe as they are written
    return env


class Process:
    """A ``twistd -n`` child whose output is read line by line in a thread."""

    def __init__(self, name: str, args: list, cwd: Path, log_path: Path):
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self.lines: list[str] = []
        self.finished = False
        self._changed = threading.Condition()
        self._log = open(log_path, "a", encoding="utf-8")
        self.popen = subprocess.Popen(
            self.args, cwd=cwd, env=base_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace")
            with self._changed:
                self.lines.append(line)
                self._log.write(line)
                self._log.flush()
                self._changed.notify_all()
        with self._changed:
            self.finished = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float = START_TIMEOUT, count: int = 1) -> re.Match:
        """The ``count``-th match of ``pattern`` in the output; fails at the deadline or on exit."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for m in map(pattern.search, self.lines) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                if self.finished:
                    pytest.fail(f"{self.name} exited (status {self.popen.wait(STOP_TIMEOUT)}) "
                                f"before logging {pattern.pattern!r}:\n{self.output()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"{self.name} did not log {pattern.pattern!r} #{count} "
                                f"within {timeout} s:\n{self.output()}")
                self._changed.wait(remaining)

    def output(self, start: int = 0) -> str:
        with self._changed:
            return "".join(self.lines[start:])

    def count(self, pattern: re.Pattern, end: int) -> int:
        """Lines before line ``end`` that match ``pattern``."""
        with self._changed:
            return sum(1 for line in self.lines[:end] if pattern.search(line))

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def errors_since(self, mark: int) -> list[str]:
        with self._changed:
            return [line for line in self.lines[mark:] if ERROR_LINE.search(line)]

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(STOP_TIMEOUT)
            return self.popen.returncode
        finally:
            self._reader.join(STOP_TIMEOUT)
            self.popen.stdout.close()
            self._log.close()


@attrs.define
class Server:
    """One storage server process and what it logged about itself."""

    name: str
    process: Process
    data: Path
    port: int = 0
    address: str = ""

    @property
    def chunk_dir(self) -> Path:
        return self.data / "chunks"

    def chunk_files(self) -> set[str]:
        """Names of the chunk files under ``chunks/`` and ``snapshots/`` (one file per copy
        of a data chunk, tree, chunk list or snapshot object)."""
        return {name for folder in (self.chunk_dir, self.data / "snapshots")
                for _, _, names in os.walk(folder) for name in names}


@attrs.define
class Result:
    args: list
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ sdbackup {' '.join(self.args)}\nexit status {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def snapshot_id(stdout: str) -> str:
    """The id in the ``snapshot <id> saved: ...`` line of ``sdbackup backup``."""
    match = SNAPSHOT_SAVED.search(stdout)
    assert match is not None, f"no 'snapshot <id> saved' line in:\n{stdout}"
    return match.group(1)


@attrs.define
class Cluster:
    """A manager and storage servers, each a ``twistd -n`` process."""

    root: Path
    manager: Process | None = None
    manager_port: int = 0
    servers: list[Server] = attrs.Factory(list)
    stopped: list[Process] = attrs.Factory(list)
    #: Extra ``twistd sdbackup-manager`` / ``sdbackup-server`` options (a server's own
    #: ``--heartbeat`` replaces the default ``HEARTBEAT``).
    manager_options: list = attrs.Factory(list)
    server_options: list = attrs.Factory(list)
    #: Commands started with ``start_sdbackup``; ``stop`` kills any still running.
    clients: list = attrs.Factory(list)
    #: The folder of the CA and certificates of a TLS cluster (None: plaintext on loopback).
    tls: Path | None = None
    #: How ``start`` initialises the default repository: encrypted (``sdbackup init``, the
    #: clients given ``PASSWORD``), ``"none"`` (plaintext), or None: not at all.
    repository: str | None = sealing.ENCRYPTED

    @classmethod
    def with_tls(cls, root: Path, manager_options=(), server_options=(), **options) -> "Cluster":
        """A cluster whose links are all mutual TLS, with a CA and certificates in root/tls."""
        folder = root / "tls"
        make_certificates(str(folder))
        return cls(root, manager_options=[*manager_options, *tls_options(str(folder), "manager")],
                   server_options=[*server_options, *tls_options(str(folder), "server")], tls=folder,
                   **options)

    @property
    def manager_data(self) -> Path:
        return self.root / "manager_data"

    @property
    def manager_endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.manager_port}"

    def processes(self) -> list[Process]:
        return [p for p in [self.manager, *(s.process for s in self.servers)] if p is not None]

    # --- starting and stopping ---------------------------------------------------

    def start(self, servers: int = SERVERS):
        self.start_manager("tcp:0:interface=127.0.0.1")
        for index in range(servers):  # start them all, then wait: they boot in parallel
            data = self.root / f"data_{index}"
            process = self._start_server(f"server{index}", data, "tcp:0:interface=127.0.0.1")
            self.servers.append(Server(f"server{index}", process, data))
        for server in self.servers:
            listening = server.process.wait_for(SERVER_LISTENING)
            server.port, server.address = int(listening.group(1)), listening.group(2)
            server.process.wait_for(SERVER_REGISTERED)
        if self.repository == sealing.NONE:
            self.sdbackup("init", "--encryption", "none", cwd=self.root)
        elif self.repository is not None:
            self.sdbackup("init", cwd=self.root)

    def start_manager(self, listen: str):
        self.manager = self._twistd("manager", [
            "sdbackup-manager", "--listen", listen, "--data", self.manager_data,
            *self.manager_options,
        ])
        self.manager_port = int(self.manager.wait_for(MANAGER_LISTENING).group(1))

    def _start_server(self, name: str, data: Path, listen: str) -> Process:
        options = [str(o) for o in self.server_options]
        heartbeat = [] if "--heartbeat" in options else ["--heartbeat", HEARTBEAT]
        return self._twistd(name, [
            "sdbackup-server", "--listen", listen, "--data", data,
            "--manager", self.manager_endpoint, *heartbeat, *options,
        ])

    def _twistd(self, name: str, args: list) -> Process:
        return Process(name, [TWISTD, "-n", "--pidfile=", *args], cwd=self.root,
                       log_path=self.root / f"{name}.log")

    def restart_manager(self, wipe_catalog: bool = False) -> dict:
        """SIGTERM the manager and start it again on the same port and data folder (deleted
        first with ``wipe_catalog``: the manager then knows only what the servers report).

        Returns marks for ``wait_registered_since``: the servers reconnect on their own.
        """
        marks = {s.name: s.process.mark() for s in self.servers}
        old = self.manager
        status = old.stop()
        self.stopped.append(old)
        # twistd shuts down cleanly on SIGTERM, then exits by that signal (or with 0).
        assert status in (0, -signal.SIGTERM) and "Server Shut Down" in old.output(), (
            f"the manager did not shut down cleanly on SIGTERM (status {status}):\n{old.output()}")
        if wipe_catalog:
            shutil.rmtree(self.manager_data)
        self.start_manager(f"tcp:{self.manager_port}:interface=127.0.0.1")
        return marks

    # --- failures ------------------------------------------------------------------

    def server_marks(self) -> dict:
        """Marks for ``wait_registered_since``: where each server's output is now."""
        return {s.name: s.process.mark() for s in self.servers}

    @staticmethod
    def kill(process: Process) -> int:
        """SIGKILL ``process`` (no clean shutdown: a crash) and wait until it is gone."""
        process.popen.kill()
        return process.popen.wait(STOP_TIMEOUT)

    def kill_manager(self) -> dict:
        """SIGKILL the manager; returns marks for ``wait_registered_since``."""
        marks = self.server_marks()
        self.kill(self.manager)
        return marks

    def start_manager_again(self):
        """Start the (dead) manager again with its data folder, on the port it listened on."""
        old = self.manager
        assert not old.running(), "the manager is still running"
        port = int(old.wait_for(MANAGER_LISTENING, timeout=0).group(1))
        old.stop()  # closes its log; the new process appends to the same file
        self.stopped.append(old)
        self.start_manager(f"tcp:{port}:{LOCALHOST}")

    def restart_server(self, server: Server, timeout: float = START_TIMEOUT):
        """Start a dead server again with the same data folder, on the port it listened on.

        The port is read from the old process's ``listening on port N`` line; returns once
        the new process has registered with the manager (its chunk inventory sent).
        """
        old = server.process
        assert not old.running(), f"{server.name} is still running"
        port = int(old.wait_for(SERVER_LISTENING, timeout=0).group(1))
        old.stop()
        self.stopped.append(old)
        server.process = self._start_server(server.name, server.data, f"tcp:{port}:{LOCALHOST}")
        listening = server.process.wait_for(SERVER_LISTENING, timeout)
        assert int(listening.group(1)) == port, listening.group(0)
        server.port, server.address = port, listening.group(2)
        server.process.wait_for(SERVER_REGISTERED, timeout)

    def start_sdbackup(self, *args, cwd: Path) -> "Running":
        """Start ``sdbackup ARGS`` in the background (output to files under the cluster root)."""
        args = [str(a) for a in args]
        name = f"client{len(self.clients)}"
        out, err = self.root / f"{name}.stdout", self.root / f"{name}.stderr"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(self.command(*args), cwd=cwd, env=self.client_env(),
                                     stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        running = Running(args, popen, out, err)
        self.clients.append(running)
        return running

    def wait_registered_since(self, marks: dict, timeout: float = START_TIMEOUT, servers=None):
        """Wait until each server (of ``servers``, by default all) logged a registration after
        its line ``marks[name]``."""
        for server in self.servers if servers is None else servers:
            before = server.process.count(SERVER_REGISTERED, end=marks[server.name])
            server.process.wait_for(SERVER_REGISTERED, timeout, count=before + 1)

    def stop(self):
        problems = []
        for client in self.clients:
            if client.popen.poll() is None:
                client.popen.kill()
                client.popen.wait(STOP_TIMEOUT)
        for process in self.processes():
            try:
                process.stop()
            except Exception as e:  # keep stopping the others
                problems.append(f"{process.name}: {e!r}")
        leftover = [p.name for p in self.processes() + self.stopped if p.running()]
        assert not problems and not leftover, f"could not stop {problems} {leftover}"

    # --- the client --------------------------------------------------------------

    def client_env(self, manager: str | None = None) -> dict:
        env = base_env()
        env["SDBACKUP_MANAGER"] = manager or self.manager_endpoint
        if self.tls is not None:
            env.update(tls_environment(str(self.tls)))
        if self.repository == sealing.ENCRYPTED:
            env["SDBACKUP_PASSWORD"] = PASSWORD
        return env

    def sdbackup(self, *args, cwd: Path, check: bool = True, manager: str | None = None,
                 timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run ``sdbackup ARGS`` in ``cwd``; with ``check``, fail the test on a non-zero exit."""
        return run_sdbackup(*args, cwd=cwd, env=self.client_env(manager), check=check,
                            timeout=timeout)

    snapshot_id = staticmethod(snapshot_id)

    @staticmethod
    def command(*args) -> list[str]:
        """The argument vector that runs ``sdbackup ARGS``."""
        return [str(SDBACKUP), *(str(a) for a in args)]

    def backup(self, *paths, cwd: Path) -> str:
        """``sdbackup backup PATHS``; the new snapshot's id."""
        result = self.sdbackup("backup", *paths, cwd=cwd)
        assert result.stderr.strip() == "", result.describe()
        return snapshot_id(result.stdout)

    def logs(self) -> str:
        return "\n".join(f"=== {p.name}\n{p.output()}" for p in self.processes())

    def data_bytes(self) -> int:
        """Bytes of every file in the servers' data folders (chunks, objects and anything else).
        A file gone between the listing and its ``lstat`` (a running server's temporary file,
        renamed into place) counts nothing: its new name is counted by the next call."""
        total = 0
        for server in self.servers:
            for folder, _, names in os.walk(server.data):
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.lstat(Path(folder) / name).st_size
        return total


@attrs.define
class Running:
    """An ``sdbackup`` command running in the background."""

    args: list
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> Result:
        """Its ``Result`` once it exits; kills it and fails the test after ``timeout`` s."""
        try:
            returncode = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)
            pytest.fail(f"sdbackup {' '.join(self.args)} did not finish within {timeout} s:\n"
                        f"{self.stdout_path.read_text()}{self.stderr_path.read_text()}")
        return Result(self.args, returncode, self.stdout_path.read_text(encoding="utf-8"),
                      self.stderr_path.read_text(encoding="utf-8"))


def run_sdbackup(*args, cwd: Path, env: dict, check: bool = True,
                 timeout: float = COMMAND_TIMEOUT) -> Result:
    args = [str(a) for a in args]
    try:
        done = subprocess.run(Cluster.command(*args), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, encoding="utf-8", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"sdbackup {' '.join(args)} did not finish within {timeout} s:\n"
                    f"{e.stdout!r}\n{e.stderr!r}")
    result = Result(args, done.returncode, done.stdout, done.stderr)
    if check and result.returncode != 0:
        pytest.fail(result.describe())
    return result


@pytest.fixture(name="run_sdbackup")
def run_sdbackup_fixture():
    """``run_sdbackup(*args, cwd=..., env=..., check=True, timeout=...)`` -> ``Result``."""
    return run_sdbackup


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A manager and three storage servers as processes, shared by a test module."""
    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A manager and three storage servers with mutual TLS on every link, shared by a module."""
    started = Cluster.with_tls(tmp_path_factory.mktemp("tls_cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture(autouse=True)
def no_errors_in_cluster_logs(request):
    """Fail a test during which a cluster process logged an error or a traceback."""
    name = next((n for n in ("cluster", "tls_cluster") if n in request.fixturenames), None)
    if name is None:
        yield
        return
    running: Cluster = request.getfixturevalue(name)
    marks = {id(p): p.mark() for p in running.processes() + running.stopped}
    yield
    errors = []
    for process in running.processes() + running.stopped:
        for line in process.errors_since(marks.get(id(process), 0)):
            errors.append(f"{process.name}: {line}")
    if errors:
        pytest.fail("cluster processes logged errors during the test:\n" + "".join(errors)
                    + "\n" + running.logs())


@pytest.fixture
def fast_manager_options() -> list:
    """``FAST_MANAGER_OPTIONS`` and a short safe mode, for ``start_cluster(manager_options=...)``."""
    return [*FAST_MANAGER_OPTIONS, *FAST_SAFE_MODE_OPTIONS]


@pytest.fixture
def start_cluster(tmp_path_factory):
    """``start_cluster(servers=3, manager_options=..., server_options=...)`` -> a started ``Cluster``.

    For tests that kill, restart and damage a cluster: each test gets its own, with the
    short timings of ``FAST_MANAGER_OPTIONS`` and ``FAST_SERVER_OPTIONS`` unless told
    otherwise. Teardown stops every process (any still running, killed or restarted) and
    fails the test if any of them logged an error, a critical event or a traceback.
    """
    clusters: list[Cluster] = []

    def start(servers: int = SERVERS, manager_options=FAST_MANAGER_OPTIONS,
              server_options=FAST_SERVER_OPTIONS, tls: bool = False,
              repository: str | None = sealing.ENCRYPTED) -> Cluster:
        root = tmp_path_factory.mktemp("cluster")
        if tls:
            started = Cluster.with_tls(root, manager_options, server_options, repository=repository)
        else:
            started = Cluster(root, manager_options=list(manager_options),
                              server_options=list(server_options), repository=repository)
        clusters.append(started)
        started.start(servers)
        return started

    yield start
    problems, errors = [], []
    for started in clusters:
        try:
            started.stop()
        except Exception as e:  # stop the others all the same
            problems.append(repr(e))
        for process in started.stopped + started.processes():
            errors.extend(f"{process.name}: {line}" for line in process.errors_since(0))
    assert not problems, f"could not stop the cluster: {problems}"
    if errors:
        logs = "\n".join(f"=== {p.name}\n{p.output()}" for c in clusters
                         for p in c.stopped + c.processes())
        pytest.fail("cluster processes logged errors:\n" + "".join(errors) + "\n" + logs)
