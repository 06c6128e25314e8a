"""The packer and store: packs per kind, each blob once, failover, held checks.

Pure parts on their own; the Uploader against a manager and three servers in
this process (the ``cluster`` fixture: real sockets, real chunk files).
"""

import os

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from sdbackup import hashing, objects
from sdbackup.client.uploader import (
    BATCH_BYTES,
    BATCH_CHUNKS,
    BATCHES_IN_FLIGHT,
    PACK_BYTES,
    PACK_CHUNKS,
    SMALL_BATCHES_IN_FLIGHT,
    Blob,
    HeldCheck,
    RecentIds,
    Signal,
    Uploader,
    packs,
)
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import HasChunks, Placement


def blob_items(sizes):
    return [(bytes([i % 256]) * 32, Blob(Kind.DATA, b"x" * size, "")) for i, size in enumerate(sizes)]


def test_packs_are_bounded_in_bytes_and_count_and_a_large_blob_goes_alone():
    found = packs(blob_items([400 * 1024] * 5 + [3 * 1024 * 1024] + [10] * (PACK_CHUNKS + 1)))
    sizes = [[len(blob.data) for _, blob in pack] for pack in found]
    assert sizes[:4] == [[400 * 1024] * 2, [400 * 1024] * 2, [400 * 1024], [3 * 1024 * 1024]]
    assert [len(pack) for pack in sizes[4:]] == [PACK_CHUNKS, 1]
    assert all(sum(pack) <= PACK_BYTES or len(pack) == 1 for pack in sizes)


def test_a_failed_signal_does_not_put_its_waiters_to_sleep():
    # A placement that fails at once (a message that cannot be encoded, a closed link) fails
    # the signal inside ``flush``, before the walk waits on it: nothing would wake it again.
    signal = Signal()
    waiting = signal.wait()
    signal.fail(Failure(ValueError("cannot encode a message: Integer exceeds 64-bit range")))
    assert waiting.called
    assert signal.wait().called
    with pytest.raises(ValueError, match="cannot encode a message"):
        signal.check()


def test_recent_ids_forget_the_older_half_only():
    recent = RecentIds(limit=3)
    for i in range(5):
        recent.add(bytes([i]))
    # 0, 1 and 2 filled a half that became the old one; 3 and 4 are new.
    assert all(bytes([i]) in recent for i in range(5))
    recent.add(b"\x05")  # the new half is full: the old one (0, 1, 2) is forgotten
    assert [bytes([i]) in recent for i in range(6)] == [False] * 3 + [True] * 3


class HeldPlacements:
    """A manager that answers placements when the test says so, every chunk held already."""

    def __init__(self):
        self.asked: list[tuple[object, defer.Deferred]] = []

    def ask(self, request):
        d = defer.Deferred()
        self.asked.append((request, d))
        return d

    def answer_all(self):
        asked, self.asked = self.asked, []
        for request, d in asked:
            d.callback(Placement(known=[need.chunk_id for need in request.chunks]))


@pytest.mark.parametrize(("size", "at_once"), [
    (8, SMALL_BATCHES_IN_FLIGHT),  # batches of tiny chunks: round trips, not bytes, bind
    (BATCH_BYTES // 2, BATCHES_IN_FLIGHT),  # two halves of a batch each, then full batches
])
def test_batches_under_way_are_bounded_in_count_and_in_bytes(size, at_once):
    manager = HeldPlacements()
    uploader = Uploader(manager, Signal(), warn=lambda text: None)
    count = BATCH_CHUNKS * 2 * at_once if size < 1024 else 20  # two rounds at least
    for i in range(count):
        chunk_id, data = data_blob(i.to_bytes(4, "big") * (size // 4))
        uploader.store(Kind.DATA, chunk_id, data, lambda: None)
    uploader.flush()
    assert len(manager.asked) == at_once
    assert sum(len(r.chunks) * size for r, _ in manager.asked) <= BATCHES_IN_FLIGHT * BATCH_BYTES
    manager.answer_all()  # confirmed: the next ones go, as many again
    assert len(manager.asked) == at_once
    while manager.asked:
        manager.answer_all()
    assert not uploader.busy and uploader.signal.failure is None


def data_blob(data: bytes) -> tuple[bytes, bytes]:
    return bytes.fromhex(hashing.chunk_id(data)), data


def tree_blob(nodes) -> tuple[bytes, bytes, str]:
    data = objects.encode_tree(objects.make_tree(nodes))
    return bytes.fromhex(objects.object_id(Kind.TREE, data)), data, hashing.checksum(data)


async def drain(uploader: Uploader):
    uploader.flush()
    while uploader.busy:
        uploader.signal.check()
        await uploader.signal.wait()
    uploader.signal.check()


async def until_indexed(cluster, session, chunk_ids):
    """Servers tell the manager what they stored in notices of their own (a commit waits
    for them): wait until it knows these chunks."""
    wanted = sorted(c.hex() for c in chunk_ids)

    async def indexed():
        return sorted((await session.ask(HasChunks(chunk_ids=wanted))).chunk_ids) == wanted

    await cluster.until(indexed, what="the manager learning of the chunks")


def holders(cluster, chunk_id: bytes) -> list:
    return [s for s in cluster.servers if s.store.has(chunk_id.hex())]


@pytest_twisted.ensureDeferred
async def test_data_and_trees_are_stored_once_each_and_confirmed(cluster):
    session = await cluster.session()
    warnings = []
    try:
        uploader = Uploader(session, Signal(), warnings.append)
        confirmed = []
        chunks = [data_blob(os.urandom(5000 + i)) for i in range(300)]  # more than one batch
        for chunk_id, data in chunks:
            assert not uploader.store(Kind.DATA, chunk_id, data, lambda c=chunk_id: confirmed.append(c))
        # The same chunk again while it is under way: it waits for the same confirmation.
        again = chunks[0][0]
        assert not uploader.store(Kind.DATA, again, chunks[0][1], lambda: confirmed.append(b"again"))
        await drain(uploader)
        assert sorted(confirmed) == sorted([c for c, _ in chunks] + [b"again"])
        node = Node(name=b"f", type="file", size=5000, content=(again,))
        tree_id, tree, checksum = tree_blob([node])
        await uploader.store_now(Kind.TREE, tree_id, tree, checksum)
        # Confirmed means every replica has it, of its kind.
        assert len(holders(cluster, tree_id)) == 2
        assert all(len(holders(cluster, c)) == 2 for c, _ in chunks)
        assert holders(cluster, tree_id)[0].store.get(tree_id.hex())[0] == Kind.TREE
        assert uploader.new_bytes == sum(len(d) for _, d in chunks)
        # Known now: not sent again.
        assert uploader.store(Kind.DATA, again, chunks[0][1], lambda: None)
        # A second backup: the manager says the cluster has them; no byte travels.
        await until_indexed(cluster, session, [c for c, _ in chunks[:10]])
        second = Uploader(session, Signal(), warnings.append)
        later = []
        for chunk_id, data in chunks[:10]:
            second.store(Kind.DATA, chunk_id, data, lambda: later.append(1))
        await drain(second)
        assert (len(later), second.sent_bytes) == (10, 0)
        assert warnings == []
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_left_out_and_its_blobs_placed_again(cluster):
    unreachable = cluster.servers[2]
    await unreachable.port.stopListening()
    session = await cluster.session()
    warnings = []
    try:
        uploader = Uploader(session, Signal(), warnings.append)
        chunks = [data_blob(os.urandom(100_000)) for _ in range(40)]
        for chunk_id, data in chunks:
            uploader.store(Kind.DATA, chunk_id, data, lambda: None)
        await drain(uploader)
    finally:
        await session.close()
    assert warnings == []  # two copies of each, on the two servers left
    assert unreachable.store.count() == 0
    assert all(len(holders(cluster, c)) == 2 for c, _ in chunks)


@pytest_twisted.ensureDeferred
async def test_fewer_live_servers_than_replicas_is_a_warning(cluster):
    for server in cluster.servers[1:]:
        await cluster.stop_server(server)
    session = await cluster.session()
    warnings = []
    try:
        uploader = Uploader(session, Signal(), warnings.append)
        chunk_id, data = data_blob(b"one copy only")
        await uploader.store_now(Kind.DATA, chunk_id, data)
    finally:
        await session.close()
    assert len(warnings) == 1 and "only 1 of 2 copies" in warnings[0]


@pytest_twisted.ensureDeferred
async def test_held_check_tells_which_chunks_still_have_a_copy(cluster):
    session = await cluster.session()
    try:
        signal = Signal()
        uploader = Uploader(session, signal, lambda _: None)
        stored = [data_blob(os.urandom(2000)) for _ in range(3)]
        for chunk_id, data in stored:
            uploader.store(Kind.DATA, chunk_id, data, lambda: None)
        await drain(uploader)
        await until_indexed(cluster, session, [c for c, _ in stored])
        fresh = Uploader(session, signal, lambda _: None)  # knows nothing yet
        held = HeldCheck(session, fresh, signal)
        answers = {}
        lost = data_blob(b"never stored")[0]
        assert not held.check([c for c, _ in stored], lambda ok: answers.update(all=ok))
        assert not held.check([stored[0][0], lost], lambda ok: answers.update(some=ok))
        assert held.check([], lambda ok: answers.update(none=ok))  # nothing to ask
        held.flush()
        while held.busy:
            await signal.wait()
        assert answers == {"all": True, "some": False}
        # What the manager said is held is known now: a new file sharing it is not placed.
        assert fresh.is_known(stored[1][0]) and not fresh.is_known(lost)
    finally:
        await session.close()


@pytest_twisted.ensureDeferred
async def test_a_pack_the_client_cannot_describe_fails_at_once_without_blaming_a_server(cluster):
    # The client's own bug (here a checksum that is not one) used to be caught as "server ...
    # is unreachable": every server in turn was marked failed and the pack placed again, and
    # the backup ended four attempts later, blaming the cluster.
    session = await cluster.session()
    try:
        uploader = Uploader(session, Signal(), lambda _: None)
        tree_id, tree, _ = tree_blob([Node(name=b"f", type="file")])
        with pytest.raises(ValueError, match="checksum") as raised:
            await uploader.store_now(Kind.TREE, tree_id, tree, "not a checksum")
    finally:
        await session.close()
    assert "unreachable" not in str(raised.value) and "attempts" not in str(raised.value)
    assert uploader._failed_servers == set()
    assert not any(s.store.has(tree_id.hex()) for s in cluster.servers)
