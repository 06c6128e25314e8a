"""Measure recovery: restore speed with a server down, and time back to full replication.

Starts a real cluster (manager + 3 servers as twistd processes, replication
factor 2), backs up a file of random bytes, restores it with every server up,
SIGKILLs the server holding the most chunks, restores again while the manager
repairs (one copy of two thirds of the chunks is gone), and times how long the
manager takes to copy every chunk back to two live servers.

    python bench/failover.py [--size-mib 512] [--repair-rate 50]
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdbackup.localcluster import LocalCluster, environment  # noqa: E402

WORK = os.path.join(ROOT, "bench_work", "failover")
MiB = 1024 * 1024


def sdbackup(env, *args) -> str:
    result = subprocess.run(["sdbackup", *args], env=env, cwd=WORK, capture_output=True, text=True,
                            timeout=600)
    if result.returncode not in (0, 3):
        raise SystemExit(f"sdbackup {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def timed_restore(env, target: str, source: str) -> float:
    shutil.rmtree(target, ignore_errors=True)
    start = time.monotonic()
    sdbackup(env, "restore", "latest", "--target", target)
    elapsed = time.monotonic() - start
    if subprocess.run(["cmp", source, os.path.join(target, "big.bin")]).returncode:
        raise SystemExit("the restored file differs from the original")
    shutil.rmtree(target)
    return elapsed


def chunk_count(cluster_root: str, process) -> int:
    folder = os.path.join(cluster_root, process.name.replace("server_", "data_"), "chunks")
    return sum(len(files) for _, _, files in os.walk(folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repair-rate", type=float, default=50.0, help="MiB/s")
    parser.add_argument("--dead-after", type=float, default=3.0)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    source = os.path.join(WORK, "big.bin")
    with open(source, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    env = environment()
    cluster_root = os.path.join(WORK, "cluster")
    options = ["--dead-after", str(args.dead_after), "--repair-interval", "1",
               "--repair-rate", str(args.repair_rate)]
    with LocalCluster(cluster_root, heartbeat=0.5, manager_options=options) as cluster:
        env["SDBACKUP_MANAGER"] = cluster.manager_address
        env["SDBACKUP_PASSWORD"] = "sdbackup-bench"
        env.pop("SDBACKUP_REPO", None)
        sdbackup(env, "init")
        sdbackup(env, "backup", "big.bin")
        target = os.path.join(WORK, "restored")
        all_up = timed_restore(env, target, source)
        servers = cluster.processes[1:]
        victim = max(servers, key=lambda p: chunk_count(cluster_root, p))
        lost = chunk_count(cluster_root, victim)
        cluster.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while " dead " not in sdbackup(env, "status"):
            time.sleep(0.05)
        dead_at = time.monotonic()
        one_down = timed_restore(env, target, source)  # while the repair runs
        while True:
            status = sdbackup(env, "status")
            match = re.search(r"(\d+) under-replicated, (\d+) missing", status)
            if match and match.groups() == ("0", "0"):
                break
            if time.monotonic() - killed_at > 600:
                raise SystemExit("not fully replicated after 600 s:\n" + status)
            time.sleep(0.2)
        healed = time.monotonic() - killed_at
    size = args.size_mib
    print(f"restore of {size} MiB, all servers up:      {all_up:6.2f} s  {size / all_up:7.1f} MiB/s")
    print(f"restore of {size} MiB, one server SIGKILLed: {one_down:6.2f} s  {size / one_down:7.1f} MiB/s")
    print(f"server holding {lost} chunks ({lost} MiB) SIGKILLed: shown dead after "
          f"{dead_at - killed_at:.1f} s (its link closed), every chunk back to 2 live copies "
          f"after {healed:.1f} s (--repair-rate {args.repair_rate:g} MiB/s)")
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
