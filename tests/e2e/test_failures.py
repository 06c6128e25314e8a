"""Failures on a real cluster: servers and the manager SIGKILLed, chunk files damaged or lost.

Every test starts its own cluster (``start_cluster``: a manager and three storage
servers as ``twistd`` processes) with short timings: servers send a heartbeat every
0.3 s and re-hash their chunks every second, the manager declares a silent server
dead after 1.5 s and looks for chunks to repair every 0.5 s. A test breaks the
cluster, checks what the commands and the chunk files on disk show, and ends by
restoring everything and comparing every byte with the source. Every wait is a poll
with a deadline; ``pytest -s`` prints the measured re-replication time and the
restore speed with a server down.
"""

import filecmp
import os
import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
#: A chunk file is an 8-byte magic, a kind byte and a 32-byte checksum, then the chunk's bytes.
CHUNK_HEADER = 41
STATUS_ROW = re.compile(r"^(?P<address>\S+:\d+)\s+(?P<state>alive|dead)\s+[\d.]+ \S+\s+(?P<chunks>\d+)\s")
UNDER_REPLICATED = re.compile(r"\b(\d+) under-replicated\b")
SIZE = r"[\d.]+ (?:B|KiB|MiB|GiB|TiB)"
SAVED = re.compile(rf"^snapshot (?P<id>\S+) saved: \d+ files, \d+ folders, (?P<size>{SIZE}) "
                   rf"\((?P<new>{SIZE}) new\) in [\d.]+s", re.MULTILINE)
UNITS = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "TiB": 1024 * 1024 * MiB}
FEWER_COPIES = re.compile(r"only (\d+) of (\d+) copies")
#: Seconds within which the manager must bring every chunk back to two live copies.
HEAL_TIMEOUT = 30.0
#: Seconds a backup or restore of the ~200 MiB sources may take; other commands get 60.
BIG_COMMAND_TIMEOUT = 90.0
COMMAND_TIMEOUT = 60.0


# --- sources and how to compare them -------------------------------------------------------


@attrs.frozen
class Source:
    path: Path
    size: int


def write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_source(root: Path, big_mib: list[float], name: str = "src") -> Source:
    """``root/name``: random files of about ``big_mib`` MiB each, small files, a link."""
    src = root / name
    src.mkdir()
    sizes = []
    for index, mib in enumerate(big_mib):
        size = int(mib * MiB) + 1000 + index
        with open(src / f"big{index}.bin", "wb") as f:
            for start in range(0, size, MiB):
                f.write(os.urandom(min(MiB, size - start)))
        sizes.append(size)
    small = {
        "notes.txt": f"notes {os.urandom(8).hex()}\n".encode(),
        "empty.txt": b"",
        "folder/small.bin": os.urandom(40_000),
        "folder/deeper/tiny.txt": os.urandom(5),
    }
    for path, data in small.items():
        write(src / path, data)
        sizes.append(len(data))
    (src / "folder/link to notes").symlink_to("../notes.txt")
    return Source(src, sum(sizes))


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by relative path: ``dir``, ``file`` or ``link -> target``."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                entries[relative] = f"link -> {os.readlink(path)}"
            else:
                entries[relative] = "dir" if path.is_dir() else "file"
    return entries


def assert_same_tree(source: Path, restored: Path):
    expected, actual = tree(source), tree(restored)
    assert actual == expected, (f"restored entries differ: missing {sorted(set(expected) - set(actual))}, "
                                f"unexpected {sorted(set(actual) - set(expected))}")
    for path, kind in expected.items():
        if kind == "file":
            assert filecmp.cmp(source / path, restored / path, shallow=False), f"{path} differs"


def restore_and_compare(cluster, cwd: Path, sources: list[Source], snapshot: str = "latest",
                        target: str = "restored", timeout: float = BIG_COMMAND_TIMEOUT) -> float:
    """Restore ``snapshot`` into ``cwd/target`` and compare it with the sources; the seconds taken."""
    started = time.monotonic()
    result = cluster.sdbackup("restore", snapshot, "--target", cwd / target, cwd=cwd, timeout=timeout)
    elapsed = time.monotonic() - started
    assert result.stderr.strip() == "", result.describe()
    assert sorted(os.listdir(cwd / target)) == sorted(s.path.name for s in sources)
    for source in sources:
        assert_same_tree(source.path, cwd / target / source.path.name)
    return elapsed


def parse_size(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


# --- what the cluster shows ------------------------------------------------------------------


def snapshot_chunks(cluster, cwd: Path, snapshot: str = "latest") -> int:
    """What a repository of one snapshot stores, as ``sdbackup ls --chunks`` shows it: its
    files' chunks (all distinct here: the bytes are random), a tree per folder and one for the
    root, the snapshot object itself, and the repository's key object."""
    listing = cluster.sdbackup("ls", "--chunks", snapshot, cwd=cwd).stdout
    data = sum(int(count) for count in re.findall(r" (\d+) chunks?  ", listing))
    folders = sum(1 for line in listing.splitlines() if line.split("  ")[0].endswith("/"))
    return data + folders + 3


def copies(servers) -> Counter:
    """How many of ``servers`` hold a chunk file of each chunk."""
    return Counter(chunk for server in servers for chunk in server.chunk_files())


def stored_bytes(servers) -> int:
    """Bytes in the chunk files of ``servers`` (every copy counted)."""
    return sum(os.lstat(Path(folder) / name).st_size
               for server in servers for folder, _, names in os.walk(server.chunk_dir) for name in names)


def chunk_file(server, chunk_id: str) -> Path:
    """The file of a chunk or object copy (snapshot objects have a folder of their own)."""
    path = server.chunk_dir / chunk_id[:2] / chunk_id
    return path if path.exists() else server.data / "snapshots" / chunk_id


def status(cluster, cwd: Path) -> tuple[dict[str, tuple[str, int]], int, str]:
    """``({server name: (alive|dead, chunks)}, under-replicated, stdout)`` of ``sdbackup status``."""
    result = cluster.sdbackup("status", cwd=cwd)
    rows = {}
    for line in result.stdout.splitlines():
        match = STATUS_ROW.match(line)
        if match is None:
            continue
        owners = [s for s in cluster.servers if match["address"].endswith(f":{s.port}")]
        assert len(owners) == 1, f"status row for no server of the cluster: {line!r}"
        rows[owners[0].name] = (match["state"], int(match["chunks"]))
    under = UNDER_REPLICATED.search(result.stdout)
    assert under is not None, f"no 'N under-replicated' in:\n{result.stdout}"
    return rows, int(under.group(1)), result.stdout


def poll(what: str, probe, timeout: float, interval: float = 0.1):
    """Call ``probe()`` -> ``(done, detail)`` until done; ``detail``. Fails at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        done, detail = probe()
        if done:
            return detail
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s; last seen:\n{detail}")
        time.sleep(interval)


def wait_for_status(cluster, cwd: Path, alive, dead=(), under: int | None = 0,
                    timeout: float = HEAL_TIMEOUT) -> tuple[dict, int, str]:
    """Poll ``sdbackup status`` until it shows ``alive`` alive, ``dead`` dead and ``under``
    chunks under-replicated (any number with None)."""
    wanted = {s.name: "alive" for s in alive} | {s.name: "dead" for s in dead}

    def probe():
        rows, count, stdout = status(cluster, cwd)
        states = {name: rows.get(name, ("absent",))[0] for name in wanted}
        return states == wanted and under in (None, count), (rows, count, stdout)

    return poll(f"status showing {wanted} and {under} under-replicated", probe, timeout, 0.2)


def wait_for_two_copies(cluster, cwd: Path, live, chunks: int, dead=(), timeout: float = HEAL_TIMEOUT):
    """Until the ``live`` servers' chunk files hold each of the ``chunks`` chunks exactly twice and
    ``sdbackup status`` shows 0 under-replicated (``live`` alive, ``dead`` dead).

    Fails at once when a chunk has a third copy: chunks are never deleted, so it stays."""
    def on_disk():
        held = copies(live)
        assert_no_third_copy(held, live)
        return len(held) == chunks and set(held.values()) == {2}, Counter(held.values())

    started = time.monotonic()
    poll(f"every one of {chunks} chunks on two live servers", on_disk, timeout, 0.05)
    wait_for_status(cluster, cwd, live, dead, under=0, timeout=max(timeout - (time.monotonic() - started), 5))
    held = copies(live)  # the status agrees, and nothing was copied a third time meanwhile
    assert_no_third_copy(held, live)
    assert len(held) == chunks and set(held.values()) == {2}, Counter(held.values())


def assert_no_third_copy(held: Counter, servers):
    extra = {chunk[:16]: [s.name for s in servers if chunk in s.chunk_files()]
             for chunk, count in held.items() if count > 2}
    assert not extra, f"chunks copied more times than the replication factor: {extra}"


def check_counts(stdout: str) -> dict[str, int]:
    """The ``missing``, ``under-replicated`` and ``corrupt`` counts of ``sdbackup check``."""
    counts = {}
    for word in ("missing", "under-replicated", "corrupt"):
        match = re.search(rf"\b(\d+) {word}\b", stdout)
        assert match is not None, f"no '<N> {word}' in the check's output:\n{stdout}"
        counts[word] = int(match.group(1))
    return counts


def assert_one_clear_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.describe()


# --- a healthy cluster ---------------------------------------------------------------------


def test_check_on_a_healthy_cluster_exits_0(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [2, 1])
    cluster.backup("src", cwd=tmp_path)

    for args in (["check"], ["check", "--read-data"]):
        result = cluster.sdbackup(*args, cwd=tmp_path, check=False)
        assert result.returncode == 0, result.describe()
        assert result.stderr.strip() == "", result.describe()
        assert check_counts(result.stdout) == {"missing": 0, "under-replicated": 0, "corrupt": 0}
    restore_and_compare(cluster, tmp_path, [source])


def test_restore_of_several_large_files_at_once(start_cluster, tmp_path):
    # Files restored side by side share the client's chunk slots: none may wait for a slot
    # while holding fetched chunks (this restore once stalled for ever).
    cluster = start_cluster()
    source = make_source(tmp_path, [25, 25, 25, 25])
    cluster.backup("src", cwd=tmp_path)

    restore_and_compare(cluster, tmp_path, [source], timeout=30)  # it takes about a second


# --- servers dying ---------------------------------------------------------------------------


def test_backup_with_a_server_killed_before_it_keeps_two_copies_on_the_two_live_ones(
        start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [2.5, 1.5, 0.7])
    # The victim is the server without a copy of the repository's key object, so that every
    # chunk the cluster holds ends on the two live ones.
    victim = next(s for s in cluster.servers if not s.chunk_files())
    live = [s for s in cluster.servers if s is not victim]
    cluster.kill(victim.process)

    # At once: the manager may still count the victim alive, the client must go around it.
    result = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)

    assert result.returncode == 0, result.describe()
    assert result.stderr.strip() == "", result.describe()
    held = {s.name: s.chunk_files() for s in cluster.servers}
    chunks = snapshot_chunks(cluster, tmp_path)
    assert held[victim.name] == set()
    assert len(held[live[0].name]) == chunks, result.describe()
    assert held[live[0].name] == held[live[1].name]
    wait_for_status(cluster, tmp_path, alive=live, dead=[victim], under=0)

    def counts_shown():  # they come with the heartbeats
        rows = status(cluster, tmp_path)[0]
        return all(rows[s.name] == ("alive", chunks) for s in live), rows

    poll("status showing the live servers' chunk counts", counts_shown, timeout=10, interval=0.2)
    restore_and_compare(cluster, tmp_path, [source])


def test_backup_goes_on_when_a_server_is_killed_during_it(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [25] * 8)  # 200 MiB
    victim = cluster.servers[1]
    started = time.monotonic()
    backup = cluster.start_sdbackup("backup", "src", cwd=tmp_path)

    def under_way():  # a quarter of the copies on disk
        stored = stored_bytes(cluster.servers)
        return stored >= 2 * source.size / 4 or not backup.running(), stored

    stored = poll("the backup under way", under_way, timeout=60, interval=0.02)
    assert backup.running(), f"the backup ended before the kill ({stored / MiB:.0f} MiB stored)"
    cluster.kill(victim.process)
    killed = time.monotonic()
    result = backup.wait(BIG_COMMAND_TIMEOUT)
    ended = time.monotonic()

    assert result.returncode == 0, result.describe()  # two servers left: two copies of every chunk
    assert FEWER_COPIES.search(result.stderr) is None, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    cluster.snapshot_id(result.stdout)
    elapsed = restore_and_compare(cluster, tmp_path, [source])
    print(f"\nbackup of {source.size / MiB:.0f} MiB: server killed after {killed - started:.1f} s "
          f"({stored / MiB:.0f} MiB of copies on disk), backup done {ended - killed:.1f} s later; "
          f"restore with that server down: {elapsed:.1f} s, {source.size / MiB / elapsed:.0f} MiB/s")


def test_restore_goes_on_when_a_server_is_killed_during_it(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [25] * 8)  # 200 MiB
    cluster.sdbackup("backup", "src", cwd=tmp_path, timeout=BIG_COMMAND_TIMEOUT)
    victim = max(cluster.servers, key=lambda s: len(s.chunk_files()))
    target = tmp_path / "restored"
    restore = cluster.start_sdbackup("restore", "latest", "--target", target, cwd=tmp_path)

    def under_way():
        written = sum(os.lstat(Path(folder) / name).st_size
                      for folder, _, names in os.walk(target) for name in names)
        return written >= source.size // 5 or not restore.running(), written

    written = poll("the restore under way", under_way, timeout=60, interval=0.02)
    assert restore.running(), f"the restore ended before the kill ({written} bytes written)"
    cluster.kill(victim.process)
    result = restore.wait(BIG_COMMAND_TIMEOUT)

    assert result.returncode == 0, result.describe()
    assert result.stderr.strip() == "", result.describe()
    assert_same_tree(source.path, target / "src")
    print(f"\nrestore of {source.size / MiB:.0f} MiB: a server holding {len(victim.chunk_files())} "
          f"chunks killed once {written / MiB:.0f} MiB were written")


def test_chunks_of_a_killed_server_are_copied_back_to_two_live_copies(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [10] * 5)
    cluster.backup("src", cwd=tmp_path)
    chunks = snapshot_chunks(cluster, tmp_path)
    assert len(copies(cluster.servers)) == chunks and set(copies(cluster.servers).values()) == {2}
    victim = max(cluster.servers, key=lambda s: len(s.chunk_files()))
    survivors = [s for s in cluster.servers if s is not victim]
    lost = victim.chunk_files()
    lost_mib = sum(chunk_file(victim, c).stat().st_size - CHUNK_HEADER for c in lost) / MiB

    cluster.kill(victim.process)
    killed = time.monotonic()
    poll("every chunk on both survivors",
         lambda: (all(len(s.chunk_files()) == chunks for s in survivors),
                  {s.name: len(s.chunk_files()) for s in survivors}), HEAL_TIMEOUT, 0.05)
    on_disk = time.monotonic() - killed
    wait_for_two_copies(cluster, tmp_path, survivors, chunks, dead=[victim])
    shown = time.monotonic() - killed

    print(f"\nre-replication: {len(lost)} chunks ({lost_mib:.1f} MiB) of a SIGKILLed server back to "
          f"2 live copies on disk {on_disk:.2f} s after the kill, status showing 0 under-replicated "
          f"after {shown:.2f} s (--dead-after 1.5 --repair-interval 0.5 --repair-rate 500)")
    # Every chunk is now on both survivors: any one of them alone restores everything.
    cluster.kill(survivors[0].process)
    restore_and_compare(cluster, tmp_path, [source])


def test_a_silent_server_is_declared_dead_repaired_around_and_alive_again(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [4, 4])
    cluster.backup("src", cwd=tmp_path)
    chunks = snapshot_chunks(cluster, tmp_path)
    victim = max(cluster.servers, key=lambda s: len(s.chunk_files()))
    others = [s for s in cluster.servers if s is not victim]

    os.kill(victim.process.popen.pid, signal.SIGSTOP)  # it hangs: its connections stay open
    try:
        stopped = time.monotonic()
        wait_for_status(cluster, tmp_path, alive=others, dead=[victim], under=None, timeout=15)
        silent = time.monotonic() - stopped
        cluster.manager.wait_for(re.compile(r"declared dead"), timeout=5)
        assert silent >= 1.0, f"declared dead {silent:.2f} s after its last heartbeat at most"
        print(f"\nserver hung by SIGSTOP shown dead after {silent:.1f} s (--dead-after 1.5)")
        wait_for_two_copies(cluster, tmp_path, others, chunks, dead=[victim])
    finally:
        os.kill(victim.process.popen.pid, signal.SIGCONT)

    # Back: it reconnects by itself and is counted alive again, with its copies.
    wait_for_status(cluster, tmp_path, alive=cluster.servers, under=0)
    restore_and_compare(cluster, tmp_path, [source])


# --- the manager dying -----------------------------------------------------------------------


def test_manager_killed_and_restarted_keeps_snapshots_and_takes_new_backups(start_cluster, tmp_path):
    cluster = start_cluster()
    first_source = make_source(tmp_path, [2.5, 1.2])
    first = cluster.backup("src", cwd=tmp_path)

    marks = cluster.kill_manager()
    cluster.start_manager_again()

    listed = cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    assert [line.split()[0] for line in listed.splitlines()[1:]] == [first], listed
    cluster.wait_registered_since(marks)
    wait_for_status(cluster, tmp_path, alive=cluster.servers, under=0)
    second_source = make_source(tmp_path, [1.5, 0.5], name="src2")
    result = cluster.sdbackup("backup", "src2", cwd=tmp_path)
    assert result.stderr.strip() == "", result.describe()
    second = cluster.snapshot_id(result.stdout)
    assert second != first
    restore_and_compare(cluster, tmp_path, [first_source], snapshot=first, target="first")
    restore_and_compare(cluster, tmp_path, [second_source], snapshot=second, target="second")


def test_backup_fails_clearly_when_the_manager_dies_and_a_rerun_sends_only_the_rest(
        start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [12.5] * 8)  # 100 MiB
    backup = cluster.start_sdbackup("backup", "src", cwd=tmp_path)

    def under_way():  # 60% of the copies on disk
        stored = stored_bytes(cluster.servers)
        return stored >= 2 * source.size * 0.6 or not backup.running(), stored

    stored = poll("the backup under way", under_way, timeout=60, interval=0.02)
    assert backup.running(), f"the backup ended before the kill ({stored / MiB:.0f} MiB stored)"
    marks = cluster.kill_manager()
    failed = backup.wait(COMMAND_TIMEOUT)

    assert failed.returncode == 1, failed.describe()
    assert SAVED.search(failed.stdout) is None, failed.describe()
    assert_one_clear_line(failed)
    assert "manager" in failed.stderr, failed.describe()
    print(f"\nbackup with the manager killed: exit status {failed.returncode}, {failed.stderr.strip()!r}")

    cluster.start_manager_again()
    cluster.wait_registered_since(marks)
    wait_for_status(cluster, tmp_path, alive=cluster.servers, under=None)
    rerun = cluster.sdbackup("backup", "src", cwd=tmp_path, timeout=BIG_COMMAND_TIMEOUT)
    saved = SAVED.search(rerun.stdout)
    assert saved is not None and rerun.stderr.strip() == "", rerun.describe()
    total, new = parse_size(saved["size"]), parse_size(saved["new"])
    print(f"\nmanager killed with {stored / MiB:.0f} MiB of copies on disk; the re-run sent {saved['new']} "
          f"of {saved['size']}")
    assert total == pytest.approx(source.size, rel=0.01), rerun.describe()
    assert new <= 0.5 * total, f"the re-run sent again what was stored:\n{rerun.describe()}"
    listed = cluster.sdbackup("snapshots", cwd=tmp_path).stdout
    assert [line.split()[0] for line in listed.splitlines()[1:]] == [saved["id"]], listed
    restore_and_compare(cluster, tmp_path, [source])


# --- damaged and lost chunk files ------------------------------------------------------------


def damage_two_copies(server) -> tuple[str, str]:
    """Flip a byte of one chunk file of ``server`` and truncate another; their chunk ids."""
    big = sorted(c for c in server.chunk_files() if chunk_file(server, c).stat().st_size > 100_000)
    assert len(big) >= 2, f"{server.name} holds too few chunks: {big}"
    flipped, truncated = big[0], big[1]
    with open(chunk_file(server, flipped), "r+b") as f:
        f.seek(CHUNK_HEADER + 12_345)
        byte = f.read(1)
        f.seek(CHUNK_HEADER + 12_345)
        f.write(bytes([byte[0] ^ 0xFF]))
    path = chunk_file(server, truncated)
    os.truncate(path, path.stat().st_size // 2)
    return flipped, truncated


def quarantined(server) -> list[str]:
    return sorted(os.listdir(server.data / "quarantine"))


def test_scrub_quarantines_a_corrupt_and_a_truncated_copy_and_the_repair_copies_them_again(
        start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [3, 3])
    cluster.backup("src", cwd=tmp_path)
    chunks = snapshot_chunks(cluster, tmp_path)
    server = max(cluster.servers, key=lambda s: len(s.chunk_files()))

    bad = damage_two_copies(server)

    names = poll("both bad copies in quarantine/", lambda: (
        all(any(n.startswith(c) for n in quarantined(server)) for c in bad), quarantined(server)),
        timeout=20, interval=0.05)
    assert len(names) == 2, names
    wait_for_two_copies(cluster, tmp_path, cluster.servers, chunks)
    assert quarantined(server) == names  # set aside, never deleted
    restore_and_compare(cluster, tmp_path, [source])


def test_check_read_data_reports_corrupt_copies_and_exits_3_then_all_is_repaired(
        start_cluster, tmp_path):
    # No background scrub during the test: only the check finds the bad copies.
    cluster = start_cluster(server_options=["--heartbeat", 0.3, "--scrub-interval", 3600,
                                            "--scrub-rate", 500])
    source = make_source(tmp_path, [3, 3])
    cluster.backup("src", cwd=tmp_path)
    chunks = snapshot_chunks(cluster, tmp_path)
    server = max(cluster.servers, key=lambda s: len(s.chunk_files()))
    bad = damage_two_copies(server)

    result = cluster.sdbackup("check", "--read-data", cwd=tmp_path, check=False)

    assert result.returncode == 3, result.describe()
    counts = check_counts(result.stdout)
    assert counts["corrupt"] == 2 and counts["missing"] == 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert all(any(n.startswith(c) for n in quarantined(server)) for c in bad), quarantined(server)
    wait_for_two_copies(cluster, tmp_path, cluster.servers, chunks)
    for args in (["check"], ["check", "--read-data"]):
        again = cluster.sdbackup(*args, cwd=tmp_path, check=False)
        assert again.returncode == 0, again.describe()
        assert check_counts(again.stdout) == {"missing": 0, "under-replicated": 0, "corrupt": 0}
    restore_and_compare(cluster, tmp_path, [source])


def test_server_back_with_an_empty_data_folder_is_reconciled_and_refilled(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [3, 2, 1])
    cluster.backup("src", cwd=tmp_path)
    chunks = snapshot_chunks(cluster, tmp_path)
    victim = max(cluster.servers, key=lambda s: len(s.chunk_files()))
    assert len(victim.chunk_files()) > 0

    cluster.kill(victim.process)
    shutil.rmtree(victim.data)
    cluster.restart_server(victim)  # same port, same (now empty) folder

    assert (victim.data / "chunks").is_dir()
    wait_for_two_copies(cluster, tmp_path, cluster.servers, chunks)
    restore_and_compare(cluster, tmp_path, [source])


# --- fewer servers than copies, and data with no good copy -----------------------------------


def test_backup_with_one_live_server_warns_and_the_repair_heals_it_later(start_cluster, tmp_path):
    cluster = start_cluster()
    source = make_source(tmp_path, [2, 1])
    # The repository's key object, all the cluster holds yet, is on two of the servers: the
    # one left alive is one of them (with none, no command could open the repository).
    alone = next(s for s in cluster.servers if s.chunk_files())
    gone = [s for s in cluster.servers if s is not alone]
    for server in gone:
        cluster.kill(server.process)
    wait_for_status(cluster, tmp_path, alive=[alone], dead=gone, under=None, timeout=10)

    result = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)

    assert result.returncode == 3, result.describe()
    assert FEWER_COPIES.search(result.stderr) is not None, result.describe()
    assert FEWER_COPIES.search(result.stderr).groups() == ("1", "2"), result.describe()
    cluster.snapshot_id(result.stdout)
    chunks = snapshot_chunks(cluster, tmp_path)
    assert len(alone.chunk_files()) == chunks
    degraded = cluster.sdbackup("check", cwd=tmp_path, check=False)
    assert degraded.returncode == 3, degraded.describe()
    assert check_counts(degraded.stdout)["under-replicated"] == chunks, degraded.describe()
    # The key object's other holder comes back first: had the repair copied the key to the
    # empty server meanwhile, the holder's return would rightly leave it three copies.
    for server in sorted(gone, key=lambda s: not s.chunk_files()):
        cluster.restart_server(server)
    wait_for_two_copies(cluster, tmp_path, cluster.servers, chunks)
    restore_and_compare(cluster, tmp_path, [source])


def test_a_chunk_with_no_good_copy_left_makes_check_exit_1_and_only_its_file_fails(
        start_cluster, tmp_path):
    # (A plaintext repository: the test finds the chunk to damage by its bytes.)
    cluster = start_cluster(server_options=["--heartbeat", 0.3, "--scrub-interval", 3600,
                                            "--scrub-rate", 500], repository="none")
    source = make_source(tmp_path, [1.5])
    damaged = make_source(tmp_path, [0.15], name="damaged")  # under the smallest chunk: one chunk
    cluster.backup("src", "damaged", cwd=tmp_path)
    data = (damaged.path / "big0.bin").read_bytes()
    both = [chunk_file(s, c) for s in cluster.servers for c in s.chunk_files()
            if chunk_file(s, c).read_bytes()[CHUNK_HEADER:] == data]
    assert len(both) == 2, both
    for path in both:  # both copies of damaged/big0.bin's only chunk
        os.truncate(path, CHUNK_HEADER + 10)

    result = cluster.sdbackup("check", "--read-data", cwd=tmp_path, check=False)

    assert result.returncode == 1, result.describe()
    counts = check_counts(result.stdout)
    assert counts["missing"] == 1 and counts["corrupt"] == 2, result.describe()
    restored = cluster.sdbackup("restore", "latest", "--target", tmp_path / "restored", cwd=tmp_path,
                                check=False)
    assert restored.returncode == 3, restored.describe()
    assert "big0.bin" in restored.stderr, restored.describe()
    assert_same_tree(source.path, tmp_path / "restored/src")
    # Every other file of that folder is back; the damaged one is nowhere, not even half written.
    (damaged.path / "big0.bin").unlink()
    assert_same_tree(damaged.path, tmp_path / "restored/damaged")
