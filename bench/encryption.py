"""Measure what encryption costs: a big file's backup and restore, plaintext against an
encrypted repository, on one cluster in the same run.

Starts a real cluster (manager + 3 servers as twistd processes, replication factor 2),
then for each round writes a new file of random bytes (so nothing is deduplicated and every
byte is sent) and backs it up and restores it, once into the plaintext ``default``
repository and once into an encrypted repository (``sdbackup init --repo bench``),
interleaved, and prints the median times and the slowdown. With ``--tls`` every link is
mutual TLS too.

    python bench/encryption.py [--size-mib 1024] [--repeat 3] [--tls]
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="mutual TLS on every link")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    source = os.path.join(WORK, "big.bin")
    cluster_root = os.path.join(WORK, "cluster")
    with LocalCluster(cluster_root, heartbeat=1.0, tls="tls" if args.tls else "") as cluster:
        plain = {**environment(), **cluster.client_environment()}
        plain.pop("SDBACKUP_PASSWORD", None)
        plain.pop("SDBACKUP_REPO", None)
        encrypted = {**plain, "SDBACKUP_PASSWORD": PASSWORD, "SDBACKUP_REPO": "bench"}
        sdbackup(encrypted, "init")
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "encrypted": []}
        for _ in range(args.repeat):  # interleaved, so both see the same machine
            times["plain"].append(round_trip(plain, source, args.size_mib))
            times["encrypted"].append(round_trip(encrypted, source, args.size_mib))
    shutil.rmtree(WORK, ignore_errors=True)
    print(f"{args.size_mib} MiB of new random bytes a backup, {args.repeat} rounds, median seconds"
          f"{' (TLS on every link)' if args.tls else ''}:")
    medians = {}
    for name, rounds in times.items():
        medians[name] = [statistics.median(step) for step in zip(*rounds, strict=True)]
        backup, restore = medians[name]
        print(f"  {name:10} backup {backup:7.2f} s ({args.size_mib / backup:6.0f} MiB/s)   "
              f"restore {restore:7.2f} s ({args.size_mib / restore:6.0f} MiB/s)")
    for index, step in enumerate(("backup", "restore")):
        slower = medians["encrypted"][index] / medians["plain"][index] - 1
        print(f"  encrypted {step} is {slower:+.1%} against plaintext")


if __name__ == "__main__":
    main()
