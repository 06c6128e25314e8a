"""A real cluster on this machine: a manager and storage servers as ``twistd`` processes.

Used by the demo and the benchmark. Each process runs
``twistd -n --pidfile=`` (so several can share a folder), logs to its own file,
and counts as started once it logs its readiness line. With port 0 the kernel
picks the ports and they are read back from those lines. A process started
again (``restart_manager``) appends to the same log; only what it wrote counts.
With ``tls`` (a folder), every link is mutual TLS: the folder's CA and the
manager's, servers' and clients' certificates are made there unless they exist.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import attrs

from sdbackup import pki
from sdbackup.tlsconfig import Transport, load_identity

MANAGER_READY = re.compile(r"sdbackup-manager listening on port (\d+)")
#: Logged once a started manager leaves safe mode and serves clients.
MANAGER_SERVING = re.compile(r"sdbackup-manager ready\b[^\n]*")
SERVER_LISTENING = re.compile(r"sdbackup-server listening on port (\d+)")
SERVER_READY = "sdbackup-server registered with the manager"
#: The certificates of a TLS cluster: name -> role (the name is also the files').
CERTIFICATES = {"manager": "manager", "server": "server", "client": "client", "admin": "admin"}


class ClusterFailed(Exception):
    """A process exited, could not listen, or was not ready in time."""


def bin_dir() -> str:
    """The folder of the ``twistd`` and ``sdbackup`` installed beside this Python."""
    return os.path.dirname(sys.executable)


def environment() -> dict:
    return dict(os.environ, PATH=bin_dir() + os.pathsep + os.environ.get("PATH", ""))


def make_certificates(folder: str):
    """The CA and ``CERTIFICATES`` in ``folder``, for localhost (kept when they exist)."""
    if not os.path.exists(pki.ca_paths(folder)[0]):
        pki.save_ca(folder, pki.create_ca())
    ca = pki.load_ca(folder)
    for name, role in CERTIFICATES.items():
        if not os.path.exists(os.path.join(folder, f"{name}.crt")):
            pki.save_certificate(folder, name, pki.issue(ca, role, name))


def certificate_files(folder: str, name: str) -> tuple[str, str, str]:
    """The CA's certificate, and the certificate and key ``name``, in ``folder``."""
    return (os.path.join(folder, "ca.crt"), os.path.join(folder, f"{name}.crt"),
            os.path.join(folder, f"{name}.key"))


def tls_options(folder: str, name: str) -> list[str]:
    """``--tls-ca/--tls-cert/--tls-key`` for the certificate ``name`` in ``folder``."""
    ca, cert, key = certificate_files(folder, name)
    return ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]


def tls_environment(folder: str, name: str = "client") -> dict:
    """``SDBACKUP_TLS_CA/CERT/KEY`` for a client with the certificate ``name``."""
    ca, cert, key = certificate_files(folder, name)
    return {"SDBACKUP_TLS_CA": ca, "SDBACKUP_TLS_CERT": cert, "SDBACKUP_TLS_KEY": key}


def tls_transport(folder: str, name: str) -> Transport:
    """Mutual TLS as the holder of the certificate ``name`` in ``folder``."""
    return Transport(tls=load_identity(*certificate_files(folder, name)))


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@attrs.define
class Process:
    name: str
    popen: subprocess.Popen
    log: str
    port: int = 0
    #: Where this process's part of the log begins (a restarted process appends to it).
    log_start: int = 0

    def output(self) -> str:
        """What this process has logged so far."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def peak_rss(self) -> int:
        """The process's peak resident memory so far, in bytes (Linux ``VmHWM``)."""
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


@attrs.define
class LocalCluster:
    """``servers`` storage servers and a manager under ``root``."""

    root: str
    servers: int = 3
    manager_port: int = 0
    first_server_port: int = 0  # 0: ephemeral ports; else first_server_port, +1, ...
    replicas: int = 2
    heartbeat: float = 5.0
    interface: str = "127.0.0.1"
    deadline: float = 30.0
    echo: bool = False  # print each command, as the demo does
    #: A folder for the CA and certificates (relative to ``root``): mutual TLS on every link.
    tls: str = ""
    manager_options: list = attrs.Factory(list)  # more twistd plugin options for each
    server_options: list = attrs.Factory(list)
    processes: list = attrs.Factory(list)
    manager_data: str = ""  # the manager's data folder, once started

    @property
    def manager(self) -> Process:
        return self.processes[0]

    @property
    def manager_address(self) -> str:
        host = "localhost" if self.interface in ("", "0.0.0.0") else self.interface
        return f"tcp:{host}:{self.manager.port}"

    @property
    def tls_folder(self) -> str:
        return os.path.join(self.root, self.tls) if self.tls else ""

    def client_environment(self) -> dict:
        """What a client needs beside ``environment()``: the manager, and TLS when on."""
        env = {"SDBACKUP_MANAGER": self.manager_address}
        if self.tls:
            env.update(tls_environment(self.tls_folder))
        return env

    def _tls(self, name: str) -> list[str]:
        return tls_options(self.tls_folder, name) if self.tls else []

    def _listen(self, port: int) -> str:
        return f"tcp:{port}" + (f":interface={self.interface}" if self.interface else "")

    def start(self) -> "LocalCluster":
        os.makedirs(self.root, exist_ok=True)
        if self.tls:
            make_certificates(self.tls_folder)
        try:
            self.start_manager()
            for index in range(self.servers):
                self.start_server(index)
        except BaseException:
            self.stop()
            raise
        return self

    def start_manager(self, data: str = "manager_data") -> Process:
        """Start the manager; after a first start, again on the port it had (a restart)."""
        port = self.manager.port if self.processes else self.manager_port
        args = ["sdbackup-manager", "--listen", self._listen(port), "--data", data,
                "--replicas", str(self.replicas), *self._tls("manager"), *self.manager_options]
        self.manager_data = os.path.join(self.root, data)
        process = self._start("manager", args, MANAGER_READY)
        if self.processes and self.processes[0].name == "manager":
            self.processes[0] = process
        else:
            self.processes.insert(0, process)
        return process

    def stop_manager(self, timeout: float = 10.0):
        """SIGTERM the manager and wait until it is gone (``start_manager`` starts it again)."""
        self.kill(self.manager, signal.SIGTERM, timeout)

    def restart_manager(self, wipe: bool = False) -> Process:
        """Stop the manager and start it again on its port; with ``wipe``, its catalog is
        deleted in between, so it starts with nothing but what the servers report."""
        self.stop_manager()
        if wipe:
            shutil.rmtree(self.manager_data, ignore_errors=True)
        return self.start_manager(os.path.relpath(self.manager_data, self.root))

    def start_server(self, index: int) -> Process:
        port = self.first_server_port + index if self.first_server_port else 0
        data = f"data_{port}" if port else f"data_{index}"
        args = ["sdbackup-server", "--listen", self._listen(port), "--data", data,
                "--manager", self.manager_address, "--heartbeat", str(self.heartbeat),
                *self._tls("server"), *self.server_options]
        process = self._start(f"server_{port or index}", args, SERVER_READY)
        process.port = int(self._wait_for(process, SERVER_LISTENING).group(1))
        self.processes.append(process)
        return process

    def _start(self, name: str, args: list[str], ready) -> Process:
        log = os.path.join(self.root, f"{name}.log")
        command = ["twistd", "-n", "--pidfile=", *args]
        if self.echo:
            print(f"$ {' '.join(command)}  > {os.path.relpath(log, self.root)}", flush=True)
        with open(log, "ab") as out:
            start = out.tell()
            popen = subprocess.Popen(command, cwd=self.root, env=environment(), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log, log_start=start)
        match = self._wait_for(process, ready)
        if isinstance(match, re.Match):
            process.port = int(match.group(1))
        return process

    def _wait_for(self, process: Process, ready):
        deadline = time.monotonic() + self.deadline
        while time.monotonic() < deadline:
            text = process.output()
            found = ready.search(text) if isinstance(ready, re.Pattern) else (ready in text or None)
            if found:
                return found
            if process.popen.poll() is not None or "cannot listen" in text:
                process.popen.kill()
                process.popen.wait()
                raise ClusterFailed(f"{process.name} could not start; end of {process.log}:\n"
                                    f"{tail(process.log)}")
            time.sleep(0.05)
        raise ClusterFailed(f"{process.name} not ready after {self.deadline:g}s; end of "
                            f"{process.log}:\n{tail(process.log)}")

    def kill(self, process: Process, sig: int = signal.SIGTERM, timeout: float = 10.0):
        """Stop one process: ``sig``, then SIGKILL if it is still there after ``timeout``."""
        if process.popen.poll() is None:
            process.popen.send_signal(sig)
        try:
            process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()

    def stop(self):
        """Stop every process, servers first; nothing is left running."""
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in reversed(self.processes):
            self.kill(process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
