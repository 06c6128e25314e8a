"""The command line's rough edges a new user meets: interruption, the prompt, ``--manager``
forms and ``--version``; each with a real ``sdbackup`` process against a real cluster."""

import os
import signal
import time
from pathlib import Path

import pytest
from test_cli import run_in_terminal, write

from sdbackup import __version__


def frozen_manager_backup(cluster, src: Path):
    """A backup waiting on a manager stopped with SIGSTOP (it answers nothing, like a hung
    one): the client is connected and waiting when the test signals it."""
    write(src / "a.txt", b"never stored\n")
    os.kill(cluster.manager.popen.pid, signal.SIGSTOP)
    running = cluster.start_sdbackup("backup", "a.txt", cwd=src)
    # Connected (a socket open) means its reactor runs, and so its signal handlers, put in
    # place on the reactor's first turn, are in place: importing alone may take seconds.
    deadline = time.monotonic() + 30
    while not has_socket(running.popen.pid):
        assert running.running() and time.monotonic() < deadline, "the client never connected"
        time.sleep(0.05)
    time.sleep(0.3)
    return running


def has_socket(pid: int) -> bool:
    folder = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(os.path.join(folder, fd)).startswith("socket:")
                   for fd in os.listdir(folder))
    except OSError:  # an fd closed meanwhile
        return False


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_backup_exits_as_a_shell_expects_without_a_traceback(cluster, tmp_path,
                                                                             signum, status):
    try:
        running = frozen_manager_backup(cluster, tmp_path)
        running.popen.send_signal(signum)
        result = running.wait(timeout=20)
    finally:
        os.kill(cluster.manager.popen.pid, signal.SIGCONT)
    assert result.returncode == status, result.describe()
    assert result.stderr.strip().splitlines() == ["sdbackup: interrupted"], result.describe()
    assert "Traceback" not in result.stdout + result.stderr


def test_a_backup_interrupted_while_the_servers_hang_exits_at_once(cluster, tmp_path):
    """Every server frozen while a backup stores: SIGINT does not wait for their time-outs
    (nor try other servers) but exits 130."""
    write(tmp_path / "src/large.bin", os.urandom(24 * 1024 * 1024))
    frozen = []
    try:
        for server in cluster.servers:
            os.kill(server.process.popen.pid, signal.SIGSTOP)
            frozen.append(server)
        running = cluster.start_sdbackup("backup", "src", cwd=tmp_path)
        deadline = time.monotonic() + 30
        while not has_socket(running.popen.pid):
            assert running.running() and time.monotonic() < deadline, "the client never connected"
            time.sleep(0.05)
        time.sleep(1.0)  # placed, and storing on the frozen servers
        assert running.running()
        running.popen.send_signal(signal.SIGINT)
        result = running.wait(timeout=15)
    finally:
        for server in frozen:
            os.kill(server.process.popen.pid, signal.SIGCONT)
    assert result.returncode == 130, result.describe()
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_restore_leaves_no_partial_file(cluster, tmp_path, signum, status):
    """SIGINT or SIGTERM while the servers are frozen mid-restore: the shell's status, nothing
    of the large file under its name or under a temporary one, and a second restore finishes
    the job."""
    data = os.urandom(24 * 1024 * 1024)
    write(tmp_path / "src/large.bin", data)
    write(tmp_path / "src/small.txt", b"small\n")
    sid = cluster.snapshot_id(cluster.sdbackup("backup", "src", cwd=tmp_path).stdout)
    target = tmp_path / "out"
    running = cluster.start_sdbackup("restore", sid, "--target", target, cwd=tmp_path)
    frozen = []
    try:
        deadline = time.monotonic() + 60
        while not target.exists():
            assert running.running() and time.monotonic() < deadline, "the restore never began"
            time.sleep(0.02)
        for server in cluster.servers:
            os.kill(server.process.popen.pid, signal.SIGSTOP)
            frozen.append(server)
        time.sleep(0.3)
        assert running.running(), "the restore ended before it could be interrupted"
        running.popen.send_signal(signum)
        result = running.wait(timeout=20)
    finally:
        for server in frozen:
            os.kill(server.process.popen.pid, signal.SIGCONT)
    assert result.returncode == status, result.describe()
    assert "sdbackup: interrupted" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    left = [p.name for p in target.rglob("*")]
    assert "large.bin" not in left
    assert not [name for name in left if name.endswith(".tmp")], left

    cluster.sdbackup("restore", sid, "--target", target, cwd=tmp_path)
    assert (target / "src/large.bin").read_bytes() == data


def test_the_prompt_takes_several_names_and_expands_the_home_folder(cluster, tmp_path):
    home = tmp_path / "home"
    write(home / "notes.txt", b"in the home folder\n")
    write(tmp_path / "two words.txt", b"a name with a space\n")
    env = {**cluster.client_env(), "HOME": str(home)}

    status, shown = run_in_terminal(cluster.command("backup"), tmp_path, env,
                                    b'~/notes.txt "two words.txt"')

    assert status == 0, shown
    sid = cluster.snapshot_id(shown.replace("\r", ""))
    listed = cluster.sdbackup("ls", sid, cwd=tmp_path).stdout.splitlines()
    assert "two words.txt" in listed
    assert any(line.endswith("home/notes.txt") for line in listed), listed


def test_end_of_input_at_the_prompt_is_a_clear_error(cluster, tmp_path):
    status, shown = run_in_terminal(cluster.command("backup"), tmp_path, cluster.client_env(),
                                    b"\x04")
    assert status == 1, shown
    assert "no file name given" in shown
    assert "Traceback" not in shown


@pytest.mark.parametrize("form", ["port", "host:port", "tcp:host:port"])
def test_the_manager_may_be_given_as_a_port_or_host_and_port(cluster, tmp_path, form):
    port = cluster.manager_port
    manager = {"port": str(port), "host:port": f"127.0.0.1:{port}",
               "tcp:host:port": f"tcp:127.0.0.1:{port}"}[form]
    result = cluster.sdbackup("status", "--manager", manager, cwd=tmp_path)
    assert "manager ready" in result.stdout


def test_a_manager_that_is_no_endpoint_is_one_clear_error(cluster, tmp_path):
    result = cluster.sdbackup("status", "--manager", "localhost:port", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.describe()
    assert result.stderr.strip().splitlines() == [
        "sdbackup: --manager 'tcp:localhost:port': give PORT, HOST:PORT or tcp:HOST:PORT"]


def test_version_is_sdbackups_own(cluster, tmp_path):
    result = cluster.sdbackup("--version", cwd=tmp_path)
    assert result.stdout.strip() == f"sdbackup {__version__}"
