"""Measure sdbackup on this machine: backup and restore of a large file and of many small files.

Starts a real cluster (manager + 3 servers as twistd processes, replication
factor 2) under bench_work/, runs the real ``sdbackup`` command as whole
processes, and prints throughput and every process's peak memory, with
``cp -a`` on the same data as the floor. Run with ``make bench``.

    python bench/bench.py [--size-mib 1024] [--keep]
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdbackup.localcluster import LocalCluster, environment  # noqa: E402

WORK = os.path.join(ROOT, "bench_work")
MiB = 1024 * 1024


def make_big_file(path: str, size: int):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))


def make_small_files(path: str) -> tuple[int, int]:
    if not os.path.exists(path):
        shutil.copytree(sysconfig.get_paths()["stdlib"], path, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages"))
    count = size = 0
    for folder, _, files in os.walk(path):
        for name in files:
            count += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return count, size


def drop_caches():
    """Make reads come from disk, where the kernel lets us; harmless where it does not."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(command: list[str], cwd: str, env: dict) -> tuple[float, int]:
    """Run a whole process; its wall time in seconds and its peak RSS in bytes."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return elapsed, usage.ru_maxrss * 1024


def same_tree(a: str, b: str) -> bool:
    result = subprocess.run(["diff", "-r", "--no-dereference", a, b], capture_output=True)
    return result.returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep bench_work/ afterwards")
    args = parser.parse_args()
    os.makedirs(WORK, exist_ok=True)
    data = os.path.join(WORK, "data")
    os.makedirs(data, exist_ok=True)
    big = os.path.join(data, "big.bin")
    make_big_file(big, args.size_mib * MiB)
    small = os.path.join(data, "stdlib")
    files, small_bytes = make_small_files(small)
    print(f"data: {args.size_mib} MiB random file; {files} files, {small_bytes / MiB:.0f} MiB "
          f"(Python standard library)")

    rows = []
    cluster_root = os.path.join(WORK, "cluster")
    shutil.rmtree(cluster_root, ignore_errors=True)
    env = environment()
    with LocalCluster(cluster_root, heartbeat=1.0) as cluster:
        env["SDBACKUP_MANAGER"] = cluster.manager_address
        for label, path, size, count in [("1 file", "big.bin", args.size_mib * MiB, 1),
                                         ("small files", "stdlib", small_bytes, files)]:
            for phase in ("first backup", "unchanged backup"):
                drop_caches()
                seconds, rss = timed(["sdbackup", "backup", path], data, env)
                rows.append((f"sdbackup {phase}, {label}", seconds, size, count, rss))
            target = os.path.join(WORK, "restored")
            shutil.rmtree(target, ignore_errors=True)
            drop_caches()
            seconds, rss = timed(["sdbackup", "restore", "latest", "--target", target], data, env)
            if not same_tree(os.path.join(data, path), os.path.join(target, path)):
                raise SystemExit(f"restored {path} differs from the original")
            rows.append((f"sdbackup restore, {label}", seconds, size, count, rss))
            shutil.rmtree(target)
        peaks = {p.name: p.peak_rss() for p in cluster.processes}
        stored = sum(_folder_size(os.path.join(cluster_root, d)) for d in os.listdir(cluster_root)
                     if d.startswith("data_"))
    for label, path, size, count in [("1 file", "big.bin", args.size_mib * MiB, 1),
                                     ("small files", "stdlib", small_bytes, files)]:
        target = os.path.join(WORK, "cp_copy")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        drop_caches()
        seconds, rss = timed(["cp", "-a", os.path.join(data, path), target], data, env)
        rows.append((f"cp -a, {label}", seconds, size, count, rss))
        shutil.rmtree(target)

    print(f"\n{'what':<38} {'seconds':>8} {'MiB/s':>8} {'files/s':>9} {'peak RSS':>10}")
    for label, seconds, size, count, rss in rows:
        print(f"{label:<38} {seconds:8.2f} {size / MiB / seconds:8.1f} {count / seconds:9.0f} "
              f"{rss / MiB:8.1f} MiB")
    print("\npeak RSS of the cluster's processes over the whole run:")
    for name, rss in peaks.items():
        print(f"  {name:<12} {rss / MiB:8.1f} MiB")
    print(f"bytes stored on the servers: {stored / MiB:.0f} MiB "
          f"(replication factor 2 of {(args.size_mib * MiB + small_bytes) / MiB:.0f} MiB)")
    if not args.keep:
        shutil.rmtree(os.path.join(WORK, "cluster"), ignore_errors=True)


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


if __name__ == "__main__":
    main()
