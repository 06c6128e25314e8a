"""The cluster keeps its own metadata: real processes, the manager's catalog deleted, crafted snapshots.

Every test starts its own cluster (``start_cluster``: a manager and three storage
servers as ``twistd`` processes, replication factor 2) with short timings and a short
safe mode (``fast_manager_options``). The snapshots live on the servers as objects; the
manager's catalog is only an index of them, so deleting ``manager_data`` loses nothing:
a manager started again rebuilds it from what the servers report, with no flag, and
every snapshot is listed again with the same id and restores byte for byte, also with
a server gone. A snapshot built by hand as an attacker would (objects stored through
the protocol, committed like any other) cannot make a restore write outside its target.
"""

import hashlib
import os
import re
import signal
import stat
import threading
import time
from pathlib import Path

import attrs
import msgpack
import pytest
import pytest_twisted
from twisted.internet import reactor

from sdbackup import hashing, objects
from sdbackup.client.session import Session
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import ChunkNeed, ChunkRef, CommitSnapshot, PlacementRequest, StoreChunks
from sdbackup.protocols.peer import RemoteError

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
SIZE = r"[\d.]+ (?:B|KiB|MiB|GiB|TiB)"
SAVED = re.compile(rf"^snapshot (?P<id>[0-9a-f]{{8}}) saved: .*\((?P<new>{SIZE}) new\)", re.MULTILINE)
UNITS = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "TiB": 1024 * 1024 * MiB}
#: Seconds within which a restarted manager lists every snapshot again.
REBUILD_TIMEOUT = 30.0


# --- sources and how to compare them -------------------------------------------------------


def write(path: Path, data: bytes, mode: int = 0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def make_source(root: Path, name: str = "src") -> Path:
    """A folder of a few MiB: random files of several sizes, many small ones in nested
    folders, an empty file and folder, links (one dangling), odd modes, names with spaces."""
    src = root / name
    write(src / "big.bin", os.urandom(3 * MiB + 4321))
    write(src / "medium.bin", os.urandom(700_000), mode=0o600)
    write(src / "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    write(src / "empty.txt", b"")
    (src / "empty folder").mkdir()
    for index in range(60):
        write(src / f"many/part{index % 4}/note {index}.txt", os.urandom(index * 37))
    write(src / "a/b/c/d/leaf.txt", b"leaf\n" * 500)
    write(src / "café/naïve.txt", "non-ASCII: 日本語\n".encode())
    (src / "link to leaf").symlink_to("a/b/c/d/leaf.txt")
    (src / "dangling").symlink_to("no such file")
    return src


def change(src: Path, round_: int):
    """What happens to a folder between two backups: bytes rewritten, added, deleted, a mode."""
    with open(src / "big.bin", "r+b") as f:  # same size, new bytes in the middle
        f.seek(MiB)
        f.write(os.urandom(4096))
    write(src / f"new in round {round_}.txt", os.urandom(5000))
    write(src / "many/part1/note 1.txt", os.urandom(123))
    (src / f"many/part{round_ % 4}/note {round_ + 8}.txt").unlink()
    (src / "medium.bin").chmod(0o640 if round_ % 2 else 0o600)


def manifest(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself as "."): kind, mode, owner, mtime in ns, and a file's
    size and SHA-256 or a link's target."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files] if folder == str(root) else [*dirs, *files]:
            path = Path(folder) / name
            st = os.lstat(path)
            common = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            rel = os.path.normpath(os.path.relpath(path, root))
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", os.readlink(path), *common)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", *common)
            else:
                entries[rel] = ("file", *common, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def assert_same(expected: dict[str, tuple], restored: Path):
    actual = manifest(restored)
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"restored {restored}: missing {missing}, unexpected {extra}"
    different = {p: (expected[p], actual[p]) for p in expected if expected[p] != actual[p]}
    assert not different, f"restored {restored} differs (expected, restored):\n" + "\n".join(
        f"  {p}: {e} != {a}" for p, (e, a) in sorted(different.items()))


def restore_and_compare(cluster, cwd: Path, snapshot: str, expected: dict, name: str = "src"):
    target = cwd / f"restored-{snapshot}"
    result = cluster.sdbackup("restore", snapshot, "--target", target, cwd=cwd)
    assert result.stderr.strip() == "", result.describe()
    assert_same(expected, target / name)


def snapshot_lines(cluster, cwd: Path) -> list[str]:
    """The rows of ``sdbackup snapshots`` (without its header)."""
    return cluster.sdbackup("snapshots", cwd=cwd).stdout.splitlines()[1:]


def wait_for_listing(cluster, cwd: Path, expected: list[str], timeout: float = REBUILD_TIMEOUT):
    """Run ``sdbackup snapshots`` until it shows exactly ``expected`` (servers report as they come)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = snapshot_lines(cluster, cwd)
        if lines == expected:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"`sdbackup snapshots` after the restart, {timeout} s on:\n" + "\n".join(lines)
                        + "\nbefore it:\n" + "\n".join(expected) + "\n" + cluster.manager.output())
        time.sleep(0.3)


def back_up_three_times(cluster, cwd: Path) -> dict[str, dict]:
    """Three snapshots of ``cwd/src``, the folder changing between them: {id: manifest}."""
    src = make_source(cwd)
    states = {}
    for round_ in range(3):
        if round_:
            change(src, round_)
        snapshot = cluster.backup("src", cwd=cwd)
        states[snapshot] = manifest(src)
    assert len(states) == 3, states.keys()
    return states


def parse_size(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


# --- the catalog lost ------------------------------------------------------------------------


def test_a_deleted_catalog_is_rebuilt_from_the_servers(start_cluster, fast_manager_options, tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options)
    states = back_up_three_times(cluster, tmp_path)
    before = snapshot_lines(cluster, tmp_path)
    assert [line.split()[0] for line in before] == list(states), before

    marks = cluster.restart_manager(wipe_catalog=True)
    cluster.wait_registered_since(marks)

    wait_for_listing(cluster, tmp_path, before)  # same ids, times, hosts, counts and paths
    for snapshot, expected in states.items():
        restore_and_compare(cluster, tmp_path, snapshot, expected)
    # And the rebuilt cluster takes new backups whose parent is found again.
    again = cluster.sdbackup("backup", "src", cwd=tmp_path)
    assert again.stderr.strip() == "", again.describe()
    saved = SAVED.search(again.stdout)
    assert saved is not None, again.describe()
    assert parse_size(saved["new"]) < 64 * 1024, again.describe()


def test_a_deleted_catalog_is_rebuilt_with_a_server_also_lost(start_cluster, fast_manager_options,
                                                               tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options)
    states = back_up_three_times(cluster, tmp_path)
    before = snapshot_lines(cluster, tmp_path)
    lost = max(cluster.servers, key=lambda s: sum(
        os.lstat(Path(folder) / n).st_size for folder, _, names in os.walk(s.data) for n in names))
    survivors = [s for s in cluster.servers if s is not lost]

    cluster.kill(lost.process)  # SIGKILL: replication factor 2 leaves a copy of everything
    marks = cluster.restart_manager(wipe_catalog=True)
    cluster.wait_registered_since(marks, servers=survivors)

    wait_for_listing(cluster, tmp_path, before)
    for snapshot, expected in states.items():
        restore_and_compare(cluster, tmp_path, snapshot, expected)


def test_a_backup_started_right_after_a_manager_restart_waits_and_succeeds(
        start_cluster, fast_manager_options, tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options)
    first_source = make_source(tmp_path)
    first = cluster.backup("src", cwd=tmp_path)
    first_state = manifest(first_source)
    second_source = make_source(tmp_path, "src2")
    second_state = manifest(second_source)

    # The servers are frozen while the manager restarts, so none can register before the
    # backup starts: the manager must make it wait, not fail it.
    frozen = [s.process.popen.pid for s in cluster.servers]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        marks = cluster.restart_manager()
        backup = cluster.start_sdbackup("backup", "src2", cwd=tmp_path)
        time.sleep(1.5)
        if not backup.running():
            pytest.fail("a backup started before any server registered did not wait:\n"
                        + backup.wait().describe())
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    result = backup.wait()

    assert result.returncode == 0, result.describe()
    told = [line for line in result.stderr.splitlines() if line.strip()]
    assert all("starting" in line for line in told), result.describe()
    second = cluster.snapshot_id(result.stdout)
    cluster.wait_registered_since(marks)
    restore_and_compare(cluster, tmp_path, first, first_state)
    restore_and_compare(cluster, tmp_path, second, second_state, name="src2")


# --- what a backup notices and what it sends --------------------------------------------------


def test_a_file_growing_while_it_is_read_is_reported_and_the_backup_exits_3(start_cluster, tmp_path):
    cluster = start_cluster()
    src = tmp_path / "src"
    write(src / "steady.txt", b"steady\n" * 1000)
    growing = src / "growing.bin"
    original = os.urandom(48 * MiB)  # read in many pieces: the appends below land mid-read
    write(growing, original)
    stop = threading.Event()

    def append():
        with open(growing, "ab") as f:
            while not stop.wait(0.005):
                f.write(os.urandom(4096))
                f.flush()

    appender = threading.Thread(target=append, daemon=True)
    appender.start()
    try:
        result = cluster.sdbackup("backup", "src", cwd=tmp_path, check=False)
    finally:
        stop.set()
        appender.join()

    assert result.returncode == 3, result.describe()
    assert "growing.bin" in result.stderr, result.describe()
    assert "steady.txt" not in result.stderr, result.describe()
    snapshot = cluster.snapshot_id(result.stdout)
    target = tmp_path / "restored"
    restored = cluster.sdbackup("restore", snapshot, "--target", target, cwd=tmp_path)
    assert (target / "src/steady.txt").read_bytes() == b"steady\n" * 1000, restored.describe()
    with open(target / "src/growing.bin", "rb") as f:  # what was read: at least the first bytes
        assert f.read(len(original)) == original


def test_an_unchanged_backup_sends_and_stores_almost_nothing(start_cluster, tmp_path):
    cluster = start_cluster()
    src = tmp_path / "src"
    for index in range(1500):
        write(src / f"d{index % 30}/e{index % 7}/f{index}.txt", os.urandom(index % 3000))
    write(src / "big.bin", os.urandom(6 * MiB))
    first = cluster.sdbackup("backup", "src", cwd=tmp_path)
    assert first.stderr.strip() == "", first.describe()
    stored = cluster.data_bytes()

    again = cluster.sdbackup("backup", "src", cwd=tmp_path)

    assert again.stderr.strip() == "", again.describe()
    saved = SAVED.search(again.stdout)
    assert saved is not None, again.describe()
    assert parse_size(saved["new"]) < 16 * 1024, again.describe()
    grown = cluster.data_bytes() - stored
    assert grown < MiB, f"the servers' folders grew by {grown} bytes:\n{again.describe()}"
    lines = snapshot_lines(cluster, tmp_path)
    assert len(lines) == 2 and lines[0].split()[-4:] == lines[1].split()[-4:], lines  # files, size, paths
    print(f"\nunchanged backup of 1,501 files: {saved['new']} new, the servers' folders grew "
          f"{grown} bytes")


# --- a crafted snapshot ------------------------------------------------------------------------


@attrs.frozen
class Outside:
    """What must stay as it is: an empty folder and a file, both outside the restore's target."""

    folder: Path
    victim: Path

    def state(self) -> dict:
        found = {}
        inside = [Path(folder) / name for folder, dirs, files in os.walk(self.folder)
                  for name in dirs + files]
        for path in [self.folder, *inside, self.victim]:
            st = os.lstat(path)
            found[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, st.st_size,
                                sorted(os.listxattr(path, follow_symlinks=False)),
                                path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
        return found


class Attacker:
    """A client that stores objects it built itself, through the protocol, as the real client does:
    ``PlacementRequest`` to the manager, ``StoreChunks(kind=...)`` to each primary (which forwards to
    the replicas), ``CommitSnapshot`` to the manager."""

    def __init__(self, session: Session):
        self.session = session

    async def store(self, kind: str, blobs: list[bytes]) -> list[bytes]:
        ids = [hashing.chunk_id(b) if kind == Kind.DATA else hashing.object_id(kind, b) for b in blobs]
        placement = await self.session.ask(PlacementRequest(
            chunks=[ChunkNeed(i, len(b)) for i, b in zip(ids, blobs, strict=True)]))
        packs: dict[tuple, list] = {}
        for chunk_id, blob in zip(ids, blobs, strict=True):
            if chunk_id not in placement.known:
                packs.setdefault(tuple(placement.assignments[chunk_id]), []).append((chunk_id, blob))
        tickets = {tuple(ticket.chain): ticket for ticket in placement.tickets}
        for servers, items in packs.items():
            await self.session.servers.request(servers[0], StoreChunks(
                chunks=[ChunkRef(i, len(b), hashing.checksum(b)) for i, b in items],
                forward_to=list(servers[1:]), kind=kind, ticket=tickets[servers],
                payload=b"".join(b for _, b in items)))
        return [bytes.fromhex(i) for i in ids]

    async def commit(self, snapshot: bytes) -> str:
        snapshot_id = (await self.store(Kind.SNAPSHOT, [snapshot]))[0].hex()
        committed = await self.session.ask(CommitSnapshot(snapshot_id=snapshot_id))
        return committed.snapshot.snapshot_id


def file_node(name: bytes, data: bytes, data_id: bytes, **more) -> Node:
    """A file of one chunk, as the real client describes it (with its whole-file hash)."""
    hasher = hashing.file_hasher()
    hasher.update(data)
    fields = {"mode": 0o644, **more}
    return Node(name=name, type="file", size=len(data), content=(data_id,), hash=hasher.digest(), **fields)


def hostile_tree(entries: list[tuple[bytes, Node]]) -> bytes:
    """A tree object as no honest client writes one: ``entries`` in this order, under these names
    (``..``, a name with ``/``, the same name twice...), with a valid envelope, so any server
    stores it. Each node is encoded as a valid one and its name swapped afterwards."""
    placeholders = [attrs.evolve(node, name=b"n%04d" % i) for i, (_, node) in enumerate(entries)]
    honest = objects.open_envelope(objects.encode_tree(objects.make_tree(placeholders)))
    body = msgpack.unpackb(honest.body, raw=False)
    for item, (name, _) in zip(body, entries, strict=True):
        item["n"] = name
    return objects.seal(Kind.TREE, honest.tree_refs, honest.data_refs, msgpack.packb(body, use_bin_type=True))


async def craft_and_commit(manager: str, outside: Outside) -> tuple[list[str], list[str]]:
    """Store the attacker's objects and commit two snapshots: (committed ids, refusals)."""
    session = Session(reactor, manager)
    await session.connect()
    attacker = Attacker(session)
    try:
        good, pwned = b"good\n", b"pwned\n"
        good_id, pwned_id = await attacker.store(Kind.DATA, [good, pwned])
        pwned_file = file_node(b"x", pwned, pwned_id)
        # Malformed trees, each behind its own folder so that the rest can restore.
        escape_dir = objects.encode_tree(objects.make_tree([pwned_file]))
        escape_dir_id, = await attacker.store(Kind.TREE, [escape_dir])
        link_out = Node(name=b"esc", type="symlink", mode=0o777, target=str(outside.folder).encode())
        malformed = [
            # the attack: a link `esc` to an outside folder, then a folder `esc` holding `x`
            hostile_tree([(b"esc", link_out),
                          (b"esc", Node(name=b"d", type="dir", mode=0o755, subtree=escape_dir_id))]),
            hostile_tree([(b"..", Node(name=b"d", type="dir", mode=0o755, subtree=escape_dir_id))]),
            hostile_tree([(b"../../pwned", file_node(b"f", pwned, pwned_id))]),
            hostile_tree([(str(outside.folder / "pwned").encode(), file_node(b"f", pwned, pwned_id))]),
            hostile_tree([(b".", Node(name=b"d", type="dir", mode=0o755, subtree=escape_dir_id))]),
        ]
        malformed_ids = await attacker.store(Kind.TREE, malformed)
        root_nodes = [
            file_node(b"good.txt", good, good_id),
            # Links out of the target, with metadata that must not land on what they point to.
            Node(name=b"esc", type="symlink", mode=0o777, uid=12345, gid=12345, mtime_ns=1,
                 target=str(outside.folder).encode(), xattrs=((b"trusted.evil", b"1"),)),
            Node(name=b"rel", type="symlink", target=b"../outside"),
            # A hard-link group mixing a link to an outside file and a file with bytes.
            Node(name=b"victim_link", type="symlink", target=str(outside.victim).encode(),
                 dev=77, inode=4242, links=2),
            file_node(b"victim_twin", pwned, pwned_id, dev=77, inode=4242, links=2, mode=0o666),
            file_node(b"a_twin", pwned, pwned_id, dev=77, inode=4343, links=2),
            Node(name=b"b_link", type="symlink", target=str(outside.victim).encode(),
                 dev=77, inode=4343, links=2),
            *[Node(name=b"bad%d" % i, type="dir", mode=0o755, subtree=tree_id)
              for i, tree_id in enumerate(malformed_ids)],
        ]
        root_id, = await attacker.store(Kind.TREE, [objects.encode_tree(objects.make_tree(root_nodes))])
        committed, refused = [], []
        for paths in ((b"crafted",), (b"../../outside", str(outside.folder).encode())):
            snapshot = objects.Snapshot(time_ns=time.time_ns(), host="attacker", paths=paths,
                                        tree=root_id, summary={"files": 5, "dirs": 6, "bytes": 30})
            try:
                committed.append(await attacker.commit(objects.encode_snapshot(snapshot)))
            except RemoteError as e:  # refusing hostile paths is a defence too
                refused.append(f"{paths!r}: {e.reason}")
        return committed, refused
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_a_crafted_snapshot_restores_nothing_outside_the_target(start_cluster, tmp_path):
    # A plaintext repository, whose objects any client may write: the restore's own checks are
    # what stands between a crafted tree and the disk (in an encrypted repository only a
    # holder of the password could craft one; the restore is the same code).
    cluster = start_cluster(repository="none")
    outside = Outside(tmp_path / "outside", tmp_path / "elsewhere" / "victim")
    outside.folder.mkdir()
    write(outside.victim, b"the victim's own bytes\n", mode=0o600)
    before = outside.state()

    committed, refused = await craft_and_commit(cluster.manager_endpoint, outside)

    assert committed, f"the cluster refused every crafted snapshot: {refused}"
    for snapshot in committed:
        target = tmp_path / f"restored-{snapshot[:8]}"
        result = cluster.sdbackup("restore", snapshot[:8], "--target", target, cwd=tmp_path, check=False)

        assert outside.state() == before, f"the restore changed things outside {target}:\n{result.describe()}"
        assert list(outside.folder.iterdir()) == [], result.describe()
        assert not (tmp_path / "pwned").exists() and not (tmp_path.parent / "pwned").exists()
        assert not (target / "x").exists() and not (target / "pwned").exists()
        assert result.returncode == 3, result.describe()
        for index in range(5):  # each malformed folder is reported, with its name
            assert f"bad{index}" in result.stderr, result.describe()
        assert "Traceback" not in result.stderr, result.describe()
        assert (target / "good.txt").read_bytes() == b"good\n", result.describe()
        made = [Path(folder) / name for folder, dirs, files in os.walk(target) for name in dirs + files]
        for path in made:  # whatever was made is inside the target (links are not followed)
            assert path.is_symlink() or os.path.realpath(path).startswith(str(target) + os.sep), path
    print(f"\ncrafted snapshots committed: {len(committed)}; refused: {refused or 'none'}; the last "
          f"restore said:\n{result.stderr}")
