"""One data folder, one storage server: a second one started on it stops at once, and the
first keeps serving (the manager would otherwise count one disk as two copies)."""

import subprocess

from conftest import TWISTD, base_env
from test_cli import write


def test_a_second_server_on_a_data_folder_in_use_stops_with_a_clear_error(cluster, tmp_path):
    first = cluster.servers[0]
    second = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "sdbackup-server", "--listen", "tcp:0:interface=127.0.0.1",
         "--data", first.data, "--manager", cluster.manager_endpoint],
        cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)

    assert second.returncode == 1, second
    output = second.stdout + second.stderr
    assert f"the data folder {first.data} is in use by another sdbackup-server" in output
    assert f"pid {first.process.popen.pid}" in output
    assert "Traceback" not in output
    # The first server still holds its folder and serves.
    write(tmp_path / "after.txt", b"stored after the refused start\n")
    sid = cluster.backup("after.txt", cwd=tmp_path)
    cluster.sdbackup("restore", sid, "--target", tmp_path / "out", cwd=tmp_path)
    assert (tmp_path / "out/after.txt").read_bytes() == b"stored after the refused start\n"
