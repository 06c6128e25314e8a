"""The tools the benchmark runs, each behind the same small interface.

``Sdbackup`` (a real cluster: manager + 3 ``twistd`` servers, replication
factor 2), ``Restic`` and ``Borg`` (local repositories under ``bench_work/``)
and ``Copy`` (``cp -a``, the floor). A tool hands out the command of each
step; ``bench.py`` runs, times and checks it. Steps are named by a key:
``big-first``, ``big-again``, ``edited``, ``tree-first``, ``tree-again``,
``t50k-first``, ``t50k-again``, ``m-first``, ``m-again`` for backups,
``m-ls`` for a listing, and a restore names the backup it restores.
``t50k-recovery`` (sdbackup only) deletes the manager's catalog and times its
rebuild.
"""

import compileall
import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass

from data_sets import DataSet

import sdbackup
from sdbackup.localcluster import LocalCluster, Process, environment, tail

MiB = 1024 * 1024
UNITS = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024**3, "TiB": 1024**4}
NEW_BYTES = re.compile(r"\(([\d.]+) (B|KiB|MiB|GiB|TiB) new\)")
#: Debian package of each peer, installed with apt-get when the command is missing.
PACKAGES = {"restic": "restic", "borg": "borgbackup"}


@dataclass
class Command:
    argv: list[str]
    cwd: str
    env: dict


def folder_size(path: str) -> int:
    """Bytes of every file under ``path`` (their sizes, not the blocks they take)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


#: The steps every tool that backs up and restores runs (cp -a runs fewer, sdbackup more).
COMMON_STEPS = frozenset({
    "big-first", "big-again", "big-restore", "edited", "tree-first", "tree-again", "tree-restore",
    "t50k-first", "t50k-again", "t50k-restore",
})
MILLION_STEPS = frozenset({"m-first", "m-again", "m-ls", "m-restore"})
SQLITE_HEADER = b"SQLite format 3\0"


def catalog_bytes(folder: str) -> int:
    """What the manager's catalog holds now: the pages in use of every SQLite database in
    ``folder`` (read through a read-only connection, so committed pages still in the WAL count,
    as after a checkpoint), plus the size of any other file."""
    total = 0
    for current, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(current, name)
            if name.endswith(("-wal", "-shm", "-journal")):
                continue
            try:
                with open(path, "rb") as f:
                    is_sqlite = f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
                if not is_sqlite:
                    total += os.lstat(path).st_size
                    continue
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                        timeout=30)) as db:
                    page_size = db.execute("PRAGMA page_size").fetchone()[0]
                    pages = db.execute("PRAGMA page_count").fetchone()[0]
                    free = db.execute("PRAGMA freelist_count").fetchone()[0]
                total += (pages - free) * page_size
            except FileNotFoundError:
                pass
    return total


def parse_new_bytes(output: str) -> int | None:
    """The ``(<size> new)`` figure of ``sdbackup backup``'s summary line, in bytes."""
    match = NEW_BYTES.search(output)
    if not match:
        return None
    return round(float(match.group(1)) * UNITS[match.group(2)])


def clean_environment(prefix: str) -> dict:
    """This process's environment with the venv first on PATH, less the user's ``prefix*`` settings."""
    return {k: v for k, v in environment().items() if not k.startswith(prefix)}


def source_digest() -> str:
    """A digest of sdbackup's Python sources as they are now."""
    package = os.path.dirname(os.path.abspath(sdbackup.__file__))
    digest = hashlib.sha256()
    for folder, dirs, names in os.walk(package):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def compile_bytecode():
    """sdbackup's modules compiled to bytecode, as ``pip install`` leaves them. Python never
    writes bytecode under ``PYTHONDONTWRITEBYTECODE`` (some machines set it), and each command
    of an editable install then compiles every module again: 0.13 s a command, measured."""
    compileall.compile_dir(os.path.dirname(os.path.abspath(sdbackup.__file__)), quiet=1)


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


class Tool:
    name = ""
    #: Step keys this tool runs; restores are named ``<dataset>-restore``.
    steps = COMMON_STEPS

    def __init__(self, work: str):
        self.work = work  # this tool's own folder under bench_work/repos/
        #: How a folder the tool is done with goes away (the bench gives its ``Trash.discard``).
        self.discard = lambda path: shutil.rmtree(path, ignore_errors=True)

    def start(self):
        self.discard(self.work)
        os.makedirs(self.work)

    def stop(self, keep: bool):
        if not keep:
            self.discard(self.work)

    def version(self) -> str:
        return ""

    def backup(self, key: str, data: DataSet) -> Command:
        raise NotImplementedError

    def restore(self, backup_key: str, target: str) -> Command:
        raise NotImplementedError

    def ls(self, backup_key: str) -> Command:
        """List every entry of the backup ``backup_key``, one a line."""
        raise NotImplementedError

    def catalog(self) -> int | None:
        """Bytes of the tool's index apart from its stored data (sdbackup's manager catalog)."""
        return None

    def restored_path(self, target: str, data: DataSet) -> str:
        return os.path.join(target, data.rel)

    def stored(self) -> int:
        """Bytes this tool keeps now (repository or servers' chunk folders)."""
        return folder_size(self.work)

    def sent(self, output: str, stored_growth: int) -> int:
        """Bytes a backup sent to its store: by default what the store grew by."""
        return stored_growth

    def after_step(self, key: str):
        pass

    def cluster(self) -> list[Process]:
        return []

    def failure_report(self) -> str:
        """What to show when a step failed, beside the command's own output."""
        return ""

    def changed_under_us(self) -> bool:
        return False

    def describe(self) -> str:
        """The version, and the options that matter for the comparison (after ``start``)."""
        return self.version()


class Sdbackup(Tool):
    name = "sdbackup"
    steps = COMMON_STEPS | MILLION_STEPS | {"t50k-recovery"}

    def __init__(self, work: str, replicas: int = 2, servers: int = 3):
        super().__init__(work)
        self.replicas = replicas
        self.servers = servers
        self.local: LocalCluster | None = None
        self.env: dict = {}
        self.source = source_digest()

    def start(self):
        super().start()
        compile_bytecode()
        self.local = LocalCluster(self.work, servers=self.servers, replicas=self.replicas,
                                  heartbeat=1.0)
        self.local.start()
        # Encrypted, as a user's repository is by default (and as restic's always is).
        self.env = dict(environment(), SDBACKUP_MANAGER=self.local.manager_address,
                        SDBACKUP_PASSWORD="sdbackup-bench")
        self.env.pop("SDBACKUP_REPO", None)
        subprocess.run(["sdbackup", "init"], cwd=self.work, env=self.env, check=True,
                       capture_output=True)

    def stop(self, keep: bool):
        if self.local is not None:
            self.local.stop()
            self.local = None
        super().stop(keep)

    def version(self) -> str:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = first_line(["git", "-C", root, "rev-parse", "--short", "HEAD"])
        dirty = first_line(["git", "-C", root, "status", "--porcelain", "--", "sdbackup"])
        return f"sdbackup {commit}{' + local changes' if dirty != '?' else ''}"

    def describe(self) -> str:
        return f"{self.version()} (encrypted repository, replication factor {self.replicas})"

    def backup(self, key, data):
        return Command(["sdbackup", "backup", data.rel], data.folder, self.env)

    def restore(self, backup_key, target):
        return Command(["sdbackup", "restore", "latest", "--target", target], self.work, self.env)

    def ls(self, backup_key):
        return Command(["sdbackup", "ls", "latest"], self.work, self.env)

    def stored(self) -> int:
        return sum(folder_size(os.path.join(self.work, d)) for d in os.listdir(self.work)
                   if d.startswith("data_"))

    def catalog(self) -> int:
        return catalog_bytes(self.local.manager_data)

    def snapshots(self, timeout: float = 600) -> list[tuple[str, str]]:
        """``(id, paths)`` of every snapshot ``sdbackup snapshots`` lists, oldest first (the
        command waits while the manager is starting)."""
        result = subprocess.run(["sdbackup", "snapshots"], cwd=self.work, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"sdbackup snapshots exited with status {result.returncode}: "
                               f"{result.stderr.strip()[-500:]}")
        rows = []
        for line in result.stdout.splitlines()[1:]:
            parts = line.split()
            if parts:
                rows.append((parts[0], parts[-1]))  # the paths column is last
        return rows

    def sent(self, output, stored_growth):
        new = parse_new_bytes(output)
        if new is None:
            raise RuntimeError(f"no '(<size> new)' in sdbackup's output: {output.strip()!r}")
        return new

    def cluster(self):
        return list(self.local.processes) if self.local else []

    def failure_report(self):
        if self.local is None:
            return ""
        parts = []
        for process in self.local.processes:
            state = "running" if process.popen.poll() is None else f"exited {process.popen.returncode}"
            parts.append(f"--- end of {os.path.relpath(process.log)} ({state}):\n{tail(process.log, 12)}")
        return "\n".join(parts)

    def changed_under_us(self):
        # The cluster's processes load the code once, each client run loads it again: an edit
        # of sdbackup/ during the run mixes versions (the bench runs the working tree).
        return source_digest() != self.source


class Restic(Tool):
    name = "restic"

    def __init__(self, work: str, million: bool = False):
        super().__init__(work)
        if million:  # the 1,000,000-file steps too (optional: they take long)
            self.steps = COMMON_STEPS | MILLION_STEPS

    def start(self):
        super().start()
        self.repo = os.path.join(self.work, "repo")
        env = clean_environment("RESTIC_")
        env["RESTIC_CACHE_DIR"] = os.path.join(self.work, "cache")
        self.flags = ["-r", self.repo]
        if os.environ.get("RESTIC_PASSWORD"):
            env["RESTIC_PASSWORD"] = os.environ["RESTIC_PASSWORD"]
            self.auth = "password from RESTIC_PASSWORD"
        elif "--insecure-no-password" in subprocess.run(["restic", "--help"], capture_output=True,
                                                         text=True).stdout:
            self.flags.append("--insecure-no-password")
            self.auth = "--insecure-no-password"
        else:
            password_file = os.path.join(self.work, "password")
            with open(password_file, "w") as f:
                f.write("sdbackup-bench\n")
            self.flags += ["--password-file", password_file]
            self.auth = "fixed password file"
        self.env = env
        subprocess.run(["restic", *self.flags, "init"], env=env, check=True, capture_output=True)

    def describe(self) -> str:
        return f"{self.version()} ({self.auth})"

    def version(self) -> str:
        version = first_line(["restic", "version"]).split(" compiled")[0]
        if "--compression" in subprocess.run(["restic", "--help"], capture_output=True, text=True).stdout:
            version += ", default compression"
        return version

    def backup(self, key, data):
        return Command(["restic", *self.flags, "backup", data.rel], data.folder, self.env)

    def restore(self, backup_key, target):
        return Command(["restic", *self.flags, "restore", "latest", "--target", target], self.work,
                       self.env)

    def ls(self, backup_key):
        return Command(["restic", *self.flags, "ls", "latest"], self.work, self.env)

    def restored_path(self, target, data):
        # restic 0.14 restores a relative path as given (target/<rel>); look under the absolute
        # path as well, in case another version keeps the whole of it.
        relative = os.path.join(target, data.rel)
        absolute = os.path.join(target, os.path.abspath(data.path).lstrip(os.sep))
        return relative if os.path.lexists(relative) or not os.path.lexists(absolute) else absolute

    def stored(self) -> int:
        return folder_size(self.repo)


class Borg(Tool):
    name = "borg"

    def start(self):
        super().start()
        self.repo = os.path.join(self.work, "repo")
        self.env = clean_environment("BORG_")
        self.env.update(BORG_BASE_DIR=os.path.join(self.work, "home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        subprocess.run(["borg", "init", "-e", "none", self.repo], env=self.env, check=True,
                       capture_output=True)

    def version(self) -> str:
        return first_line(["borg", "--version"])

    def describe(self) -> str:
        return f"{self.version()} (-e none, default lz4 compression)"

    def backup(self, key, data):
        return Command(["borg", "create", f"{self.repo}::{key}", data.rel], data.folder, self.env)

    def restore(self, backup_key, target):
        os.makedirs(target, exist_ok=True)
        return Command(["borg", "extract", f"{self.repo}::{backup_key}"], target, self.env)

    def stored(self) -> int:
        return folder_size(self.repo)


class Copy(Tool):
    """``cp -a`` of each data set: the floor for a first backup and for a restore."""

    name = "cp -a"
    steps = frozenset({"big-first", "tree-first", "t50k-first"})

    def start(self):
        super().start()
        self.copy = os.path.join(self.work, "copy")
        os.makedirs(self.copy)
        self.env = environment()

    def version(self) -> str:
        return first_line(["cp", "--version"])

    def backup(self, key, data):
        return Command(["cp", "-a", data.rel, self.copy], data.folder, self.env)

    def after_step(self, key):
        shutil.rmtree(self.copy)
        os.makedirs(self.copy)


def install_missing(names: list[str]) -> dict:
    """apt-get the peers that are not on PATH (as root only); {name: why it is unavailable}."""
    missing = [n for n in names if n in PACKAGES and not shutil.which(n)]
    if not missing:
        return {}
    if os.geteuid() != 0:
        return {n: f"{n} is not installed and this is not root (apt-get install {PACKAGES[n]})"
                for n in missing}
    packages = [PACKAGES[n] for n in missing]
    print(f"installing {' '.join(packages)} from Debian's packages (apt-get)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            return {n: f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}" for n in missing}
    return {n: f"{n} still not on PATH after apt-get install" for n in missing if not shutil.which(n)}
