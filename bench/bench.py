"""Benchmark sdbackup against restic, borg and cp -a on this machine, and check the goals.

Makes its data sets under bench_work/data/ (kept between runs; see
``data_sets.py``): a file of random bytes (1 GiB by default) and a copy of it
with 1 MiB of new bytes inserted near the middle (set ``big``), a copy of this
Python's standard library (``tree``), a generated tree of 50,000 files shaped
after /usr/share (``tree50k``) and, with ``--million``, a generated tree of
1,000,000 tiny files (``million``). Starts a real cluster (manager + 3 servers,
separate ``twistd`` processes, replication factor 2) and times whole
processes, one step at a time, with the page cache dropped before each step:
first backup, unchanged backup and restore of each set, the backup of the
edited file, the listing of the million files, and the manager's recovery
(its catalog deleted, the time until its 10 snapshots of the 50,000-file tree
are listed again). restic and borg (installed from Debian's packages when
missing) do the same work on local repositories, and ``cp -a`` is the floor.
Every restore is compared with its original. It prints one table and then
each goal with its measured figure.

    python bench/bench.py [--sets big,tree,tree50k,million] [--million] [--million-restic]
                          [--size-mib 1024] [--tree-files 50000] [--million-files 1000000]
                          [--recovery-snapshots 10] [--only sdbackup,restic,borg,cp]
                          [--repeat 3] [--keep]
"""

import argparse
import concurrent.futures
import ctypes
import dataclasses
import fcntl
import multiprocessing
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bench/ is this script's folder, first on sys.path: the modules beside it import by their names.
import data_sets  # noqa: E402
from data_sets import DataSet, edited_file, generated_tree, million_tree, random_file, stdlib_tree  # noqa: E402
from peers import Borg, Command, Copy, Restic, Sdbackup, Tool, install_missing  # noqa: E402
from trash import Trash  # noqa: E402

from sdbackup.localcluster import MANAGER_SERVING, Process  # noqa: E402

WORK = os.path.join(ROOT, "bench_work")
#: What a step or a tool is done with waits here until the round ends (see bench/trash.py).
TRASH = Trash(os.path.join(WORK, "trash"))
DATA = os.path.join(WORK, "data")
MiB = 1024 * 1024
KiB = 1024
TOOLS = {"sdbackup": Sdbackup, "restic": Restic, "borg": Borg, "cp": Copy}
#: Data sets by the name ``--sets`` gives them, and the data keys each brings.
SETS = {"big": ("big", "edited"), "tree": ("tree",), "tree50k": ("tree50k",), "million": ("million",)}
DEFAULT_SETS = "big,tree,tree50k"
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
    kind: str = "backup"  # or "restore", "ls", "recovery"
    once: bool = False  # in the first round only (the million-file steps take minutes)


STEPS = [
    Step("big-first", "big", "first backup"),
    Step("big-again", "big", "unchanged backup (a second identical copy)"),
    Step("big-restore", "big", "restore", restores="big-again", kind="restore"),
    Step("edited", "edited", "backup after the first"),
    Step("tree-first", "tree", "first backup"),
    Step("tree-again", "tree", "unchanged backup"),
    Step("tree-restore", "tree", "restore", restores="tree-again", kind="restore"),
    Step("t50k-first", "tree50k", "first backup"),
    Step("t50k-again", "tree50k", "unchanged backup"),
    Step("t50k-restore", "tree50k", "restore", restores="t50k-again", kind="restore"),
    Step("t50k-recovery", "tree50k", "manager recovery: catalog deleted, until `snapshots` lists all",
         kind="recovery"),
    Step("m-first", "million", "first backup", once=True),
    Step("m-again", "million", "unchanged backup", once=True),
    Step("m-ls", "million", "`ls` of the whole snapshot", kind="ls", once=True),
    Step("m-restore", "million", "restore", restores="m-again", kind="restore", once=True),
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
    catalog: int | None = None  # growth of the manager's catalog (sdbackup backups)
    lines: int | None = None  # lines an `ls` printed
    #: Recovery: unchanged backups made to reach the snapshot count, and per such snapshot the
    #: growth of the catalog and of the servers' folders.
    extra_backups: int = 0
    extra_catalog: float | None = None
    extra_stored: float | None = None
    ready: float | None = None  # recovery: seconds until the manager logged "ready"
    note: str = ""  # one more line under the row


# -- data sets ---------------------------------------------------------------------------------

def make_data_sets(keys: set[str], options) -> dict[str, DataSet]:
    """The data sets of ``keys``, made under bench_work/data/ unless they are there already."""
    os.makedirs(DATA, exist_ok=True)
    found = {}
    if "big" in keys or "edited" in keys:
        size_mib = options.size_mib
        size = size_mib * MiB
        big = f"big-{size_mib}MiB.bin"
        edited = f"big-{size_mib}MiB-edited.bin"
        written = random_file(os.path.join(DATA, big), size)
        edited_file(os.path.join(DATA, edited), os.path.join(DATA, big), size // 2 + INSERT_SKEW, written)
        name = f"{size_mib // 1024} GiB" if size_mib % 1024 == 0 else f"{size_mib} MiB"
        found["big"] = DataSet(f"{name} random file", DATA, big, size, 1)
        found["edited"] = DataSet(f"the {name} file with 1 MiB inserted", DATA, edited, size + MiB, 1)
    if "tree" in keys:
        files, tree_size = stdlib_tree(os.path.join(DATA, "stdlib"))
        found["tree"] = DataSet(f"stdlib tree, {files} files", DATA, "stdlib", tree_size, files)
    if "tree50k" in keys:
        rel = f"tree{options.tree_files // 1000}k" if options.tree_files % 1000 == 0 else \
            f"tree{options.tree_files}"
        counts = generated_tree(os.path.join(DATA, rel), options.tree_files)
        entries = counts["regular"] + counts["links"]
        found["tree50k"] = DataSet(
            f"generated tree, {entries:,} files", DATA, rel, counts["bytes"], entries,
            detail=(f"generated (seed {counts['params']['seed']}, sizes and shape after /usr/share of "
                    f"Debian 12): {counts['regular']:,} files, {counts['links']:,} symbolic links, "
                    f"{counts['folders']:,} folders, {counts['duplicates']:,} duplicate files, largest "
                    f"{human(counts['largest'])}, {human(counts['bytes'])} in all"))
    if "million" in keys:
        rel = f"million-{options.million_files}"
        counts = million_tree(os.path.join(DATA, rel), options.million_files)
        found["million"] = DataSet(
            f"generated tree, {counts['files']:,} tiny files", DATA, rel, counts["bytes"], counts["files"],
            detail=(f"generated: {counts['files']:,} files of 1-256 bytes, every one different, in "
                    f"{counts['folders']:,} folders of {data_sets.PER_FOLDER}, {human(counts['bytes'])}"))
    return found


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


def run_tool(tool: Tool, data: dict[str, DataSet], logs: str, round_: int, options):
    """Every step of one tool on a fresh repository or cluster; yields a Row per step."""
    tool.start()
    failed = False
    try:
        for step in STEPS:
            if step.key in tool.steps and step.data in data and not (step.once and round_ > 1):
                yield measure(tool, step, data[step.data], os.path.join(logs, f"{round_}-"), options)
    except BaseException:
        failed = True
        report = tool.failure_report()
        if report:
            print(report, file=sys.stderr)
        raise
    finally:
        tool.stop(options.keep or failed)
        if failed:
            print(f"kept {os.path.relpath(tool.work, ROOT)}/ to look at", file=sys.stderr)


def combine(rows: list[Row]) -> Row:
    """The round with the median time, with the highest peak memory of all rounds."""
    ordered = sorted(rows, key=lambda r: r.seconds)
    middle = ordered[(len(ordered) - 1) // 2]
    peak = {name: max(getattr(r, name) for r in rows) if getattr(middle, name) is not None else None
            for name in ("rss", "manager_rss", "server_rss")}
    spread = (ordered[-1].seconds - ordered[0].seconds) / middle.seconds if middle.seconds else 0.0
    return dataclasses.replace(middle, rounds=len(rows), spread=spread, **peak)


def measure(tool: Tool, step: Step, data: DataSet, log_prefix: str, options) -> Row:
    TRASH.make_room()
    if step.kind == "recovery":
        return measure_recovery(tool, step, data, log_prefix, options.recovery_snapshots)
    target = os.path.join(WORK, "restore")
    if step.kind == "restore":
        TRASH.discard(target)
        command = tool.restore(step.restores, target)
    elif step.kind == "ls":
        command = tool.ls(step.key)
    else:
        command = tool.backup(step.key, data)
    stored_before = tool.stored()
    catalog_before = tool.catalog()
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
    if step.kind == "restore":
        verify(data.path, tool.restored_path(target, data))
        TRASH.discard(target)
    elif step.kind == "ls":
        row.lines = output.count("\n")
        if row.lines < data.files:
            raise BenchFailed(f"{tool.name} ls printed {row.lines} lines for {data.files} files")
    else:
        row.stored = growth
        row.sent = tool.sent(output, growth)
        if catalog_before is not None:
            row.catalog = tool.catalog() - catalog_before
    tool.after_step(step.key)
    return row


class LogWatch:
    """Notes the moment a process first logs a line matching ``pattern`` (polled every 20 ms)."""

    def __init__(self, process: Process, pattern):
        self.process = process
        self.pattern = pattern
        self.seen_at: float | None = None
        self.line = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.02):
            found = self.pattern.search(self.process.output())
            if found:
                self.seen_at, self.line = time.monotonic(), found.group(0)
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


def measure_recovery(tool: Sdbackup, step: Step, data: DataSet, log_prefix: str, wanted: int) -> Row:
    """Back up ``data`` unchanged until the cluster holds ``wanted`` snapshots of it, stop the
    manager, delete its catalog, start it again, and time until `sdbackup snapshots` lists every
    snapshot again (each call waits while the manager says it is starting)."""
    local = tool.local
    ids = [i for i, paths in tool.snapshots() if paths == data.rel]
    if not ids:
        raise BenchFailed(f"no snapshot of {data.rel} to recover (the backup steps did not run)")
    catalog, stored = tool.catalog(), tool.stored()
    extra = 0
    while len(ids) < wanted:
        extra += 1
        run(tool.backup(step.key, data), f"{log_prefix}sdbackup-{step.key}-backup{extra}")
        ids = [i for i, paths in tool.snapshots() if paths == data.rel]
    row_extra = {}
    if extra:
        row_extra = {"extra_backups": extra, "extra_catalog": (tool.catalog() - catalog) / extra,
                     "extra_stored": (tool.stored() - stored) / extra}
    before = [i for i, _ in tool.snapshots()]
    # The servers' peak of the recovery is their own: the backups above had theirs (noted).
    backups_peak = max(p.peak_rss() for p in local.processes[1:])
    for process in local.processes[1:]:
        reset_peak(process)

    local.stop_manager()
    shutil.rmtree(local.manager_data)
    drop_caches()
    calls = 0
    started = time.monotonic()
    cpu = sum(proc_cpu(p.popen.pid) for p in local.processes[1:])
    manager = local.start_manager(os.path.basename(local.manager_data))
    watch = LogWatch(manager, MANAGER_SERVING)
    try:
        while True:
            calls += 1
            listed = [i for i, _ in tool.snapshots()]
            if listed == before:
                break
            if time.monotonic() - started > 600:
                raise BenchFailed(f"10 minutes after the manager restarted, `sdbackup snapshots` lists "
                                  f"{len(listed)} of {len(before)} snapshots")
            time.sleep(0.1)
    finally:
        watch.stop()
    seconds = time.monotonic() - started
    cluster = local.processes
    row = Row(tool.name, step, data, seconds, 0.0, 0,
              sum(proc_cpu(p.popen.pid) for p in cluster) - cpu,
              manager_rss=cluster[0].peak_rss(), server_rss=max(p.peak_rss() for p in cluster[1:]),
              **row_extra)
    row.ready = None if watch.seen_at is None else watch.seen_at - started
    row.note = (f"{len(before)} snapshots ({len(ids)} of this tree) listed again after {seconds:.2f} s, "
                f"{calls} `sdbackup snapshots` call(s); the servers peaked at "
                f"{backups_peak / 2**20:.0f} MiB during the {extra} backups before; "
                + (f"the manager logged \"{watch.line.strip()}\" after {row.ready:.2f} s"
                   if row.ready is not None else "no \"sdbackup-manager ready\" line seen in its log"))
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
           ("sent", 10, ">"), ("sent%", 6, ">"), ("stored+", 10, ">"), ("catalog+", 10, ">"),
           ("loopback", 10, ">"), ("peak RSS MiB", 15, ">"), ("cpu s", 6, ">"), ("sync s", 6, ">"),
           ("restic", 7, ">"), ("borg", 6, ">"), ("cp", 6, ">")]
#: For cp -a, a restore is compared with the copy of the same data.
CP_STEP = {"big-restore": "big-first", "tree-restore": "tree-first", "t50k-restore": "t50k-first"}


def line(cells: list[str]) -> str:
    return "  " + " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS, strict=True))


def speed_ratio(rows: dict, step: Step, peer: str) -> str:
    """sdbackup's throughput over the peer's on the same work (peer seconds / sdbackup seconds)."""
    mine = rows.get(("sdbackup", step.key))
    key = step.key if peer != "cp -a" else CP_STEP.get(step.key, step.key)
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
            rss = f"{row.rss / MiB:.0f}" if row.rss else "-"
            if row.manager_rss is not None:
                rss += f"/{row.manager_rss / MiB:.0f}/{row.server_rss / MiB:.0f}"
            moves_data = step.kind in ("backup", "restore")
            out.append(line([
                row.tool, f"{row.seconds:.2f}", f"{100 * row.spread:.0f}%" if row.rounds > 1 else "-",
                f"{row.data.size / MiB / row.seconds:.1f}" if moves_data else "-",
                f"{row.data.files / row.seconds:.0f}" if row.data.files > 1 and step.kind != "recovery"
                else "-",
                human(row.sent), f"{100 * row.sent / row.data.size:.1f}" if row.sent is not None else "-",
                human(row.stored), human(row.catalog), human(row.loopback), rss, f"{row.cpu:.1f}",
                f"{row.sync_seconds:.2f}" if step.kind != "recovery" else "-",
                *(speed_ratio(rows, step, peer) if is_sd else "" for peer in ("restic", "borg", "cp -a")),
            ]).rstrip())
            if row.lines is not None:
                out.append(f"    {row.tool}: {row.lines:,} lines listed")
            if row.extra_backups:
                out.append(f"    {row.tool}: {row.extra_backups} more unchanged backups first, each adding "
                           f"{human(row.extra_catalog)} to the catalog and {human(row.extra_stored)} to "
                           f"the servers' folders")
            if row.note:
                out.append(f"    {row.tool}: {row.note}")
        out.append("")
    return "\n".join(out)


LEGEND = """\
  time s: wall time of the whole process (page cache dropped before it), the median of {rounds} round(s),
  each round on a fresh repository / cluster (the 1,000,000-file steps: the first round only). range:
  (slowest - fastest) / median over the rounds. Every other figure is the median round's, except peak
  RSS: the highest of all rounds. sent: sdbackup's "(<size> new)" figure, the bytes the client sent to
  the servers; for restic and borg the repository's growth; sent% of the data set's size. stored+:
  growth of the servers' data_* folders (both copies) or of the repository. catalog+: growth of the
  manager's catalog (manager_data/: the pages in use of its SQLite files, committed WAL pages included,
  as after a checkpoint; other files by size). loopback: bytes over lo during the step (client <->
  manager <-> servers, replication included). peak RSS MiB: the command's (wait4 ru_maxrss); for
  sdbackup client/manager/largest server (VmHWM, reset before each step; for the recovery, the new
  manager's whole life, the servers' from the manager's stop). cpu s: user+system seconds of the
  command, plus the cluster's for sdbackup.
  sync s: the `sync` right after the process (what it left unwritten). restic / borg / cp: sdbackup's
  throughput over that tool's on the same step (its time / sdbackup's: above 1 means sdbackup is
  faster); vs cp, a restore is compared with the copy of the same data. manager recovery: from starting
  a manager whose manager_data/ was deleted (the servers keep running and reconnect by themselves) until
  `sdbackup snapshots` lists every snapshot it listed before.
"""

#: The 1 GiB and std-lib tree figures last recorded in README.rst (same kind of machine, --repeat 1),
#: shown beside this run's so that a change that makes them worse is seen.
RECORDED = {
    "big-first": ("first backup of 1 GiB", "MiB/s", 139.0),
    "big-again": ("unchanged re-backup of 1 GiB", "s", 0.41),
    "big-restore": ("restore of 1 GiB", "MiB/s", 237.0),
    "edited": ("edited 1 GiB file, sent", "MiB", 2.1),
    "tree-first": ("first backup of the std-lib tree", "s", 4.54),
    "tree-again": ("unchanged backup of the std-lib tree", "s", 1.71),
    "tree-restore": ("restore of the std-lib tree", "s", 4.93),
}


def against_recorded(rows: dict, size_mib: int) -> list[str]:
    """This run's 1 GiB and std-lib tree figures beside the ones README.rst last recorded."""
    out = []
    for key, (label, unit, recorded) in RECORDED.items():
        row = rows.get(("sdbackup", key))
        if row is None or (key.startswith(("big", "edited")) and size_mib != 1024):
            continue
        if unit == "MiB/s":
            now, better = row.data.size / MiB / row.seconds, True
        elif unit == "MiB":
            now, better = row.sent / MiB, False
        else:
            now, better = row.seconds, False
        worse = now < recorded * 0.9 if better else now > recorded * 1.1
        out.append(f"  {label:<40} now {now:8.2f} {unit:<5}  recorded {recorded:8.2f} {unit:<5}"
                   + ("  WORSE by more than 10%" if worse else ""))
    return out


def goals(rows: dict, size_mib: int, sets: set[str]) -> tuple[list[str], bool]:
    """Each goal of the data sets that ran (``sets``: data keys), with its figure and verdict."""

    def get(tool, key):
        return rows.get((tool, key))

    results = []  # (label, value, met or None, detail, the data key it is about)

    def add(about, label, value, met, detail):
        if about == "any" or about in sets:
            results.append((label, value, met, detail))

    def ratio(about, label, key, peer, limit, faster):
        mine, theirs = get("sdbackup", key), get(peer, key)
        if mine is None or theirs is None:
            add(about, label, "n/a", None, f"needs sdbackup and {peer}")
        elif faster:  # throughput: peer seconds / sdbackup seconds, at least `limit`
            value = theirs.seconds / mine.seconds
            add(about, label, f"{value:.2f}x", value >= limit,
                f"{mine.seconds:.2f} s vs {theirs.seconds:.2f} s" + on_disk(mine, theirs))
        else:  # time: sdbackup seconds / peer seconds, at most `limit`
            value = mine.seconds / theirs.seconds
            add(about, label, f"{value:.2f}x", value <= limit,
                f"{mine.seconds:.2f} s vs {theirs.seconds:.2f} s" + on_disk(mine, theirs))

    def on_disk(mine, theirs) -> str:
        """For a restore, the times until the files are on disk too: sdbackup's restore ends
        with a syncfs, the other tools leave their writes to the sync that follows them."""
        if mine.step.kind != "restore":
            return ""
        return (f"; with the sync after it {mine.seconds + mine.sync_seconds:.2f} s vs "
                f"{theirs.seconds + theirs.sync_seconds:.2f} s")

    def memory(label, keys, limit):
        sd_rows = [r for r in rows.values() if r.tool == "sdbackup" and r.step.key in keys]
        if not sd_rows:
            if any(s.data in sets for s in STEPS if s.key in keys):
                add("any", label, "n/a", None, "needs sdbackup")
            return
        peaks = [(r.rss, f"client ({r.step.key})") for r in sd_rows if r.rss]
        peaks += [(r.manager_rss, f"manager ({r.step.key})") for r in sd_rows]
        peaks += [(r.server_rss, f"a server ({r.step.key})") for r in sd_rows]
        peak, who = max(peaks)
        add("any", label, f"{peak / MiB:.0f} MiB", peak < limit, f"largest: {who}")

    def per_unchanged_snapshot(label, field, limit):
        again, recovery = get("sdbackup", "t50k-again"), get("sdbackup", "t50k-recovery")
        if again is None:
            add("tree50k", label, "n/a", None, "needs sdbackup")
            return
        figures = [getattr(again, field)]
        if recovery is not None and recovery.extra_backups:
            figures += [getattr(recovery, f"extra_{field}")] * recovery.extra_backups
        mean = sum(figures) / len(figures)
        add("tree50k", label, human(mean), mean < limit,
            f"mean of {len(figures)} unchanged snapshot(s); the t50k-again step alone {human(figures[0])}")

    what = "1 GiB" if size_mib == 1024 else f"{size_mib} MiB"
    any_row = {r.step.data: r for r in rows.values()}
    tree = f"{any_row['tree50k'].data.files // 1000}k-file tree" if "tree50k" in any_row else "50k-file tree"
    many = f"{any_row['million'].data.files:,} files" if "million" in any_row else "1,000,000 files"
    ratio("big", f"first backup of {what}, two copies: >= 1.3x borg's throughput", "big-first", "borg",
          1.3, True)
    ratio("tree", "first backup of the std-lib tree: <= 0.8x restic's time", "tree-first", "restic",
          0.8, False)
    ratio("tree", "unchanged re-backup of the tree: <= 1.0x borg's time", "tree-again", "borg", 1.0, False)
    ratio("big", f"restore of {what}: >= 1.5x restic's throughput", "big-restore", "restic", 1.5, True)
    for key, label, limit in (("edited", f"edited {what} file: < 5% of its bytes sent again", 0.05),
                              ("big-again", f"second identical copy of {what}: < 1% sent again", 0.01)):
        row = get("sdbackup", key)
        if row is None:
            add("big", label, "n/a", None, "needs sdbackup")
            continue
        share = row.sent / row.data.size
        peers = ", ".join(f"{t} {100 * rows[(t, key)].sent / row.data.size:.1f}%"
                          for t in ("restic", "borg") if (t, key) in rows)
        add("big", label, f"{100 * share:.1f}%", share < limit,
            f"{human(row.sent)} of {human(row.data.size)}" + (f"; {peers}" if peers else ""))
    ratio("tree50k", f"{tree}, first backup: <= restic's time", "t50k-first", "restic", 1.0, False)
    ratio("tree50k", f"{tree}, unchanged re-backup: <= restic's time", "t50k-again", "restic", 1.0, False)
    ratio("tree50k", f"{tree}, restore: <= restic's time", "t50k-restore", "restic", 1.0, False)
    per_unchanged_snapshot(f"{tree}: catalog growth per unchanged snapshot < 64 KiB", "catalog", 64 * KiB)
    per_unchanged_snapshot(f"{tree}: stored growth per unchanged snapshot < 1 MiB", "stored", MiB)
    memory("peak memory of every sdbackup process: < 100 MiB",
           {s.key for s in STEPS if s.data != "million"}, 100 * MiB)
    recovery = get("sdbackup", "t50k-recovery")
    if recovery is not None:
        add("tree50k", "manager recovery, catalog deleted: time to list every snapshot",
            f"{recovery.seconds:.1f} s", None,
            "reported, no goal" + (f"; ready logged after {recovery.ready:.1f} s"
                                   if recovery.ready is not None else ""))
    if any(r.step.data == "million" for r in rows.values() if r.tool == "sdbackup"):
        memory(f"{many}: every sdbackup process < 200 MiB",
               {s.key for s in STEPS if s.data == "million"}, 200 * MiB)
        for key in ("m-first", "m-again", "m-ls", "m-restore"):
            row = get("sdbackup", key)
            if row is not None:
                add("million", f"{many}: {row.step.title}", f"{row.seconds:.1f} s", None,
                    "reported, no goal; completed and checked")
    out = []
    width = max((len(label) for label, *_ in results), default=0)
    for label, value, met, detail in results:
        verdict = ("-" if detail.startswith("reported") else "n/a") if met is None else \
            "MET" if met else "NOT MET"
        out.append(f"  {label:<{width}} {value:>9}  {verdict:<8} {detail}")
    return out, all(met for _, _, met, _ in results if met is not None)


# -- main --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=DEFAULT_SETS,
                        help=f"comma-separated data sets, of {','.join(SETS)} ({DEFAULT_SETS})")
    parser.add_argument("--million", action="store_true",
                        help="add the 1,000,000-file set (backup, unchanged backup, ls, restore; sdbackup "
                             "only unless --million-restic)")
    parser.add_argument("--million-restic", action="store_true",
                        help="run restic on the 1,000,000-file set too")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the random file (1024)")
    parser.add_argument("--tree-files", type=int, default=50_000,
                        help="files and links of the generated /usr/share-like tree (50000)")
    parser.add_argument("--million-files", type=int, default=1_000_000,
                        help="files of the million set (1000000)")
    parser.add_argument("--recovery-snapshots", type=int, default=10,
                        help="snapshots of the generated tree the manager recovers (10)")
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
    sets = [n.strip() for n in args.sets.split(",") if n.strip()] + (["million"] if args.million else [])
    if [n for n in sets if n not in SETS] or not sets:
        parser.error(f"--sets takes some of {','.join(SETS)}")
    if args.size_mib < 4 or args.repeat < 1 or args.tree_files < 100 or args.million_files < 1000 \
            or args.recovery_snapshots < 2:
        parser.error("--size-mib must be at least 4, --repeat 1, --tree-files 100, --million-files 1000 "
                     "and --recovery-snapshots 2")
    names = [n for n in TOOLS if n in names]  # run in a fixed order
    keys = {key for name in sets for key in SETS[name]}

    started = time.monotonic()
    for name, why in install_missing(names).items():
        print(f"skipping {name}: {why}", flush=True)
        names.remove(name)
    isolated = own_network()  # after apt-get, which needs the real network
    print("preparing the data sets under bench_work/data/ ...", flush=True)
    # In a process of its own: a forked child starts with its parent's resident memory, which
    # counts in its peak RSS, so this process must stay small for the RSS column to be right.
    with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        data = pool.submit(make_data_sets, keys, args).result()
    repos = os.path.join(WORK, "repos")
    logs = os.path.join(WORK, "logs")
    for folder in (repos, logs, os.path.join(WORK, "restore")):  # a failed or --keep run's
        TRASH.discard(folder)
    TRASH.empty()
    TRASH.settle()
    os.makedirs(repos)
    os.makedirs(logs)

    tools = [TOOLS[n](os.path.join(repos, n), million=args.million_restic) if n == "restic"
             else TOOLS[n](os.path.join(repos, n)) for n in names]
    for tool in tools:
        tool.discard = TRASH.discard
    versions = {}
    runs: dict = {}  # (tool, step key) -> [Row], one per round
    cache_mode = drop_caches()
    total = sum(1 for r in range(1, args.repeat + 1) for t in tools for s in STEPS
                if s.key in t.steps and s.data in data and not (s.once and r > 1))
    done = 0
    try:
        for round_ in range(1, args.repeat + 1):
            for tool in tools:
                for row in run_tool(tool, data, logs, round_, args):
                    runs.setdefault((row.tool, row.step.key), []).append(row)
                    done += 1
                    print(f"[{done:2}/{total}] round {round_}/{args.repeat} {row.tool:<9} {row.data.name}: "
                          f"{row.step.title}: {row.seconds:.2f} s", flush=True)
                versions[tool.name] = tool.describe()
            TRASH.empty()
            if round_ < args.repeat:
                TRASH.settle()
    except (BenchFailed, RuntimeError) as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
        print(f"(logs of every step in {os.path.relpath(logs, ROOT)}/)", file=sys.stderr)
        return 1
    finally:
        TRASH.discard(os.path.join(WORK, "restore"))
        TRASH.empty()
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
          + (f"; insertion at byte {args.size_mib * MiB // 2 + INSERT_SKEW}" if "big" in data else ""))
    for d in data.values():
        if d.detail:
            print(f"  {d.rel}: {d.detail}")
    print()
    print(table(rows, [t.name for t in tools]))
    print(LEGEND.format(rounds=args.repeat))
    recorded = against_recorded(rows, args.size_mib)
    if recorded:
        print("against the figures README.rst last recorded (sdbackup; the 1 GiB ones must not get worse)")
        print("\n".join(recorded))
        print()
    lines, _ = goals(rows, args.size_mib, set(data))
    print("goals (sdbackup, measured in this run" + (")" if args.size_mib == 1024 else
                                                     f" with a {args.size_mib} MiB file, not 1 GiB)"))
    print("\n".join(lines))
    print(f"\nwhole run: {time.monotonic() - started:.0f} s; logs in {os.path.relpath(logs, ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
