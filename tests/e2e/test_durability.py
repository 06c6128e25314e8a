"""README's "Confirmed means every copy is on disk" and "Atomic writes", held to on the real
processes' system calls (issue 11).

Nothing a test can see on disk tells a synced file from one still in the page cache, so these
tests watch the processes themselves: the manager and two storage servers run as ``twistd -n``
under ``strace -f`` (the whole process, every thread of its disk pool), the real ``sdbackup``
initialises a repository and backs up a folder through them, and each trace is read back in the
order the kernel ran the calls:

* a store of fewer than four new chunks: each chunk file in ``incoming/`` is fsynced after its
  last write and before its rename, and after the rename its folder (and ``chunks/`` when the
  folder was made) is fsynced before the server writes the answer naming the chunk;
* a pack of four or more: one ``syncfs`` after the last write and before the first rename, one
  after the last rename and before the answer;
* the catalog: a WAL database (its header says so), written by commits that are not synced one
  by one (``synchronous=FULL`` would) and synced at its checkpoint (``OFF`` never syncs).

The answer is found honestly: the server's bytes on each connection it accepted (local port =
its listening port) are put back together from the traced writes, cut into frames and decoded;
the answer to a store is the first ``ChunksStored``/``ChunkStored`` frame naming the chunk after
its rename, and its time is the call that wrote its first byte.

strace must be installed (``make test`` installs it): without it these tests fail, never skip.
"""

import contextlib
import ctypes
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import attrs
import pytest

from sdbackup.protocols import messages

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
STRACE = "strace"
#: Seconds a traced process may take to be ready, and one ``sdbackup`` command to run (strace
#: slows what it traces; two cores are shared by several test runs).
START_TIMEOUT = 90.0
COMMAND_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
PASSWORD = "durability test password"
#: Files of the folder backed up: small, so the client sends their data chunks in packs.
FILES = 24

MANAGER_LISTENING = re.compile(r"sdbackup-manager listening on port (\d+)")
SERVER_LISTENING = re.compile(r"sdbackup-server listening on port (\d+) as ([^\s,]+)")
SERVER_REGISTERED = re.compile(r"sdbackup-server registered with the manager")
ERROR_LINE = re.compile(r"#(error|critical)\]|Traceback \(most recent call last\)|Unhandled [Ee]rror")

#: What strace records of a storage server: writes (of chunk files and to sockets, whole, to
#: put the answers back together), syncs, renames, folders made.
SERVER_CALLS = "write,writev,pwrite64,sendto,sendmsg,fsync,fdatasync,syncfs,/^rename,/^mkdir"
#: Of the manager: SQLite's writes and syncs (a WAL frame's 24-byte header is enough).
MANAGER_CALLS = "pwrite64,write,fsync,fdatasync"
STRACE_OPTIONS = ("-f", "-tt", "-qq", "-yy", "-x", "--seccomp-bpf", "-e", "signal=none",
                  # A fatal signal to strace reaches twistd (a failed test's teardown).
                  "-I1")


# --- the trace ----------------------------------------------------------------------------------

@attrs.frozen
class Call:
    """One system call: ``start`` and ``end`` are the trace lines of its entry and its result
    (one line, or ``<unfinished ...>`` then ``<... resumed>`` when another thread came between)."""

    name: str
    args: str = attrs.field(repr=lambda args: args[:100])
    result: int
    start: int
    end: int

    def before(self, other: "Call") -> bool:
        """This call returned before ``other`` began."""
        return self.end < other.start

    @property
    def fd_path(self) -> str:
        """What the first argument's descriptor is (strace ``-y``): a path, or ``TCP:[a->b]``."""
        match = re.match(r"\d+<(.*?)>(?:,|$)", self.args)
        return match.group(1) if match else ""

    def strings(self) -> list[bytes]:
        """The quoted strings among the arguments, decoded; a string strace cut is refused."""
        found = []
        for match in re.finditer(r'"((?:[^"\\]|\\.)*)"(\.\.\.)?', self.args):
            if match.group(2):
                raise AssertionError(f"strace cut a string of {self.name}: raise its -s")
            found.append(_unescape(match.group(1)))
        return found


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")
_NAMED = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f", b"a": b"\a",
          b"b": b"\b", b"\\": b"\\", b'"': b'"'}


def _unescape(text: str) -> bytes:
    def one(match):
        code = match.group(1)
        if code[:1] == b"x":
            return bytes((int(code[1:], 16),))
        if code[:1].isdigit():
            return bytes((int(code, 8),))
        return _NAMED[code]

    return _ESCAPE.sub(one, text.encode("ascii"))


_LINE = re.compile(r"^(\d+) +\d\d:\d\d:\d\d\.\d+ (.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+|\?)(?: \w+ \([^()]*\))?(?: <[^<>]*>)?$")


def read_trace(path: Path) -> list[Call]:
    """Every call of a trace, in the order the kernel ran them."""
    calls, pending = [], {}
    for index, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        pid, text = match.groups()
        start = index
        if text.endswith(" <unfinished ...>"):
            pending[pid] = (text[: -len(" <unfinished ...>")], index)
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)$", text)
        if resumed:
            head, start = pending.pop(pid)
            text = head + resumed.group(1)
        call = _CALL.match(text)
        if call is None:
            continue  # a signal, an exit, a call killed by the process's exit
        name, args, result = call.groups()
        calls.append(Call(name, args, -1 if result == "?" else int(result), start, index))
    return calls


@attrs.frozen
class Answer:
    """A reply a server wrote on a connection it accepted."""

    message: messages.Message
    #: The call that wrote the frame's first byte.
    call: Call

    @property
    def chunk_ids(self) -> list[str]:
        if isinstance(self.message, messages.ChunksStored):
            return list(self.message.chunk_ids)
        if isinstance(self.message, messages.ChunkStored):
            return [self.message.chunk_id]
        return []


_SENDS = {"write", "writev", "sendto", "sendmsg"}


def answers(calls: list[Call], port: int) -> list[Answer]:
    """Every message the server wrote on connections it accepted on ``port``, decoded from the
    bytes each write sent, in the order they were sent."""
    streams: dict[str, list[tuple[Call, bytes]]] = defaultdict(list)
    for call in calls:
        peer = re.match(r"TCP:\[[\d.]+:(\d+)->", call.fd_path)
        if call.name in _SENDS and peer and int(peer.group(1)) == port and call.result > 0:
            streams[call.fd_path].append((call, b"".join(call.strings())[: call.result]))
    found = []
    for pieces in streams.values():
        stream = b"".join(data for _, data in pieces)
        starts, offset = [], 0
        for call, data in pieces:
            starts.append((offset, call))
            offset += len(data)
        offset = 0
        while offset + 4 <= len(stream):
            (length,) = struct.unpack_from("!I", stream, offset)
            frame = stream[offset + 4 : offset + 4 + length]
            if len(frame) < length:
                break  # the connection closed mid-frame
            first = max((c for o, c in starts if o <= offset), key=lambda c: c.start)
            found.append(Answer(messages.decode(frame), first))
            offset += 4 + length
    return sorted(found, key=lambda a: a.call.start)


@attrs.frozen
class Store:
    """The new copies one store renamed into place on one server, and its answer."""

    renames: list[Call]
    answer: Answer

    @property
    def temps(self) -> list[str]:
        return [rename.strings()[0].decode() for rename in self.renames]

    @property
    def homes(self) -> list[str]:
        return [rename.strings()[1].decode() for rename in self.renames]


@attrs.frozen
class ServerTrace:
    name: str
    data: Path
    calls: list[Call] = attrs.field(repr=False)
    stores: list[Store] = attrs.field(repr=False)

    def last_write(self, path: str) -> Call:
        writes = [c for c in self.calls if c.name in {"write", "pwrite64", "writev"}
                  and c.fd_path == path]
        assert writes, f"{self.name}: no write of {path} traced"
        return writes[-1]

    def synced(self, name: str, after: Call, before: Call, path: str | None = None) -> bool:
        """A ``name`` call (of ``path``'s descriptor) began after ``after`` returned and returned
        before ``before`` began."""
        return any(c.name == name and c.result == 0 and (path is None or c.fd_path == path)
                   and after.before(c) and c.before(before) for c in self.calls)

    def made(self, folder: str) -> Call | None:
        return next((c for c in self.calls if c.name.startswith("mkdir") and c.result == 0
                     and c.strings()[-1].decode() == folder), None)


def server_trace(name: str, data: Path, port: int, trace: Path) -> ServerTrace:
    """The server's renames of new copies into place, each with the answer that confirmed it."""
    calls = read_trace(trace)
    assert any(c.fd_path.startswith("TCP:[") for c in calls), (
        f"strace -yy named none of {name}'s sockets (it asks the kernel's sock_diag)")
    incoming = str(data / "incoming") + "/"
    renames = [c for c in calls if c.name.startswith("rename") and c.result == 0
               and c.strings()[0].decode().startswith(incoming)]
    replies = answers(calls, port)
    stores: dict[int, tuple[Answer, list[Call]]] = {}
    for rename in renames:
        chunk_id = os.path.basename(rename.strings()[1].decode())
        answer = next((a for a in replies if rename.before(a.call) and chunk_id in a.chunk_ids),
                      None)
        assert answer is not None, (
            f"{name} renamed {chunk_id[:16]} into place and wrote no answer naming it after "
            f"that, on any connection it accepted (was it confirmed before it was in place?)")
        stores.setdefault(id(answer), (answer, []))[1].append(rename)
    return ServerTrace(name, data, calls, [Store(renames, answer) for answer, renames in stores.values()])


# --- the traced cluster -------------------------------------------------------------------------

def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM strace (which passes it on to twistd, ``-I1``) if pytest dies first."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _environment(**more) -> dict:
    env = dict(os.environ)
    env.pop("SDBACKUP_MANAGER", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(more)
    return env


@attrs.define
class Traced:
    """A ``twistd -n`` process run by ``strace``: its output in ``log``, its calls in ``trace``."""

    name: str
    popen: subprocess.Popen
    log: Path
    trace: Path

    @classmethod
    def start(cls, root: Path, name: str, calls: str, string_size: int, args: list) -> "Traced":
        log, trace = root / f"{name}.log", root / f"{name}.strace"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [STRACE, *STRACE_OPTIONS, "-s", str(string_size), "-e", f"trace={calls}",
                 "-o", str(trace), "--", str(BIN / "twistd"), "-n", "--pidfile=",
                 *(str(a) for a in args)],
                cwd=root, env=_environment(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        return cls(name, popen, log, trace)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: re.Pattern) -> re.Match:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = pattern.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not log {pattern.pattern!r}:\n{self.output()}")
            time.sleep(0.1)

    def _twistd_pid(self) -> int | None:
        """The traced ``twistd``: strace's child."""
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rpartition(")")[2].split()[1]) == self.popen.pid:
                    return int(entry)
        return None

    def stop(self) -> int:
        """SIGTERM ``twistd`` (a clean shutdown, traced to its end); strace exits with it."""
        if self.popen.poll() is None:
            pid = self._twistd_pid()
            os.kill(pid if pid is not None else self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode


@attrs.frozen
class Run:
    """What the traced cluster did: each server's trace, and the manager's catalog seen live."""

    servers: list[ServerTrace]
    manager_calls: list[Call]
    catalog: Path
    wal_bytes_while_running: int
    manager_log: str


def sdbackup(manager_port: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "sdbackup"), *(str(a) for a in args)], cwd=cwd, stdin=subprocess.DEVNULL,
        env=_environment(SDBACKUP_MANAGER=f"tcp:127.0.0.1:{manager_port}", SDBACKUP_PASSWORD=PASSWORD),
        capture_output=True, encoding="utf-8", timeout=COMMAND_TIMEOUT)
    assert done.returncode == 0 and done.stderr == "", (
        f"$ sdbackup {' '.join(map(str, args))}: exit status {done.returncode}\n"
        f"{done.stdout}{done.stderr}")
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """A manager and two servers (each chunk on both: the default two copies) under strace;
    ``sdbackup init`` and a backup of ``FILES`` small files through them; then all stopped."""
    if shutil.which(STRACE) is None:
        pytest.fail("strace is not installed: these tests watch the servers' system calls with "
                    "it (`make test` installs it; or apt-get install strace)")
    root = tmp_path_factory.mktemp("traced")
    started: list[Traced] = []
    try:
        manager = Traced.start(root, "manager", MANAGER_CALLS, 32, [
            "sdbackup-manager", "--listen", "tcp:0:interface=127.0.0.1", "--data", root / "manager_data"])
        started.append(manager)
        manager_port = int(manager.wait_for(MANAGER_LISTENING).group(1))
        for index in range(2):
            started.append(Traced.start(root, f"server{index}", SERVER_CALLS, 1 << 20, [
                "sdbackup-server", "--listen", "tcp:0:interface=127.0.0.1", "--data",
                root / f"data_{index}", "--manager", f"tcp:127.0.0.1:{manager_port}",
                "--heartbeat", 0.5]))
        ports = []
        for server in started[1:]:
            ports.append(int(server.wait_for(SERVER_LISTENING).group(1)))
            server.wait_for(SERVER_REGISTERED)
        source = root / "src"
        source.mkdir()
        for index in range(FILES):
            (source / f"file{index:02}.txt").write_bytes(os.urandom(200 + index))
        sdbackup(manager_port, "init", cwd=root)
        assert "saved" in sdbackup(manager_port, "backup", "src", cwd=root).stdout
        catalog = root / "manager_data" / "catalog.sqlite"
        wal = Path(f"{catalog}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else -1
    finally:
        statuses = {process.name: process.stop() for process in started}
    errors = [f"{p.name}: {line}" for p in started for line in p.output().splitlines()
              if ERROR_LINE.search(line)]
    assert not errors, "the traced processes logged errors:\n" + "\n".join(errors)
    # twistd shuts down cleanly on SIGTERM (then exits with 0 or by the signal: strace too).
    assert all(status in (0, -signal.SIGTERM) for status in statuses.values()), (
        statuses, [p.output() for p in started])
    servers = [server_trace(p.name, root / f"data_{i}", ports[i], p.trace)
               for i, p in enumerate(started[1:])]
    return Run(servers, read_trace(manager.trace), catalog, wal_bytes, manager.output())


# --- the tests ----------------------------------------------------------------------------------

def test_a_store_of_fewer_than_four_chunks_is_answered_after_each_file_and_folder_is_fsynced(run):
    """The key object (init), the root tree and the snapshot object each travel alone."""
    for server in run.servers:
        small = [store for store in server.stores if len(store.renames) < 4]
        assert small, f"{server.name}: no store of fewer than four new chunks was traced"
        for store in small:
            answer = store.answer.call
            for temp, home, rename in zip(store.temps, store.homes, store.renames, strict=True):
                chunk = os.path.basename(home)[:16]
                written = server.last_write(temp)
                assert server.synced("fsync", written, rename, temp), (
                    f"{server.name}: chunk {chunk} renamed into place without an fsync of "
                    f"{temp} after its last write")
                folder = os.path.dirname(home)
                assert server.synced("fsync", rename, answer, folder), (
                    f"{server.name}: chunk {chunk} confirmed before its folder {folder} was "
                    f"fsynced after the rename")
                made = server.made(folder)
                if made is not None and written.before(made) and made.before(rename):
                    parent = os.path.dirname(folder)
                    assert server.synced("fsync", made, answer, parent), (
                        f"{server.name}: chunk {chunk} confirmed before {parent}, where its "
                        f"folder was made, was fsynced")


def test_a_pack_of_four_or_more_chunks_is_answered_after_a_syncfs_before_and_after_the_renames(run):
    """The backup's small files travel as data chunks in packs."""
    for server in run.servers:
        packs = [store for store in server.stores if len(store.renames) >= 4]
        assert packs, f"{server.name}: no pack of four or more new chunks was traced"
        for store in packs:
            last_write = max((server.last_write(temp) for temp in store.temps), key=lambda c: c.end)
            first_rename = min(store.renames, key=lambda c: c.start)
            last_rename = max(store.renames, key=lambda c: c.end)
            size = len(store.renames)
            assert server.synced("syncfs", last_write, first_rename), (
                f"{server.name}: a pack of {size} chunks renamed into place without a syncfs "
                f"after its files were written")
            assert server.synced("syncfs", last_rename, store.answer.call), (
                f"{server.name}: a pack of {size} chunks confirmed before a syncfs after its "
                f"renames")


def test_every_chunk_on_disk_was_renamed_into_place_then_confirmed_on_both_servers(run):
    """What the tests above read is the whole store: every chunk file on each server's disk
    was renamed into place from ``incoming/`` and then confirmed in a ChunksStored on a
    connection the server accepted (the client's, or the primary's for the replica)."""
    homes = [{os.path.basename(h) for store in server.stores for h in store.homes}
             for server in run.servers]
    assert homes[0] == homes[1]
    assert len(homes[0]) >= FILES + 3  # the data chunks, the key, the root tree, the snapshot
    for server in run.servers:
        on_disk = {name for folder in ("chunks", "snapshots")
                   for _, _, names in os.walk(server.data / folder) for name in names}
        assert on_disk == homes[0]
        assert all(isinstance(store.answer.message, messages.ChunksStored)
                   for store in server.stores)


def test_the_catalog_is_sqlite_in_wal_mode_and_its_commits_are_synced_only_at_checkpoints(run):
    """journal_mode=WAL is in the file's header (bytes 18 and 19 are 2). synchronous is per
    connection, so it is read from what the manager did: with NORMAL a commit appends its
    frames to the WAL without a sync; the WAL and then the database are synced when the WAL
    is checkpointed (here: when the manager closes its catalog on SIGTERM). FULL would sync
    the WAL after every commit; OFF would never sync."""
    with open(run.catalog, "rb") as f:
        header = f.read(100)
    assert header.startswith(b"SQLite format 3\x00")
    assert header[18:20] == b"\x02\x02", f"the catalog is not in WAL mode: {header[18:20]!r}"
    assert run.wal_bytes_while_running > 0, "no catalog.sqlite-wal while the manager ran"

    wal, database = f"{run.catalog}-wal", str(run.catalog)
    wal_calls = [c for c in run.manager_calls if c.fd_path == wal]
    assert wal_calls, f"the manager never wrote {wal}"
    # A frame is a 24-byte header then a page; a commit's last frame names the database's size.
    commits = [c for c in wal_calls if c.name == "pwrite64" and c.result == 24
               and c.strings()[0][4:8] != b"\x00\x00\x00\x00"]
    # With FULL the call on the WAL after a commit's page is its sync.
    synced_commits = sum(1 for index, call in enumerate(wal_calls) if call in commits
                         and index + 2 < len(wal_calls)
                         and wal_calls[index + 2].name in {"fsync", "fdatasync"})
    # (the database's syncs once it is in WAL mode: one per checkpoint)
    database_syncs = [c for c in run.manager_calls if c.fd_path == database
                      and c.name in {"fsync", "fdatasync"} and wal_calls[0].before(c)]
    wal_syncs = [c for c in wal_calls if c.name in {"fsync", "fdatasync"}]
    # (registrations, the key's and the snapshot's commits; the servers' notices and
    # heartbeats ride along with those, or with a commit of their own 2 s later)
    assert len(commits) >= 3, f"only {len(commits)} commits traced:\n{run.manager_log}"
    assert wal_syncs and database_syncs, "the catalog was never synced (synchronous=OFF?)"
    assert synced_commits <= len(database_syncs), (
        f"{synced_commits} of {len(commits)} commits were each followed by a sync of the WAL, "
        f"for {len(database_syncs)} checkpoints: synchronous is not NORMAL")
