"""Benchmark sdbackup against restic, borg and cp -a on this machine, and check the goals.

Makes its data sets under bench_work/data/ (kept between runs): a file of
random bytes (1 GiB by default), a copy of it with 1 MiB of new bytes inserted
near the middle, and a copy of this Python's standard library (many small
files). Starts a real cluster (manager + 3 servers, separate ``twistd``
processes, replication factor 2) and times whole processes, one step at a
time, with the page cache dropped before each step: first backup, unchanged
backup and restore of each set, and the backup of the edited file. restic and
borg (installed from Debian's packages when missing) do the same work on local
repositories, and ``cp -a`` is the floor. Every restore is compared with its
original. It prints one table and then each goal with its measured ratio.

    python bench/bench.py [--size-mib 1024] [--only sdbackup,restic,borg,cp] [--keep]
"""

import argparse
import ctypes
import dataclasses
import fcntl
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bench/ is this script's folder, first on sys.path: peers.py beside it imports as `peers`.
from peers import Borg, Command, Copy, DataSet, Restic, Sdbackup, Tool, install_missing  # noqa: E402

from sdbackup.localcluster import Process  # noqa: E402

WORK = os.path.join(ROOT, "bench_work")
DATA = os.path.join(WORK, "data")
MiB = 1024 * 1024
TOOLS = {"sdbackup": Sdbackup, "restic": Restic, "borg": Borg, "cp": Copy}
#: Where the new MiB goes in the edited copy: near the middle, on no power-of-two boundary,
#: so fixed-size chunks cannot line up again by luck after the insertion.
INSERT_SKEW = 12_345
TICK = os.sysconf("SC_CLK_TCK")


class BenchFailed(Exception):
    pass


@dataclasses.dataclass
class Step:
    key: str
    data: str  # key of the data set
    title: str
    restores: str = ""  # for a restore: the key of the backup it restores

    @property
    def is_restore(self) -> bool:
        return bool(self.restores)


STEPS = [
    Step("big-first", "big", "first backup"),
    Step("big-again", "big", "unchanged backup (a second identical copy)"),
    Step("big-restore", "big", "restore", restores="big-again"),
    Step("edited", "edited", "backup after the first"),
    Step("tree-first", "tree", "first backup"),
    Step("tree-again", "tree", "unchanged backup"),
    Step("tree-restore", "tree", "restore", restores="tree-again"),
]


@dataclasses.dataclass
class Row:
    tool: str
    step: Step
    data: DataSet
    seconds: float
    sync_seconds: float
    rss: int  # the command's peak RSS
    cpu: float  # user + system seconds of the command (and of the cluster, for sdbackup)
    sent: int | None = None
    stored: int | None = None  # growth of the repository / the servers' chunk folders
    loopback: int | None = None
    manager_rss: int | None = None
    server_rss: int | None = None
    rounds: int = 1
    spread: float = 0.0  # (slowest - fastest) / median, over the rounds


# -- data sets ---------------------------------------------------------------------------------

def random_file(path: str, size: int) -> bool:
    """Write ``size`` random bytes to ``path`` unless a file of that size is there; True if written."""
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return False
    temp = path + ".part"
    with open(temp, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    os.replace(temp, path)
    return True


def _read_at(path: str, offset: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def edited_file(path: str, original: str, offset: int, written: bool):
    """``original`` with 1 MiB of new random bytes inserted at ``offset``, unless already there."""
    size = os.path.getsize(original)
    if not written and os.path.isfile(path) and os.path.getsize(path) == size + MiB:
        probe = 4096
        if (_read_at(path, offset - probe, probe) == _read_at(original, offset - probe, probe)
                and _read_at(path, offset + MiB, probe) == _read_at(original, offset, probe)
                and _read_at(path, offset, probe) != _read_at(original, offset, probe)
                and _read_at(path, size + MiB - probe, probe) == _read_at(original, size - probe, probe)):
            return
    temp = path + ".part"
    with open(original, "rb") as src, open(temp, "wb") as dst:
        left = offset
        while left:
            block = src.read(min(left, 8 * MiB))
            dst.write(block)
            left -= len(block)
        dst.write(os.urandom(MiB))
        shutil.copyfileobj(src, dst, 8 * MiB)
    os.replace(temp, path)


def count_tree(path: str) -> tuple[int, int]:
    """Files (and links) under ``path`` and their bytes."""
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return files, size


def stdlib_tree(path: str) -> tuple[int, int]:
    """A copy of the running interpreter's standard library (without site-packages)."""
    marker = path + ".done"
    if os.path.isdir(path) and os.path.isfile(marker):
        with open(marker) as f:
            expected = f.read().split()
        found = count_tree(path)
        if [str(n) for n in found] == expected:
            return found
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(marker):
        os.unlink(marker)
    shutil.copytree(sysconfig.get_paths()["stdlib"], path, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages"))
    found = count_tree(path)
    with open(marker, "w") as f:
        f.write(f"{found[0]} {found[1]}\n")
    return found


def make_data_sets(size_mib: int) -> dict[str, DataSet]:
    os.makedirs(DATA, exist_ok=True)
    size = size_mib * MiB
    big = f"big-{size_mib}MiB.bin"
    edited = f"big-{size_mib}MiB-edited.bin"
    written = random_file(os.path.join(DATA, big), size)
    edited_file(os.path.join(DATA, edited), os.path.join(DATA, big), size // 2 + INSERT_SKEW, written)
    files, tree_size = stdlib_tree(os.path.join(DATA, "stdlib"))
    name = f"{size_mib // 1024} GiB" if size_mib % 1024 == 0 else f"{size_mib} MiB"
    return {
        "big": DataSet(f"{name} random file", DATA, big, size, 1),
        "edited": DataSet(f"the {name} file with 1 MiB inserted", DATA, edited, size + MiB, 1),
        "tree": DataSet(f"stdlib tree, {files} files", DATA, "stdlib", tree_size, files),
    }


# -- measuring ---------------------------------------------------------------------------------

def drop_caches() -> str:
    """Flush dirty pages; drop the page cache where the kernel lets us. Says which it did."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return "sync only (page cache not droppable here)"
    return "sync + page cache dropped"


def own_network() -> bool:
    """Move this process (and so every process it starts later) into a network namespace of its own,
    with only ``lo`` up, so the loopback counters see this benchmark's traffic and no one else's.
    Needs root; False (and nothing changed) where it is not allowed."""
    clone_newnet, siocgifflags, siocsifflags, iff_up = 0x40000000, 0x8913, 0x8914, 0x1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(clone_newnet) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))
    return True


def loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # bytes transmitted (= received on lo)
    return 0


def proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def reset_peak(process: Process) -> bool:
    """Start VmHWM afresh (``5`` > clear_refs), so each step gets its own peak."""
    try:
        with open(f"/proc/{process.popen.pid}/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        return False
    return True


def run(command: Command, log: str) -> tuple[float, int, float, str]:
    """Run a whole process: wall seconds, peak RSS in bytes, CPU seconds, its standard output."""
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        start = time.monotonic()
        process = subprocess.Popen(command.argv, cwd=command.cwd, env=command.env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.monotonic() - start
    process.returncode = code = os.waitstatus_to_exitcode(status)
    with open(log + ".out", errors="replace") as f:
        output = f.read()
    if code != 0:
        with open(log + ".err", errors="replace") as f:
            errors = f.read()[-2000:]
        raise BenchFailed(f"`{' '.join(command.argv)}` (in {command.cwd}) exited with status {code}:\n"
                          f"{output[-1000:]}{errors}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, output


def verify(original: str, restored: str):
    """The restored copy must equal the original: bytes, links, file and folder modes."""
    if not os.path.lexists(restored):
        raise BenchFailed(f"restore left nothing at {restored}")
    if os.path.isfile(original):
        if subprocess.run(["cmp", "-s", original, restored]).returncode:
            raise BenchFailed(f"restored {restored} differs from {original}")
        paths = ["."]
    else:
        result = subprocess.run(["diff", "-r", "-q", "--no-dereference", original, restored],
                                capture_output=True, text=True)
        if result.returncode:
            raise BenchFailed(f"restored {restored} differs from {original}:\n"
                              f"{(result.stdout + result.stderr)[:3000]}")
        paths = [os.path.relpath(os.path.join(folder, name), original)
                 for folder, dirs, files in os.walk(original) for name in dirs + files]
    for rel in paths:
        a, b = os.lstat(os.path.normpath(os.path.join(original, rel))), os.lstat(
            os.path.normpath(os.path.join(restored, rel)))
        if a.st_mode != b.st_mode:
            raise BenchFailed(f"restored {os.path.join(restored, rel)} has mode {b.st_mode:o}, "
                              f"the original {a.st_mode:o}")


def run_tool(tool: Tool, data: dict[str, DataSet], logs: str, round_: int, keep: bool):
    """Every step of one tool on a fresh repository or cluster; yields a Row per step."""
    tool.start()
    failed = False
    try:
        for step in STEPS:
            if step.key in tool.steps:
                yield measure(tool, step, data[step.data], os.path.join(logs, f"{round_}-"))
    except BaseException:
        failed = True
        report = tool.failure_report()
        if report:
            print(report, file=sys.stderr)
        raise
    finally:
        tool.stop(keep or failed)
        if failed:
            print(f"kept {os.path.relpath(tool.work, ROOT)}/ to look at", file=sys.stderr)


def combine(rows: list[Row]) -> Row:
    """The round with the median time, with the highest peak memory of all rounds."""
    ordered = sorted(rows, key=lambda r: r.seconds)
    middle = ordered[(len(ordered) - 1) // 2]
    peak = {name: max(getattr(r, name) for r in rows) if getattr(middle, name) is not None else None
            for name in ("rss", "manager_rss", "server_rss")}
    spread = (ordered[-1].seconds - ordered[0].seconds) / middle.seconds
    return dataclasses.replace(middle, rounds=len(rows), spread=spread, **peak)


def measure(tool: Tool, step: Step, data: DataSet, log_prefix: str) -> Row:
    target = os.path.join(WORK, "restore")
    if step.is_restore:
        shutil.rmtree(target, ignore_errors=True)
        command = tool.restore(step.restores, target)
    else:
        command = tool.backup(step.key, data)
    stored_before = tool.stored()
    cluster = tool.cluster()
    drop_caches()
    for process in cluster:
        reset_peak(process)
    cluster_cpu = sum(proc_cpu(p.popen.pid) for p in cluster)
    lo = loopback_bytes()
    seconds, rss, cpu, output = run(command, f"{log_prefix}{tool.name.split()[0]}-{step.key}")
    lo = loopback_bytes() - lo
    sync_start = time.monotonic()
    os.sync()
    sync_seconds = time.monotonic() - sync_start
    row = Row(tool.name, step, data, seconds, sync_seconds, rss, cpu)
    if cluster:
        row.cpu += sum(proc_cpu(p.popen.pid) for p in cluster) - cluster_cpu
        row.loopback = lo
        row.manager_rss = cluster[0].peak_rss()
        row.server_rss = max(p.peak_rss() for p in cluster[1:])
    growth = tool.stored() - stored_before
    if step.is_restore:
        verify(data.path, tool.restored_path(target, data))
        shutil.rmtree(target)
    else:
        row.stored = growth
        row.sent = tool.sent(output, growth)
    tool.after_step(step.key)
    return row


# -- report ------------------------------------------------------------------------------------

def human(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


COLUMNS = [("tool", 10, "<"), ("time s", 7, ">"), ("range", 6, ">"), ("MiB/s", 7, ">"), ("files/s", 8, ">"),
           ("sent", 10, ">"), ("sent%", 6, ">"), ("stored+", 10, ">"), ("loopback", 10, ">"),
           ("peak RSS MiB", 15, ">"), ("cpu s", 6, ">"), ("sync s", 6, ">"),
           ("restic", 7, ">"), ("borg", 6, ">"), ("cp", 6, ">")]


def line(cells: list[str]) -> str:
    return "  " + " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS, strict=True))


def speed_ratio(rows: dict, step: Step, peer: str) -> str:
    """sdbackup's throughput over the peer's on the same work (peer seconds / sdbackup seconds)."""
    mine = rows.get(("sdbackup", step.key))
    key = step.key if peer != "cp -a" else {"big-restore": "big-first", "tree-restore": "tree-first"}.get(
        step.key, step.key)
    theirs = rows.get((peer, key))
    if mine is None or theirs is None:
        return ""
    return f"{theirs.seconds / mine.seconds:.2f}x"


def table(rows: dict, tools: list[str]) -> str:
    out = [line([name for name, _, _ in COLUMNS]).rstrip(),
           "  " + "-" * (sum(width for _, width, _ in COLUMNS) + len(COLUMNS) - 1)]
    for step in STEPS:
        present = [rows[(t, step.key)] for t in tools if (t, step.key) in rows]
        if not present:
            continue
        out.append(f"{present[0].data.name}: {step.title}")
        for row in present:
            is_sd = row.tool == "sdbackup"
            rss = f"{row.rss / MiB:.0f}"
            if row.manager_rss is not None:
                rss += f"/{row.manager_rss / MiB:.0f}/{row.server_rss / MiB:.0f}"
            out.append(line([
                row.tool, f"{row.seconds:.2f}", f"{100 * row.spread:.0f}%" if row.rounds > 1 else "-",
                f"{row.data.size / MiB / row.seconds:.1f}",
                f"{row.data.files / row.seconds:.0f}" if row.data.files > 1 else "-",
                human(row.sent), f"{100 * row.sent / row.data.size:.1f}" if row.sent is not None else "-",
                human(row.stored), human(row.loopback), rss, f"{row.cpu:.1f}", f"{row.sync_seconds:.2f}",
                *(speed_ratio(rows, step, peer) if is_sd else "" for peer in ("restic", "borg", "cp -a")),
            ]).rstrip())
        out.append("")
    return "\n".join(out)


LEGEND = """\
  time s: wall time of the whole process (page cache dropped before it), the median of {rounds} round(s),
  each round on a fresh repository / cluster. range: (slowest - fastest) / median over the rounds. Every
  other figure is the median round's, except peak RSS: the highest of all rounds. sent: sdbackup's
  "(<size> new)" figure, the bytes the client sent to the servers; for restic and borg the repository's
  growth; sent% of the data set's size. stored+: growth of the servers' data_* folders (both copies) or
  of the repository. loopback: bytes over lo during the step (client <-> manager <-> servers, replication
  included). peak RSS MiB: the command's (wait4 ru_maxrss); for sdbackup client/manager/largest server
  (VmHWM, reset before each step). cpu s: user+system seconds of the command, plus the cluster's for
  sdbackup. sync s: the `sync` right after the process (what it left unwritten). restic / borg / cp:
  sdbackup's throughput over that tool's on the same step (its time / sdbackup's: above 1 means sdbackup
  is faster); vs cp, a restore is compared with the copy of the same data.
"""


def goals(rows: dict, size_mib: int) -> tuple[list[str], bool]:
    def get(tool, key):
        return rows.get((tool, key))

    results = []

    def ratio(label, mine, theirs, peer, limit, faster):
        if mine is None or theirs is None:
            results.append((label, "n/a", None, f"needs sdbackup and {peer}"))
            return
        if faster:  # throughput: peer seconds / sdbackup seconds, at least `limit`
            value = theirs.seconds / mine.seconds
            results.append((label, f"{value:.2f}x", value >= limit,
                            f"{mine.seconds:.2f} s vs {theirs.seconds:.2f} s"))
        else:  # time: sdbackup seconds / peer seconds, at most `limit`
            value = mine.seconds / theirs.seconds
            results.append((label, f"{value:.2f}x", value <= limit,
                            f"{mine.seconds:.2f} s vs {theirs.seconds:.2f} s"))

    what = "1 GiB" if size_mib == 1024 else f"{size_mib} MiB"
    ratio(f"first backup of {what}, two copies: >= 1.3x borg's throughput",
          get("sdbackup", "big-first"), get("borg", "big-first"), "borg", 1.3, True)
    ratio("first backup of the std-lib tree: <= 0.8x restic's time",
          get("sdbackup", "tree-first"), get("restic", "tree-first"), "restic", 0.8, False)
    ratio("unchanged re-backup of the tree: <= 1.0x borg's time",
          get("sdbackup", "tree-again"), get("borg", "tree-again"), "borg", 1.0, False)
    ratio(f"restore of {what}: >= 1.5x restic's throughput",
          get("sdbackup", "big-restore"), get("restic", "big-restore"), "restic", 1.5, True)
    for key, label, limit in (("edited", f"edited {what} file: < 5% of its bytes sent again", 0.05),
                              ("big-again", f"second identical copy of {what}: < 1% sent again", 0.01)):
        row = get("sdbackup", key)
        if row is None:
            results.append((label, "n/a", None, "needs sdbackup"))
            continue
        share = row.sent / row.data.size
        peers = ", ".join(f"{t} {100 * rows[(t, key)].sent / row.data.size:.1f}%"
                          for t in ("restic", "borg") if (t, key) in rows)
        results.append((label, f"{100 * share:.1f}%", share < limit,
                        f"{human(row.sent)} of {human(row.data.size)}" + (f"; {peers}" if peers else "")))
    sd_rows = [r for r in rows.values() if r.tool == "sdbackup"]
    if sd_rows:
        peaks = [(r.rss, f"client ({r.step.key})") for r in sd_rows]
        peaks += [(r.manager_rss, f"manager ({r.step.key})") for r in sd_rows]
        peaks += [(r.server_rss, f"a server ({r.step.key})") for r in sd_rows]
        peak, who = max(peaks)
        results.append(("peak memory of every sdbackup process: < 100 MiB", f"{peak / MiB:.0f} MiB",
                        peak < 100 * MiB, f"largest: {who}"))
    else:
        results.append(("peak memory of every sdbackup process: < 100 MiB", "n/a", None, "needs sdbackup"))
    out = []
    width = max(len(label) for label, *_ in results)
    for label, value, met, detail in results:
        verdict = "n/a" if met is None else "MET" if met else "NOT MET"
        out.append(f"  {label:<{width}} {value:>8}  {verdict:<8} {detail}")
    return out, all(met for _, _, met, _ in results if met is not None)


# -- main --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the random file (1024)")
    parser.add_argument("--only", default="sdbackup,restic,borg,cp",
                        help="comma-separated tools to run, of sdbackup,restic,borg,cp")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every step; the table shows each step's median round (3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the repositories and the cluster's folders under bench_work/repos/")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        parser.error(f"unknown tools {unknown}" if unknown else "nothing to run")
    if args.size_mib < 4 or args.repeat < 1:
        parser.error("--size-mib must be at least 4 and --repeat at least 1")
    names = [n for n in TOOLS if n in names]  # run in a fixed order

    started = time.monotonic()
    for name, why in install_missing(names).items():
        print(f"skipping {name}: {why}", flush=True)
        names.remove(name)
    isolated = own_network()  # after apt-get, which needs the real network
    print("preparing the data sets under bench_work/data/ ...", flush=True)
    data = make_data_sets(args.size_mib)
    repos = os.path.join(WORK, "repos")
    logs = os.path.join(WORK, "logs")
    for folder in (repos, logs, os.path.join(WORK, "restore")):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(repos)
    os.makedirs(logs)

    tools = [TOOLS[n](os.path.join(repos, n)) for n in names]
    versions = {}
    runs: dict = {}  # (tool, step key) -> [Row], one per round
    cache_mode = drop_caches()
    total = args.repeat * sum(len([s for s in STEPS if s.key in t.steps]) for t in tools)
    done = 0
    try:
        for round_ in range(1, args.repeat + 1):
            for tool in tools:
                for row in run_tool(tool, data, logs, round_, args.keep):
                    runs.setdefault((row.tool, row.step.key), []).append(row)
                    done += 1
                    print(f"[{done:2}/{total}] round {round_}/{args.repeat} {row.tool:<9} {row.data.name}: "
                          f"{row.step.title}: {row.seconds:.2f} s", flush=True)
                versions[tool.name] = tool.describe()
    except BenchFailed as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
        print(f"(logs of every step in {os.path.relpath(logs, ROOT)}/)", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(os.path.join(WORK, "restore"), ignore_errors=True)
    rows = {key: combine(found) for key, found in runs.items()}

    print()
    print(f"sdbackup benchmark: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
          f"Python {platform.python_version()}; before each step: {cache_mode}")
    print("tools: " + "; ".join(versions.values()))
    for tool in tools:
        if tool.changed_under_us():
            print(f"WARNING: {tool.name}'s source changed while it was measured: the rows mix versions")
    print("sdbackup: manager + 3 servers (separate twistd processes), replication factor 2, TCP over lo "
          + ("in a network namespace of its own" if isolated else
             "(shared with the whole machine: the loopback column counts other processes too)"))
    print("data: " + "; ".join(f"{d.name} ({human(d.size)})" for d in data.values())
          + f"; insertion at byte {args.size_mib * MiB // 2 + INSERT_SKEW}")
    print()
    print(table(rows, [t.name for t in tools]))
    print(LEGEND.format(rounds=args.repeat))
    lines, _ = goals(rows, args.size_mib)
    print("goals (sdbackup, measured in this run" + (")" if args.size_mib == 1024 else
                                                     f" with a {args.size_mib} MiB file, not 1 GiB)"))
    print("\n".join(lines))
    print(f"\nwhole run: {time.monotonic() - started:.0f} s; logs in {os.path.relpath(logs, ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
