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

from sdbackup import pki
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


def tree_files(cluster) -> dict[Path, bytes]:
    """Every copy, on every server, of every tree object: path -> the file's bytes."""
    found = {}
    for server in cluster.servers:
        for folder, _, names in os.walk(server.chunk_dir):
            for chunk in names:
                path = Path(folder) / chunk
                data = path.read_bytes()
                if (data.startswith(chunkstore.MAGIC)
                        and data[len(chunkstore.MAGIC)] == chunkstore.KIND_CODES[Kind.TREE]):
                    found[path] = data
    return found


def test_ls_of_a_snapshot_with_a_folder_whose_tree_is_gone_lists_the_rest_and_exits_3(cluster,
                                                                                         tmp_path):
    """README: "3 ... a restore or ls with an entry or folder that failed"; architecture.rst:
    "A folder whose tree cannot be read is an error line, and ls exits with status 3"."""
    write(tmp_path / "src/kept.txt", b"kept\n")
    # A hundred long names that do not compress: the lost folder's tree is the one large tree
    # of the backup, whether the repository seals its objects or not.
    for _ in range(100):
        write(tmp_path / "src/lost folder" / os.urandom(40).hex(), b"lost\n")
    before = tree_files(cluster)
    sid = cluster.backup("src", cwd=tmp_path)
    new = {path: data for path, data in tree_files(cluster).items() if path not in before}
    largest = max(len(data) for data in new.values())
    copies = [path for path, data in new.items() if len(data) == largest]
    assert len(copies) == 2 and len({new[path] for path in copies}) == 1, copies  # 2 replicas
    assert all(len(data) * 10 < largest for data in new.values() if len(data) < largest)
    for path in copies:
        path.unlink()

    result = cluster.sdbackup("ls", sid, cwd=tmp_path, check=False)

    assert result.returncode == 3, result.describe()
    assert result.stdout.splitlines()[:3] == ["src/", "src/kept.txt", "src/lost folder/"], (
        result.describe())
    assert len(result.stdout.splitlines()) == 3, result.describe()  # none of the lost files
    assert "src/lost folder" in result.stderr, result.describe()


# --- an entry the backup cannot read -------------------------------------------------------

def without_bypassing_file_modes(command: list[str]) -> list[str]:
    """``command`` run so that file modes bind it: root reads any file whatever its mode unless
    it lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (another user is bound anyway)."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


def test_a_backup_skips_a_file_it_cannot_read_names_it_exits_3_and_keeps_the_rest(cluster,
                                                                                    tmp_path):
    """README (backup): "entries it cannot read are skipped with a warning"; (Exit status) "3
    ... a backup that warned (an entry it could not read ...)"; the snapshot is stored. (A path
    of its own: another test's snapshot of the module's cluster is no parent.)"""
    write(tmp_path / "mixed/kept.txt", b"readable\n")
    write(tmp_path / "mixed/sub/also kept.txt", b"readable too\n")
    write(tmp_path / "mixed/secret.txt", b"nobody may read this\n", mode=0o000)
    done = subprocess.run(without_bypassing_file_modes(cluster.command("backup", "mixed")),
                          cwd=tmp_path, env=cluster.client_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, encoding="utf-8", timeout=120)
    shown = f"exit status {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    assert done.returncode == 3, shown
    assert done.stderr.splitlines() == ["warning: cannot read mixed/secret.txt: Permission denied"], shown
    sid = cluster.snapshot_id(done.stdout)

    assert cluster.sdbackup("ls", sid, cwd=tmp_path).stdout.splitlines() == [
        "mixed/", "mixed/kept.txt", "mixed/sub/", "mixed/sub/also kept.txt"]
    cluster.sdbackup("restore", sid, "--target", tmp_path / "out", cwd=tmp_path)
    assert (tmp_path / "out/mixed/kept.txt").read_bytes() == b"readable\n"
    assert (tmp_path / "out/mixed/sub/also kept.txt").read_bytes() == b"readable too\n"
    assert not (tmp_path / "out/mixed/secret.txt").exists()


# --- TLS: the address dialled against the certificate ------------------------------------------

def test_a_client_refuses_a_manager_whose_certificate_is_for_another_address(start_cluster,
                                                                            tmp_path):
    """README (With TLS): "The end that connects checks the address it dials against the
    other's subjectAltNames" ... "the client exits 1 with one line". The manager's certificate,
    of the cluster's CA, names 127.0.0.1 alone: dialled as 127.0.0.1 it is taken, dialled as
    localhost (the same socket) it is refused."""
    cluster = start_cluster(servers=1, tls=True)
    ca = pki.load_ca(str(cluster.tls))
    pki.save_certificate(str(cluster.tls), "manager",
                         pki.issue(ca, "manager", "manager", hosts=["127.0.0.1"]))
    marks = cluster.restart_manager()
    cluster.wait_registered_since(marks)  # the server dials 127.0.0.1: it is let in

    as_named = cluster.sdbackup("status", cwd=tmp_path, manager=f"tcp:127.0.0.1:{cluster.manager_port}")
    assert "\nmanager ready; 1 of 1 servers alive;" in as_named.stdout, as_named.describe()

    result = cluster.sdbackup("status", cwd=tmp_path, check=False,
                              manager=f"tcp:localhost:{cluster.manager_port}")
    assert result.returncode == 1, result.describe()
    assert result.stdout == "", result.describe()
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sdbackup: cannot reach the manager at tcp:localhost:{cluster.manager_port}: "
                           "TLS handshake failed: the peer's certificate is not valid for its "
                           "address"), result.describe()
    assert "localhost" in line.partition("not valid for its address")[2], result.describe()
