"""Storage servers as disks: identities, ``server list``, drain, retire, and a full disk.

Every test starts its own cluster of ``twistd`` processes (``start_cluster``, with the
short timings of the failure tests) and checks what ``sdbackup`` shows and what the
data folders hold.
"""

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_failures import make_source, poll, restore_and_compare

from sdbackup.localcluster import tls_environment

pytestmark = pytest.mark.timeout(180)

UNDER_REPLICATED = re.compile(r"\b(\d+) under-replicated\b")
REFUSED_COPY = re.compile(r"the manager refused this server: the data folder of \S+ has identity")


def servers_json(cluster, cwd: Path) -> dict:
    """``{address: server}`` from ``sdbackup server list --json``."""
    result = cluster.sdbackup("server", "list", "--json", cwd=cwd)
    return {s["address"]: s for s in json.loads(result.stdout)["servers"]}


def under_replicated(cluster, cwd: Path) -> int:
    result = cluster.sdbackup("status", cwd=cwd)
    return int(UNDER_REPLICATED.search(result.stdout).group(1))


def wait_healed(cluster, cwd: Path, timeout: float = 30.0):
    def probe():
        count = under_replicated(cluster, cwd)
        return count == 0, f"{count} under-replicated"

    poll("no chunk under-replicated", probe, timeout, 0.3)


@pytest.fixture
def extra_servers():
    """``start(cluster, name, data)``: a server process on a new port with ``data``, not in
    ``cluster.servers``; stopped before the cluster is, its log checked with the cluster's."""
    started = []

    def start(cluster, name: str, data: Path):
        process = cluster._start_server(name, data, "tcp:0:interface=127.0.0.1")
        cluster.stopped.append(process)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_a_copied_data_folder_is_not_a_second_copy_and_a_moved_one_is_the_same_disk(
        start_cluster, extra_servers, tmp_path):
    cluster = start_cluster(servers=2)
    first, second = cluster.servers
    cluster.kill(second.process)
    make_source(tmp_path, [1.5])
    backup = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)
    assert backup.returncode == 3, backup.describe()  # one live server: one copy of each chunk
    snapshot = cluster.snapshot_id(backup.stdout)
    short = under_replicated(cluster, tmp_path)
    assert short > 0

    # A copy of the only holder's folder, served at another port: refused, never counted.
    shutil.copytree(first.data, tmp_path / "copy")
    copy = extra_servers(cluster, "copy", tmp_path / "copy")
    copy.wait_for(REFUSED_COPY)
    assert under_replicated(cluster, tmp_path) == short
    listed = servers_json(cluster, tmp_path)
    assert len(listed) == 2 and all(s["disk_id"] != "" for s in listed.values())
    check = cluster.sdbackup("check", cwd=tmp_path, check=False)
    assert check.returncode == 3, check.describe()
    assert f"{short} under-replicated" in check.stdout, check.describe()

    # The real second disk comes back at a new address: the same disk, its copies its own;
    # the repair copies the new chunks there, not to the copy.
    old_address = second.address
    moved = extra_servers(cluster, "moved", second.data)
    moved.wait_for(re.compile("sdbackup-server registered with the manager"))
    wait_healed(cluster, tmp_path)
    listed = servers_json(cluster, tmp_path)
    assert old_address not in listed, listed
    assert len(listed) == 2 and all(s["alive"] for s in listed.values()), listed
    # The snapshot object is on both real disks now (the copy has it too, uncounted).
    for folder in (first.data, second.data, tmp_path / "copy"):
        assert [p.name for p in (folder / "snapshots").iterdir() if p.name.startswith(snapshot)]


def test_server_list_then_drain_survives_a_manager_restart_then_retire_and_restore(
        start_cluster, fast_manager_options, tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options)
    source = make_source(tmp_path, [2.0, 0.5])
    snapshot = cluster.backup("src", cwd=tmp_path)
    wait_healed(cluster, tmp_path)

    listed = servers_json(cluster, tmp_path)
    assert sorted(listed) == sorted(s.address for s in cluster.servers)
    assert len({s["disk_id"] for s in listed.values()}) == 3
    for server in cluster.servers:
        entry = listed[server.address]
        assert re.fullmatch(r"[0-9a-f]{32}", entry["disk_id"])
        assert (server.data / "identity").read_text().strip() == entry["disk_id"]
        assert entry["alive"] and not entry["draining"] and not entry["retired"]
        assert entry["chunks"] == len(server.chunk_files()) and entry["bytes"] > 0
    text = cluster.sdbackup("server", "list", cwd=tmp_path).stdout
    assert all(s.address in text for s in cluster.servers)

    victim = cluster.servers[0]
    drained = cluster.sdbackup("server", "drain", str(victim.port), "--no-wait", cwd=tmp_path)
    assert f"draining {victim.address}" in drained.stdout
    marks = cluster.restart_manager()
    cluster.wait_registered_since(marks)
    def ready():
        out = cluster.sdbackup("status", cwd=tmp_path).stdout
        return "manager ready" in out, out

    poll("the manager ready", ready, 20, 0.3)
    assert servers_json(cluster, tmp_path)[victim.address]["draining"]  # kept in the catalog

    done = cluster.sdbackup("server", "drain", victim.address, cwd=tmp_path, timeout=90)
    assert f"{victim.address} is drained" in done.stdout, done.describe()
    entry = servers_json(cluster, tmp_path)[victim.address]
    assert entry["draining"] and entry["short"] == 0
    before = victim.chunk_files()
    more = make_source(tmp_path, [0.5], name="more")
    later = cluster.backup("more", cwd=tmp_path)
    assert victim.chunk_files() == before  # nothing placed on a draining server

    retired = cluster.sdbackup("server", "retire", victim.address, cwd=tmp_path)
    assert f"{victim.address} retired" in retired.stdout
    status = cluster.sdbackup("status", cwd=tmp_path).stdout
    assert victim.address.split(":", 1)[1] not in status
    assert "2 of 2 servers alive" in status and " 0 under-replicated" in status
    assert servers_json(cluster, tmp_path)[victim.address]["retired"]
    assert victim.process.stop() in (0, -signal.SIGTERM)
    cluster.stopped.append(victim.process)
    cluster.servers.remove(victim)

    restore_and_compare(cluster, tmp_path, [source], snapshot, "out1")
    restore_and_compare(cluster, tmp_path, [more], later, "out2")
    assert cluster.sdbackup("check", cwd=tmp_path).returncode == 0


def test_retire_is_refused_while_a_server_holds_last_copies(start_cluster, tmp_path):
    cluster = start_cluster()
    # The repository's key object is on two servers: the one left alive is one of them.
    holder = next(s for s in cluster.servers if s.chunk_files())
    others = [s for s in cluster.servers if s is not holder]
    for server in others:
        cluster.kill(server.process)
    make_source(tmp_path, [0.5])
    backup = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)
    assert backup.returncode == 3, backup.describe()

    alive = cluster.sdbackup("server", "retire", holder.address, cwd=tmp_path, check=False)
    assert alive.returncode == 1
    assert f"{holder.address} is alive and not drained: drain it first" in alive.stderr

    cluster.kill(holder.process)
    for server in others:
        cluster.restart_server(server)
    refused = cluster.sdbackup("server", "retire", holder.address, cwd=tmp_path, check=False)
    assert refused.returncode == 1, refused.describe()
    chunks = len(holder.chunk_files())
    # (The key object may have been copied again already: it had a copy on a server now back.)
    below = re.search(rf"retiring {holder.address} would leave (\d+) of its {chunks} chunks with "
                      rf"fewer than 2 copies", refused.stderr)
    assert below is not None and int(below.group(1)) in (chunks - 1, chunks), refused.describe()
    # (All but the key object, whose other copy is on a server that is back.)
    assert f"and {chunks - 1} of them would lose their last copy" in refused.stderr
    assert holder.address in servers_json(cluster, tmp_path)  # still known
    cluster.restart_server(holder)
    wait_healed(cluster, tmp_path)


def test_a_dead_server_is_shown_dead_and_once_retired_disappears(start_cluster, extra_servers,
                                                                 tmp_path):
    cluster = start_cluster()
    make_source(tmp_path, [0.5])
    cluster.backup("src", cwd=tmp_path)
    victim = cluster.servers[2]
    cluster.kill(victim.process)
    display = victim.address.split(":", 1)[1]

    def shown_dead():
        out = cluster.sdbackup("status", cwd=tmp_path).stdout
        row = next((line for line in out.splitlines() if line.startswith(display)), "")
        return " dead " in row and "(dead for " in row, row

    row = poll("status showing the server dead", shown_dead, 15, 0.3)
    assert re.search(r"\(dead for \d+s\)$", row), row
    wait_healed(cluster, tmp_path)
    time.sleep(1.2)
    assert re.search(r"\(dead for ([1-9]\d*)s\)", shown_dead()[1])

    cluster.sdbackup("server", "retire", display, cwd=tmp_path)
    status = cluster.sdbackup("status", cwd=tmp_path).stdout
    assert display not in status and "2 of 2 servers alive" in status
    entry = servers_json(cluster, tmp_path)[victim.address]
    assert entry["retired"] and entry["chunks"] == 0
    # Its disk, started again, is refused: its copies are forgotten.
    victim.process.stop()
    cluster.stopped.append(victim.process)
    again = extra_servers(cluster, "retired", victim.data)
    again.wait_for(re.compile(r"the manager refused this server: .*belongs to a retired server"))
    assert "2 of 2 servers alive" in cluster.sdbackup("status", cwd=tmp_path).stdout


def test_a_full_server_gets_no_chunks_and_the_backup_completes_on_the_others(
        start_cluster, tmp_path):
    cluster = start_cluster()
    first = make_source(tmp_path, [1.0], name="first")
    earlier = cluster.backup("first", cwd=tmp_path)
    full = cluster.servers[2]
    held = {name: (full.data / "chunks" / name[:2] / name).read_bytes()
            for name in full.chunk_files() if (full.data / "chunks" / name[:2] / name).exists()}
    assert held
    cluster.kill(full.process)
    cluster.server_options.extend(["--reserve", "1000TiB"])  # more than any disk has free
    try:
        cluster.restart_server(full)
    finally:
        del cluster.server_options[-2:]
    full.process.wait_for(re.compile(r"the disk is full: \d+ bytes free"))
    assert servers_json(cluster, tmp_path)[full.address]["full"]

    second = make_source(tmp_path, [2.0, 0.5], name="second")
    backup = cluster.sdbackup("backup", "second", cwd=tmp_path)
    assert backup.returncode == 0 and "copies" not in backup.stderr, backup.describe()
    later = cluster.snapshot_id(backup.stdout)
    assert set(held) == {n for n in full.chunk_files() if n in held}  # nothing lost or added
    for name, data in held.items():  # nothing stored before was touched
        assert (full.data / "chunks" / name[:2] / name).read_bytes() == data
    assert not list((full.data / "incoming").iterdir())
    wait_healed(cluster, tmp_path)
    restore_and_compare(cluster, tmp_path, [first], earlier, "out1")
    restore_and_compare(cluster, tmp_path, [second], later, "out2")


def test_under_tls_clients_list_servers_and_only_an_admin_drains_or_retires(
        start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(tls=True)
    assert len(servers_json(cluster, tmp_path)) == 3
    target = cluster.servers[0].address
    for command, message in ((("drain", target, "--no-wait"), "DrainServer"),
                             (("retire", target), "RetireServer")):
        refused = cluster.sdbackup("server", *command, cwd=tmp_path, check=False)
        assert refused.returncode == 1, refused.describe()
        assert f"a client may not send {message} (only admin)" in refused.stderr
    admin = dict(cluster.client_env(), **tls_environment(str(cluster.tls), "admin"))
    done = run_sdbackup("server", "drain", target, "--no-wait", cwd=tmp_path, env=admin)
    assert f"draining {target}" in done.stdout
    assert servers_json(cluster, tmp_path)[target]["draining"]
