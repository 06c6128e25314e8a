"""README (Exit status): "130 when interrupted (Ctrl-C), 143 on SIGTERM, after the command has
cleaned up (a restore's temporary file, its connections); a second signal exits at once."
Against a real cluster of ``twistd`` processes and the real ``sdbackup`` command (issue 11)."""

import fcntl
import os
import signal
import subprocess
import termios
import time

import pytest
from test_cli import write


def queued(pipe) -> int:
    """Bytes written to ``pipe`` and not read yet."""
    return int.from_bytes(fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


@pytest.mark.parametrize(("first", "second", "status"), [
    (signal.SIGINT, signal.SIGINT, 130),
    (signal.SIGTERM, signal.SIGTERM, 143),
    (signal.SIGINT, signal.SIGTERM, 143),
])
def test_a_second_signal_exits_at_once_while_the_first_ones_clean_up_waits(cluster, tmp_path,
                                                                            first, second, status):
    """``dump`` into a pipe nobody reads (a pager that hangs): its write waits in a thread,
    which the clean-up after the first signal waits for, for ever; the second signal ends it."""
    write(tmp_path / "src/large.bin", os.urandom(4 * 1024 * 1024))
    sid = cluster.backup("src", cwd=tmp_path)
    stderr_path = tmp_path / "dump.stderr"
    with open(stderr_path, "wb") as stderr:
        dump = subprocess.Popen(cluster.command("dump", sid, "src/large.bin"), cwd=tmp_path,
                                env=cluster.client_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)
    try:
        capacity = fcntl.fcntl(dump.stdout.fileno(), fcntl.F_GETPIPE_SZ)
        deadline = time.monotonic() + 60
        while queued(dump.stdout) < capacity:  # full: its writer waits for a reader
            assert dump.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        dump.send_signal(first)
        try:
            dump.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass  # cleaning up: waiting for its writer
        else:
            pytest.fail(f"the first signal's clean-up did not wait for the blocked write (exit "
                        f"status {dump.returncode}): this test needs another way to hold it open")
        dump.send_signal(second)
        sent = time.monotonic()
        try:
            returncode = dump.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the second signal did not end it either")
        took = time.monotonic() - sent
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
        dump.stdout.close()
    shown = stderr_path.read_text()
    assert returncode == status, shown
    assert took < 5, f"it took {took:.1f} s to exit after the second signal"
    assert shown.splitlines() == ["sdbackup: interrupted"], shown
