"""Measure what security costs: a big file's backup and restore with TLS and encryption on,
against both off, in the same run.

Starts two real clusters side by side (manager + 3 servers as twistd processes, replication
factor 2 each): one without TLS, one with mutual TLS on every link. Each round writes a new
file of random bytes (so nothing is deduplicated and every byte is sent), backs it up and
restores it (checked with cmp) three ways, interleaved so all see the same machine:

- ``off``: no TLS, a plaintext repository (``sdbackup init --repo plain --encryption none``);
- ``encrypted``: no TLS, an encrypted repository (``sdbackup init --repo bench``);
- ``tls+encrypted``: the TLS cluster, an encrypted repository.

It prints the median times and each one's slowdown against ``off`` (the goal: under 15 %).

    python bench/encryption.py [--size-mib 1024] [--repeat 3]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdbackup.localcluster import LocalCluster, environment  # noqa: E402

WORK = os.path.join(ROOT, "bench_work", "encryption")
MiB = 1024 * 1024
PASSWORD = "bench password"


def sdbackup(env, *args) -> str:
    result = subprocess.run(["sdbackup", *args], env=env, cwd=WORK, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"sdbackup {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def timed(env, *args) -> float:
    start = time.monotonic()
    sdbackup(env, *args)
    return time.monotonic() - start


def write_random(path: str, size_mib: int):
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))


def round_trip(env, source: str, size_mib: int) -> tuple[float, float]:
    """Seconds to back up a new ``big.bin`` and to restore it (checked)."""
    write_random(source, size_mib)
    backup = timed(env, "backup", "--force", "big.bin")
    target = os.path.join(WORK, "restored")
    shutil.rmtree(target, ignore_errors=True)
    restore = timed(env, "restore", "latest", "--target", target)
    if subprocess.run(["cmp", source, os.path.join(target, "big.bin")]).returncode:
        raise SystemExit("the restored file differs from the original")
    shutil.rmtree(target)
    return backup, restore


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of each round's file")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    source = os.path.join(WORK, "big.bin")
    arms: dict[str, list[tuple[float, float]]] = {"off": [], "encrypted": [], "tls+encrypted": []}
    with LocalCluster(os.path.join(WORK, "plain"), heartbeat=1.0) as plain_cluster, \
            LocalCluster(os.path.join(WORK, "tls"), heartbeat=1.0, tls="tls") as tls_cluster:
        envs = {}
        for name, cluster, encrypt in (("off", plain_cluster, False),
                                       ("encrypted", plain_cluster, True),
                                       ("tls+encrypted", tls_cluster, True)):
            env = {**environment(), **cluster.client_environment()}
            env.pop("SDBACKUP_PASSWORD", None)
            env.pop("SDBACKUP_REPO", None)
            if encrypt:
                env.update(SDBACKUP_PASSWORD=PASSWORD, SDBACKUP_REPO="bench")
                sdbackup(env, "init")
            else:
                env.update(SDBACKUP_REPO="plain")
                sdbackup(env, "init", "--encryption", "none")
            envs[name] = env
        for _ in range(args.repeat):
            for name, env in envs.items():
                arms[name].append(round_trip(env, source, args.size_mib))
    shutil.rmtree(WORK, ignore_errors=True)
    print(f"{args.size_mib} MiB of new random bytes a backup, {args.repeat} rounds, median seconds:")
    medians = {}
    for name, rounds in arms.items():
        medians[name] = [statistics.median(step) for step in zip(*rounds, strict=True)]
        backup, restore = medians[name]
        print(f"  {name:14} backup {backup:7.2f} s ({args.size_mib / backup:5.0f} MiB/s)   "
              f"restore {restore:7.2f} s ({args.size_mib / restore:5.0f} MiB/s)")
    for name in ("encrypted", "tls+encrypted"):
        for index, step in enumerate(("backup", "restore")):
            slower = medians[name][index] / medians["off"][index] - 1
            print(f"  {name} {step} is {slower:+.1%} against off (goal: under +15 %)")


if __name__ == "__main__":
    main()
