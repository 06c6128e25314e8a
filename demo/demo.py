"""The sdbackup demo: a real cluster on this machine, a backup, a restore, a check.

Creates a cluster CA and certificates (``sdbackup tls``), starts a manager and
three storage servers as separate ``twistd`` processes in ``demo_work/``, every
link mutual TLS, initialises an encrypted repository, backs up a sample folder
with the ``sdbackup`` command, restores it, compares every file byte for byte,
and stops the cluster, even on failure or Ctrl-C. Exit status 0 only when the restored copy is identical.
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

from sdbackup.localcluster import CERTIFICATES, ClusterFailed, LocalCluster, environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "demo_work")
SAMPLE = "sample"  # relative to WORK, so the snapshot names it "sample"
TLS = "tls"  # the CA and certificates, relative to WORK
#: The manager's dashboard (loopback; the design's ports go on from 5000).
DASHBOARD = "tcp:5080:interface=127.0.0.1"
#: The demo repository's password (a real one comes from a prompt or a file).
PASSWORD = "sdbackup demo"
HEARTBEAT = 1  # seconds: status shows the servers' chunk counts soon after the backup
# The venv's bin first, so twistd and sdbackup are the ones installed next to this python.
ENV = environment()


class DemoFailed(Exception):
    pass


def make_sample():
    """A small tree with the awkward cases: spaces, non-ASCII, empty file and folder, big file."""
    files = {
        "teste.txt": b"Hello from sdbackup!\n",
        "docs/notes with spaces.txt": b"a file name with spaces\n" * 50,
        "docs/relat\u00f3rio de a\u00e7\u00e3o.txt": "relat\u00f3rio em portugu\u00eas\n".encode(),
        "docs/\u65e5\u672c\u8a9e/\u30e1\u30e2.md": "# \u30e1\u30e2\n".encode(),
        "docs/copy of teste.txt": b"Hello from sdbackup!\n",  # deduplicated
        "photos/2024/caf\u00e9.jpg": os.urandom(300 * 1024),
        "photos/2024/random.bin": os.urandom(2 * 1024 * 1024 + 12345),  # three 1 MiB chunks
        "empty.txt": b"",
    }
    for name, data in files.items():
        path = os.path.join(WORK, SAMPLE, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(WORK, SAMPLE, "empty folder"))
    script = os.path.join(WORK, SAMPLE, "run me.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho restored\n")
    os.chmod(script, 0o755)


def sdbackup(*args):
    """Run one client command, transcript style: the command, then its output."""
    print(f"\n$ sdbackup {' '.join(args)}", flush=True)
    try:
        status = subprocess.run(["sdbackup", *args], cwd=WORK, env=ENV, timeout=300).returncode
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"sdbackup {args[0]} did not finish in 300s") from None
    if status != 0:
        raise DemoFailed(f"sdbackup {args[0]} exited with status {status}")


def tree(root):
    """Every file and folder under ``root`` by relative path, with what must survive a restore."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                    st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return entries


def describe(entry):
    kind, mode, size = entry
    return f"{'folder' if stat.S_ISDIR(kind) else 'file'} mode {mode:04o} size {size}"


def compare(source, restored):
    """Same entries, kinds, modes, sizes and bytes, or DemoFailed. Returns (files, entries)."""
    before, after = tree(source), tree(restored)
    problems = [f"missing: {p}" for p in sorted(before.keys() - after.keys())]
    problems += [f"unexpected: {p}" for p in sorted(after.keys() - before.keys())]
    for path in sorted(before.keys() & after.keys()):
        if before[path] != after[path]:
            problems.append(f"{path}: {describe(before[path])} became {describe(after[path])}")
        elif stat.S_ISREG(before[path][0]):
            with open(os.path.join(source, path), "rb") as a, open(os.path.join(restored, path), "rb") as b:
                if a.read() != b.read():
                    problems.append(f"{path}: bytes differ")
    if problems:
        raise DemoFailed("the restored copy differs:\n  " + "\n  ".join(problems))
    return sum(stat.S_ISREG(kind) for kind, _, _ in before.values()), len(before)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    missing = [c for c in ("twistd", "sdbackup") if shutil.which(c, path=ENV["PATH"]) is None]
    if missing:
        print(f"demo: {' and '.join(missing)} not found; run it with `make demo`", file=sys.stderr)
        return 1
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    make_sample()
    print(f"sample folder: {os.path.relpath(os.path.join(WORK, SAMPLE), ROOT)}; "
          f"commands run in {os.path.relpath(WORK, ROOT)}/\n")
    # The original design's ports: the manager on 5000, the servers on 5001, 5002, 5003.
    cluster = LocalCluster(WORK, servers=3, manager_port=5000, first_server_port=5001,
                           heartbeat=HEARTBEAT, interface="", echo=True, tls=TLS,
                           manager_options=["--web", DASHBOARD, "--history-interval", "5"])
    try:
        sdbackup("tls", "ca", "--dir", TLS)
        for name, role in CERTIFICATES.items():
            sdbackup("tls", "cert", "--dir", TLS, "--role", role, "--name", name)
        print()
        cluster.start()
        port = re.search(r"sdbackup-manager dashboard on port (\d+)", cluster.manager.output())
        print(f"\nthe dashboard: http://127.0.0.1:{port.group(1) if port else '?'}/ "
              f"(while the demo runs; `make demo DEMO_ARGS=--stay` keeps the cluster up)")
        ENV.update(cluster.client_environment())
        shown = [f"{k}={os.path.relpath(v, WORK)}" for k, v in ENV.items() if k.startswith("SDBACKUP_TLS")]
        print(f"\nthe client's certificate: {' '.join(shown)}")
        sdbackup("status")
        ENV["SDBACKUP_PASSWORD"] = PASSWORD
        print(f"\nthe repository's password: SDBACKUP_PASSWORD={PASSWORD}")
        sdbackup("init")
        sdbackup("backup", SAMPLE)
        sdbackup("snapshots")
        sdbackup("ls", "-l", "latest")
        sdbackup("restore", "latest", "--target", "restored")
        files, entries = compare(os.path.join(WORK, SAMPLE), os.path.join(WORK, "restored", SAMPLE))
        print(f"\nverified: all {files} files identical (bytes, size and mode), "
              f"{entries - files} folders too")
        time.sleep(HEARTBEAT + 0.5)  # the servers report their chunk counts with each heartbeat
        sdbackup("status")
        if "--stay" in sys.argv:
            print("\nthe cluster stays up for the dashboard; Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
    except (DemoFailed, ClusterFailed) as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
        if cluster.processes:
            print(f"\ncluster stopped; logs and data are in {os.path.relpath(WORK, ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
