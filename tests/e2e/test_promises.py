"""Promises of README.rst that no other test held to, each against real ``twistd`` processes
and the real ``sdbackup`` command (the list of promises and their tests: issue 11)."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import write

from sdbackup.objects import Kind
from sdbackup.services import chunkstore

TWISTD = Path(sys.executable).parent / "twistd"


# --- the daemons' option checks ----------------------------------------------------------------

@pytest.mark.parametrize(("daemon", "option"), [
    ("sdbackup-manager", "--history-interval"),
    ("sdbackup-manager", "--max-connections"),
    ("sdbackup-server", "--idle-timeout"),
    ("sdbackup-server", "--scrub-rate"),
])
def test_a_daemon_given_a_zero_where_a_positive_value_is_needed_stops_at_once(tmp_path, daemon,
                                                                              option):
    """README: "Every option in seconds or MiB, and the connection options, must be positive"."""
    done = subprocess.run([TWISTD, "-n", "--pidfile=", daemon, "--listen", "tcp:0:interface=127.0.0.1",
                           "--data", tmp_path / "data", option, "0"],
                          cwd=tmp_path, capture_output=True, encoding="utf-8", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    output = (done.stdout + done.stderr).strip().splitlines()  # twistd prints its usage first
    assert output[-1].endswith(f": {option} must be positive"), output
    assert "Traceback" not in done.stdout + done.stderr


# --- check ---------------------------------------------------------------------------------------

def test_check_exits_3_and_names_a_server_that_cannot_answer(start_cluster, tmp_path):
    """README (check): 3 when "an unreachable server", everything else being well. The cluster
    holds nothing, so the frozen server is the only thing degraded."""
    cluster = start_cluster()
    frozen = cluster.servers[2]
    os.kill(frozen.process.popen.pid, signal.SIGSTOP)
    try:
        result = cluster.sdbackup("check", cwd=tmp_path, check=False)
    finally:
        # Resumed: the link the manager closed meanwhile loses the answer to its VerifyChunks,
        # which the server notes and goes on (the teardown fails the test on any traceback).
        os.kill(frozen.process.popen.pid, signal.SIGCONT)
    frozen.process.wait_for(re.compile(r"VerifyChunks from .* abandoned: the connection closed"))
    assert result.returncode == 3, result.describe()
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("unreachable: ")] == [
        f"unreachable: localhost:{frozen.port}"], result.describe()
    assert lines[0].startswith("2 servers listed their chunks: "), result.describe()
    assert "snapshots reference 0 missing chunks" in result.stdout, result.describe()
    assert "every chunk has a good copy" in result.stderr, result.describe()


# --- restore over what the target already holds ----------------------------------------------

def test_an_existing_file_or_link_at_a_restored_path_is_replaced_and_an_existing_folder_used(
        cluster, tmp_path):
    """README (restore): "An existing file or link at a restored path is replaced and an existing
    folder used, but nothing is ever written through a link"."""
    write(tmp_path / "src/a.txt", b"the snapshot's a\n")
    os.symlink("a.txt", tmp_path / "src/link")
    write(tmp_path / "src/sub/b.txt", b"the snapshot's b\n")
    sid = cluster.backup("src", cwd=tmp_path)

    outside = tmp_path / "outside/victim.txt"
    write(outside, b"must stay as it is\n")
    target = tmp_path / "out"
    write(target / "src/a.txt", b"an older, longer a that the restore must replace\n")
    write(target / "src/link", b"a file where the snapshot has a link\n")
    write(target / "src/sub/extra.txt", b"not in the snapshot\n")
    os.symlink(outside, target / "src/sub/b.txt")  # a link where the snapshot has a file

    result = cluster.sdbackup("restore", sid, "--target", target, cwd=tmp_path, check=False)

    assert result.returncode == 0, result.describe()
    assert (target / "src/a.txt").read_bytes() == b"the snapshot's a\n"
    assert os.readlink(target / "src/link") == "a.txt"
    assert stat.S_ISREG(os.lstat(target / "src/sub/b.txt").st_mode)
    assert (target / "src/sub/b.txt").read_bytes() == b"the snapshot's b\n"
    assert (target / "src/sub/extra.txt").read_bytes() == b"not in the snapshot\n"
    assert outside.read_bytes() == b"must stay as it is\n"


# --- special files ---------------------------------------------------------------------------

def test_a_socket_is_skipped_with_a_note_a_fifo_is_kept_and_the_backup_exits_0(cluster, tmp_path):
    """README (backup): "Sockets are skipped with a note" (a note is no warning: exit 0), FIFOs
    are backed up and come back as FIFOs."""
    write(tmp_path / "src/a.txt", b"a\n")
    os.mkfifo(tmp_path / "src/pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "src/sock"))
    try:
        result = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)
    finally:
        listener.close()
    assert result.returncode == 0, result.describe()
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: ") and "sock" in notes[0], result.describe()
    sid = cluster.snapshot_id(result.stdout)

    listing = cluster.sdbackup("ls", sid, cwd=tmp_path).stdout.splitlines()
    assert listing == ["src/", "src/a.txt", "src/pipe"], listing
    cluster.sdbackup("restore", sid, "--target", tmp_path / "out", cwd=tmp_path)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out/src/pipe").st_mode)
    assert not os.path.lexists(tmp_path / "out/src/sock")


# --- exit codes --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("restore", "latest"),  # --target missing
    ("ls", "--no-such-option"),
    ("check", "extra-argument"),
])
def test_a_usage_error_exits_2_with_the_usage_on_stderr(cluster, tmp_path, args):
    """README: "2 for a usage error"."""
    result = cluster.sdbackup(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.describe()
    assert result.stdout == "" and "usage: sdbackup" in result.stderr, result.describe()


def test_a_client_manager_beyond_loopback_without_tls_is_refused_with_exit_1(cluster, tmp_path):
    """README (Security): a client ``--manager`` beyond loopback stops the process at start
    without TLS, unless ``--insecure``."""
    result = cluster.sdbackup("status", cwd=tmp_path, check=False, manager="tcp:192.0.2.1:5000")
    assert result.returncode == 1, result.describe()
    assert result.stderr.splitlines() == [
        "sdbackup: refusing to reach the manager at tcp:192.0.2.1:5000 without TLS: only loopback "
        "addresses are reached in plaintext (give --tls-ca, --tls-cert and --tls-key, or --insecure)"
    ], result.describe()


def tree_files_naming(cluster, name: bytes) -> list[Path]:
    """Every copy, on every server, of the tree objects that hold an entry called ``name``."""
    found = []
    for server in cluster.servers:
        for folder, _, names in os.walk(server.chunk_dir):
            for chunk in names:
                path = Path(folder) / chunk
                data = path.read_bytes()
                if (data.startswith(chunkstore.MAGIC)
                        and data[len(chunkstore.MAGIC)] == chunkstore.KIND_CODES[Kind.TREE]
                        and name in data[chunkstore.HEADER_SIZE:]):
                    found.append(path)
    return found


def test_ls_of_a_snapshot_with_a_folder_whose_tree_is_gone_lists_the_rest_and_exits_3(cluster,
                                                                                         tmp_path):
    """README: "3 ... a restore or ls with an entry or folder that failed"; architecture.rst:
    "A folder whose tree cannot be read is an error line, and ls exits with status 3"."""
    write(tmp_path / "src/kept.txt", b"kept\n")
    write(tmp_path / "src/lost folder/only-in-the-lost-folder.txt", b"lost\n")
    sid = cluster.backup("src", cwd=tmp_path)
    copies = tree_files_naming(cluster, b"only-in-the-lost-folder.txt")
    assert len(copies) == 2, copies  # replication factor 2
    for path in copies:
        path.unlink()

    result = cluster.sdbackup("ls", sid, cwd=tmp_path, check=False)

    assert result.returncode == 3, result.describe()
    assert result.stdout.splitlines()[:3] == ["src/", "src/kept.txt", "src/lost folder/"], (
        result.describe())
    assert "only-in-the-lost-folder.txt" not in result.stdout
    assert "src/lost folder" in result.stderr, result.describe()
