"""Servers and the manager that lie, on purpose: a restore, a backup and the repair notice.

A lying server here is a real in-process server whose chunk store answers reads with other
bytes than it holds, each with a checksum that matches the lie (so the per-hop check passes
and only the id check can catch it); a lying manager names holders that do not hold a chunk
or do not exist. Each restore must fall back to a good copy where one exists, name the entry
that failed where none does, and never leave wrong bytes under a restored file's name.
"""

import os

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from sdbackup import hashing
from sdbackup.client.repository import ChunkUnavailable, Repository
from sdbackup.client.restore import Restore
from sdbackup.objects import Kind
from sdbackup.protocols.messages import MAX_FETCH_IDS, ChunksStored, Locations

from .test_cluster import backup, restore, write

MiB = 1024 * 1024


# --- the lies --------------------------------------------------------------------------------


def garbage(chunk_id: str, payload: bytes) -> bytes:
    """Other bytes of the same length."""
    return bytes(b ^ 0x5A for b in payload)


def truncated(chunk_id: str, payload: bytes) -> bytes:
    return payload[: len(payload) // 2]


def another_chunk(others: dict):
    """The bytes of a real chunk of another file (valid data, wrong id)."""
    def lie(chunk_id: str, payload: bytes) -> bytes:
        return next(data for other, data in others.items() if other != chunk_id)
    return lie


def lie_on_reads(server, kinds: set, change):
    """Make ``server`` answer reads of chunks of ``kinds`` with ``change(chunk_id, payload)``,
    under a checksum of the changed bytes."""
    store = server.store
    get, get_many = store.get, store.get_many

    def lying(chunk_id, answer):
        kind, _, payload = answer
        if kind not in kinds:
            return answer
        told = change(chunk_id, bytes(payload))
        return kind, hashing.checksum(told), told

    def lying_get(chunk_id):
        return lying(chunk_id, get(chunk_id))

    def lying_get_many(chunk_ids, max_bytes):
        return [(chunk_id, outcome if isinstance(outcome, Exception) else lying(chunk_id, outcome))
                for chunk_id, outcome in get_many(chunk_ids, max_bytes)]

    store.get, store.get_many = lying_get, lying_get_many


def files_under(folder) -> dict:
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


async def data_chunks(cluster) -> dict:
    """Every data chunk the servers hold: id -> bytes."""
    chunks = {}
    for server in cluster.servers:
        for chunk_id in server.store.chunk_ids():
            kind, _, payload = server.store.get(chunk_id)
            if kind == Kind.DATA:
                chunks[chunk_id] = bytes(payload)
    return chunks


@pytest.fixture
def source(tmp_path, monkeypatch):
    """Small files (restored in batches) and a large one (restored chunk by chunk)."""
    monkeypatch.chdir(tmp_path)
    contents = {"src/small/a": os.urandom(5000), "src/small/b": os.urandom(70_000),
                "src/large": os.urandom(6 * MiB + 4321)}
    for path, data in contents.items():
        write(tmp_path / path, data)
    return contents


LIES = {"garbage": garbage, "truncated": truncated, "another chunk": None}


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest_twisted.ensureDeferred
async def test_one_lying_server_is_caught_and_the_other_copy_restored(cluster, source, tmp_path, lie):
    await backup(cluster, "src")
    change = LIES[lie] or another_chunk(await data_chunks(cluster))
    lie_on_reads(cluster.servers[0], {Kind.DATA}, change)  # every chunk has a copy elsewhere

    result = await restore(cluster, tmp_path / "out")

    assert result.errors == []
    assert files_under(tmp_path / "out") == source


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest_twisted.ensureDeferred
async def test_when_every_copy_lies_the_files_fail_and_no_wrong_bytes_are_left(
        cluster, source, tmp_path, lie):
    await backup(cluster, "src")
    change = LIES[lie] or another_chunk(await data_chunks(cluster))
    for server in cluster.servers:
        lie_on_reads(server, {Kind.DATA}, change)

    result = await restore(cluster, tmp_path / "out")

    assert sorted(error.split(":")[0] for error in result.errors) == sorted(source)
    # No restored file, no temporary file: nothing but the folders.
    assert files_under(tmp_path / "out") == {}


@pytest_twisted.ensureDeferred
async def test_a_server_giving_another_tree_for_a_tree_id_is_caught(cluster, source, tmp_path):
    await backup(cluster, "src")
    trees = {}
    for server in cluster.servers:
        for chunk_id in server.store.chunk_ids():
            kind, _, payload = server.store.get(chunk_id)
            if kind == Kind.TREE:
                trees[chunk_id] = bytes(payload)
    assert len(trees) >= 3  # /, src, small: a valid tree of the same backup to lie with

    def other_tree(chunk_id, payload):
        return next(data for other, data in trees.items() if other != chunk_id)

    lie_on_reads(cluster.servers[0], {Kind.TREE}, other_tree)
    result = await restore(cluster, tmp_path / "out")
    assert result.errors == []
    assert files_under(tmp_path / "out") == source

    for server in cluster.servers[1:]:
        lie_on_reads(server, {Kind.TREE}, other_tree)
    with pytest.raises(ChunkUnavailable, match="does not match the id"):
        await restore(cluster, tmp_path / "again")
    assert files_under(tmp_path / "again") == {}


@pytest_twisted.ensureDeferred
async def test_stale_and_invented_locations_from_the_manager_are_survived(cluster, source, tmp_path):
    await backup(cluster, "src")
    manager = cluster.manager.manager
    honest = manager.handle_Locate
    addresses = [s.server.address for s in cluster.servers]

    async def lying_locate(msg, connection):
        reply = await honest(msg, connection)
        holders = {}
        for chunk_id, real in reply.holders.items():
            stale = [a for a in addresses if a not in real]  # live, but without the chunk
            holders[chunk_id] = ["tcp:127.0.0.1:1", *stale, *real]  # nothing listens on port 1
        return Locations(request_id=reply.request_id, holders=holders)

    manager.handle_Locate = lying_locate
    result = await restore(cluster, tmp_path / "out")

    assert result.errors == []
    assert files_under(tmp_path / "out") == source


def fully_replicated(cluster):
    """A condition: the manager counts no chunk short of copies (from the servers' reports)."""
    async def condition():
        known, short, missing = await cluster.chunk_health()
        return known and not short and not missing
    return condition


async def restores_once_repaired_without(cluster, liar, source: dict, target):
    """Wait for two real copies of every chunk on disk, and for the manager to count them,
    then stop ``liar``: the restore must still be whole."""
    def every_chunk_twice():
        counts = {}
        for server in cluster.servers:
            for chunk_id in server.store.chunk_ids():
                counts[chunk_id] = counts.get(chunk_id, 0) + 1
        return counts and all(n >= 2 for n in counts.values())

    await cluster.until(every_chunk_twice, timeout=30, what="two real copies of every chunk")
    await cluster.until(fully_replicated(cluster), what="the manager counting them")
    await cluster.stop_server(liar)
    result = await restore(cluster, target)
    assert result.errors == []
    assert files_under(target) == source


@pytest_twisted.ensureDeferred
async def test_a_replica_that_confirms_without_storing_is_repaired_around(cluster, source, tmp_path):
    """The liar confirms every store forwarded to it, writes nothing and tells the manager
    nothing: the manager, which counts copies from the servers' own reports, sees one copy
    and has the repair make a second on the honest server."""
    liar = cluster.servers[0]
    real_store = liar.server.handle_StoreChunks

    async def confirm_only(msg, connection):
        if msg.forward_to:  # asked as a primary: behave, so the lie is only the replica's
            return await real_store(msg, connection)
        return ChunksStored(request_id=msg.request_id, chunk_ids=[r.chunk_id for r in msg.chunks],
                            holders=[liar.server.address])

    liar.server.handle_StoreChunks = confirm_only
    await backup(cluster, "src")
    await restores_once_repaired_without(cluster, liar, source, tmp_path / "out")


@pytest_twisted.ensureDeferred
async def test_a_primary_that_acks_before_its_replica_is_repaired_around(cluster, source, tmp_path):
    """The liar, as primary, stores its copy and acknowledges at once naming its replica as a
    holder, without forwarding: only the servers' own reports count, so the repair makes the
    missing copies, and the backup survives the liar's death."""
    liar = cluster.servers[0]
    real_store = liar.server.handle_StoreChunks

    async def ack_early(msg, connection):
        if not msg.forward_to:
            return await real_store(msg, connection)
        reply = await real_store(attrs.evolve(msg, forward_to=[]), connection)
        reply.holders.extend(msg.forward_to)  # the lie: copies that were never made
        return reply

    liar.server.handle_StoreChunks = ack_early
    await backup(cluster, "src")
    await restores_once_repaired_without(cluster, liar, source, tmp_path / "out")


@pytest_twisted.ensureDeferred
async def test_a_holder_that_never_answers_is_left_after_the_time_out(cluster, source, tmp_path):
    """One server takes every fetch and never answers: once the request times out the
    restore asks the other holder, and finishes whole."""
    await backup(cluster, "src")
    silent = cluster.servers[0]
    never = []

    def swallow(msg, connection):
        waiting = defer.Deferred()
        never.append(waiting)
        return waiting

    silent.server.handle_FetchChunk = silent.server.handle_FetchChunks = swallow
    session = await cluster.session()
    session.servers._request_timeout = 1.0  # instead of 90 s
    try:
        started = reactor.seconds()
        result = await Restore(session, "latest", str(tmp_path / "out"), ()).run()
    finally:
        await session.close()  # the unanswered requests are left pending: never answered

    assert never, "the silent server was never asked"
    assert result.errors == []
    assert files_under(tmp_path / "out") == source
    assert reactor.seconds() - started >= 1.0  # it did wait for the time-out


# --- the reader's own guarantees, with honest peers around the liars' -------------------------


@pytest_twisted.ensureDeferred
async def test_a_chunk_no_copy_of_which_is_good_is_named_in_the_error(cluster, source, tmp_path):
    """The error names the chunk by its first 16 hex digits, as ``check`` and the logs do, and
    says why each holder failed; one no server holds says so."""
    await backup(cluster, "src")
    for server in cluster.servers:
        lie_on_reads(server, {Kind.DATA}, garbage)
    chunk_id, _ = next(iter((await data_chunks(cluster)).items()))
    session = await cluster.session()
    try:
        repository = Repository(session)
        holders = (await repository.locate([chunk_id]))[chunk_id]
        with pytest.raises(ChunkUnavailable) as one:
            await repository.fetch(Kind.DATA, chunk_id, holders)
        many = await repository.fetch_many(Kind.DATA, {"ab" * 32: [], chunk_id: holders})
    finally:
        await session.close()
    for error in (str(one.value), str(many[chunk_id])):
        assert error.startswith(f"no good copy of data {chunk_id[:16]}: ")
        assert all(f"{holder}: its copy does not match the id" in error for holder in holders)
    assert str(many["ab" * 32]) == f"no server holds data {'ab' * 8}"


@pytest.mark.parametrize("read", ["FetchChunk", "FetchChunks"])
@pytest_twisted.ensureDeferred
async def test_reads_of_one_chunk_start_at_each_holder_in_turn(cluster, source, tmp_path, read):
    """So reads spread over the servers: a chunk read four times is read twice from each of
    its two holders, one by one (``fetch``) or in pages (``fetch_many``)."""
    await backup(cluster, "src")
    chunk_id, data = next(iter((await data_chunks(cluster)).items()))
    asked = {}
    for server in cluster.servers:
        handle = getattr(server.server, f"handle_{read}")

        def counting(msg, connection, handle=handle, name=server.server.address):
            asked[name] = asked.get(name, 0) + 1
            return handle(msg, connection)
        setattr(server.server, f"handle_{read}", counting)
    session = await cluster.session()
    try:
        repository = Repository(session)
        holders = (await repository.locate([chunk_id]))[chunk_id]
        for _ in range(4):
            if read == "FetchChunk":
                assert await repository.fetch(Kind.DATA, chunk_id, holders) == data
            else:
                assert await repository.fetch_many(Kind.DATA, {chunk_id: holders}) == {chunk_id: data}
    finally:
        await session.close()
    assert asked == {holder: 2 for holder in holders}


@pytest_twisted.ensureDeferred
async def test_a_holder_missing_a_whole_page_of_ids_is_still_asked_for_the_next(
        cluster, source, tmp_path):
    """A FetchChunks reply that names every id of its page as missing is an answer: the ids
    after that page are asked too, not failed unasked."""
    await backup(cluster, "src")
    chunks = await data_chunks(cluster)
    server = cluster.servers[0]
    held = {c: d for c, d in chunks.items() if server.store.has(c)}
    assert held
    absent = {f"{i:064x}": [server.server.address] for i in range(MAX_FETCH_IDS)}
    session = await cluster.session()
    try:
        found = await Repository(session).fetch_many(
            Kind.DATA, absent | {c: [server.server.address] for c in held})
    finally:
        await session.close()
    assert {c: found[c] for c in held} == held
    assert all(isinstance(found[c], ChunkUnavailable) for c in absent)
    assert "does not hold it" in str(found[f"{0:064x}"])


@pytest_twisted.ensureDeferred
async def test_find_follows_a_path_through_the_trees(cluster, source, tmp_path):
    await backup(cluster, "src")
    session = await cluster.session()
    try:
        repository = Repository(session)
        snapshot = await repository.load_snapshot((await repository.snapshots())[-1].snapshot_id)
        small = await repository.find(snapshot.tree, b"src/small")
        a = await repository.find(snapshot.tree, b"src/small/a")
        through_a_file = await repository.find(snapshot.tree, b"src/large/x")
        missing = await repository.find(snapshot.tree, b"src/nothing/a")
    finally:
        await session.close()
    assert small.type == "dir" and small.name == b"small"
    assert a.type == "file" and a.name == b"a" and a.size == len(source["src/small/a"])
    assert through_a_file is None and missing is None
