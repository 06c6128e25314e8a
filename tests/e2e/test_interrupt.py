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
    time.sleep(1.5)
    assert running.running()
    return running


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
