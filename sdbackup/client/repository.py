"""The cluster as a client reads it: snapshots, trees and chunks, each verified.

``Repository`` asks the manager where chunks and objects are (``Locate``),
fetches them from any holder, trying the next when a copy is missing or bad,
and checks every one against its id before anyone uses it: a file chunk must
hash to its id, an object must hash to its id under its kind's context. A
lying or broken server can make a read fail, never make it return wrong
bytes. ``ls``, ``restore``, ``check`` and the backup's parent lookup all read
the cluster through it.
"""

from collections import OrderedDict

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from sdbackup import hashing, objects, sealing
from sdbackup.client.session import ClientError, Session, first_error
from sdbackup.names import escape, unescape
from sdbackup.objects import Kind
from sdbackup.protocols.messages import (
    MAX_FETCH_IDS,
    FetchChunk,
    FetchChunks,
    ListSnapshots,
    Locate,
    SnapshotSummary,
)

#: Ids asked about in one Locate.
LOCATE_PAGE = 10_000
#: Payloads up to this size are hashed on the reactor; larger ones in a thread.
HASH_INLINE = 256 * 1024
#: Decoded trees kept, so walking a path or a parent does not fetch a tree twice.
TREE_CACHE = 256
#: Trees up to this size are decoded on the reactor; larger ones in a thread.
DECODE_INLINE = 256 * 1024


class ChunkUnavailable(ClientError):
    """No holder could give a good copy."""


def verify(kind: str, chunk_id: str, checksum: str, payload: bytes) -> bool:
    """True when ``payload`` is the chunk or object ``chunk_id`` and matches ``checksum``."""
    actual = hashing.checksum(payload)
    if actual != checksum:
        return False
    if kind == Kind.DATA:
        return actual == chunk_id
    return hashing.object_id(kind, payload) == chunk_id


class Repository:
    def __init__(self, session: Session):
        self.session = session
        self._trees: OrderedDict[bytes, objects.Tree] = OrderedDict()
        self._turn = 0

    # --- snapshots --------------------------------------------------------------

    async def snapshots(self) -> list[SnapshotSummary]:
        """Every snapshot of the repository, oldest first, asked for a page at a time."""
        found: list[SnapshotSummary] = []
        repo = self.session.sealer.repo
        request = ListSnapshots(repo=repo)
        while True:
            page = await self.session.ask(request)
            found.extend(page.snapshots)
            if not page.more or not page.snapshots:
                return await self._of_repository(found)
            last = page.snapshots[-1]
            request = ListSnapshots(after_time=last.time, after_id=last.snapshot_id, repo=repo)

    async def _of_repository(self, found: list[SnapshotSummary]) -> list[SnapshotSummary]:
        """The repository's snapshots among ``found``. The manager lists an encrypted
        snapshot without paths or tags (it sees no more): those of an encrypted repository
        are read from the servers, kept when they are the repository's, and opened."""
        if not self.session.sealer.encrypted:
            return [s for s in found if s.paths]
        sealed = [s for s in found if not s.paths]
        holders = await self.locate([s.snapshot_id for s in sealed])
        fetched = await self.fetch_many(Kind.SNAPSHOT, {s.snapshot_id: holders.get(s.snapshot_id, [])
                                                        for s in sealed}, opened=False)
        mine = []
        for summary in sealed:
            data = fetched[summary.snapshot_id]
            if isinstance(data, ChunkUnavailable):
                raise data
            try:
                if not self.session.sealer.owns(objects.decode_snapshot(data)):
                    continue
                snapshot = objects.decode_snapshot(self._open(Kind.SNAPSHOT, summary.snapshot_id,
                                                              data))
            except objects.ObjectFormatError as e:
                raise ClientError(f"snapshot {summary.snapshot_id[:8]} cannot be read: {e}") from None
            mine.append(attrs.evolve(summary, paths=[escape(p) for p in snapshot.paths],
                                     tags=list(snapshot.tags), parent=snapshot.parent.hex()))
        return mine

    def _open(self, kind: str, chunk_id: str, data: bytes) -> bytes:
        """Verified bytes opened with the repository's key (key objects are never sealed)."""
        if kind == Kind.KEY:
            return data
        try:
            return self.session.sealer.open(kind, data)
        except sealing.SealError as e:
            raise ChunkUnavailable(f"{kind} {chunk_id[:16]} cannot be opened: {e}") from None

    async def resolve(self, ref: str) -> SnapshotSummary:
        """A snapshot from ``latest``, its id, or a unique prefix of its id."""
        found = await self.snapshots()
        if ref == "latest":
            if not found:
                raise ClientError("there are no snapshots yet")
            return found[-1]
        matches = [s for s in found if ref and s.snapshot_id.startswith(ref)]
        if len(matches) != 1:
            raise ClientError(f"no snapshot {ref!r}" if not matches
                              else f"{ref!r} names several snapshots")
        return matches[0]

    async def load_snapshot(self, snapshot_id: str) -> objects.Snapshot:
        data = await self.fetch_object(Kind.SNAPSHOT, snapshot_id)
        return objects.decode_snapshot(data)

    # --- trees --------------------------------------------------------------------

    async def load_tree(self, tree_id: bytes) -> objects.Tree:
        tree = self._trees.get(tree_id)
        if tree is not None:
            self._trees.move_to_end(tree_id)
            return tree
        data = await self.fetch_object(Kind.TREE, tree_id.hex())
        try:
            tree = await self.read_tree(data)
        except objects.ObjectFormatError as e:
            raise ClientError(f"tree {tree_id.hex()[:16]} cannot be read: {e}") from None
        self._trees[tree_id] = tree
        if len(self._trees) > TREE_CACHE:
            self._trees.popitem(last=False)
        return tree

    async def read_tree(self, data: bytes, trusted: bool = False) -> objects.Tree:
        """The tree in a tree object's fetched bytes; a paged one's pages are read and
        joined. Large trees are decoded in a thread."""
        tree = await in_thread_if_large(objects.decode_tree, data, trusted)
        if isinstance(tree, objects.TreeHead):
            tree = objects.join_pages([await in_thread_if_large(objects.decode_page, page, trusted)
                                       for page in await tree_pages(self, tree)])
        return tree

    async def find(self, tree_id: bytes, path: bytes) -> objects.Node | None:
        """The node at ``path`` (``a/b/c``, bytes) under the tree ``tree_id``, or None."""
        node = None
        for part in [p for p in path.split(b"/") if p]:
            if node is not None:
                if node.type != "dir":
                    return None
                tree_id = node.subtree
            node = (await self.load_tree(tree_id)).find(part)
            if node is None:
                return None
        return node

    async def find_text(self, tree_id: bytes, path: str) -> objects.Node | None:
        """``find`` for a path typed by a user (escapes as ``ls`` shows them)."""
        return await self.find(tree_id, unescape(path))

    async def content(self, node: objects.Node):
        """A file's chunk ids (bytes), in order, reading its chunk lists when it has them."""
        for chunk_id in node.content:
            yield chunk_id
        for list_id in node.content_lists:
            data = await self.fetch_object(Kind.LIST, list_id.hex())
            for chunk_id in objects.decode_chunk_list(data):
                yield chunk_id

    # --- chunks and objects -------------------------------------------------------

    async def locate(self, chunk_ids: list[str]) -> dict[str, list[str]]:
        """The holders of each id (an id no server holds is left out)."""
        holders: dict[str, list[str]] = {}
        for start in range(0, len(chunk_ids), LOCATE_PAGE):
            page = chunk_ids[start : start + LOCATE_PAGE]
            holders.update((await self.session.ask(Locate(chunk_ids=page))).holders)
        return holders

    async def fetch_object(self, kind: str, object_id: str) -> bytes:
        holders = (await self.locate([object_id])).get(object_id, [])
        return await self.fetch(kind, object_id, holders)

    async def fetch(self, kind: str, chunk_id: str, holders: list[str]) -> bytes:
        """The verified bytes of ``chunk_id`` from the first holder with a good copy."""
        if not holders:
            raise ChunkUnavailable(f"no server holds {kind} {chunk_id[:16]}")
        # Start at a different holder each time, so reads spread over the servers.
        self._turn += 1
        start = self._turn % len(holders)
        reasons = []
        for server in holders[start:] + holders[:start]:
            try:
                reply = await self.session.servers.request(server, FetchChunk(chunk_id=chunk_id))
            except defer.CancelledError:
                raise  # the reader gave up (Ctrl-C): not this holder's fault, ask no other
            except Exception as e:
                reasons.append(f"{server}: {getattr(e, 'reason', None) or e}")
                continue
            payload = reply.payload
            good = (verify(kind, chunk_id, reply.checksum, payload) if len(payload) <= HASH_INLINE
                    else await deferToThread(verify, kind, chunk_id, reply.checksum, payload))
            if good:
                if not self.session.sealer.encrypted:
                    return payload
                return (self._open(kind, chunk_id, payload) if len(payload) <= HASH_INLINE
                        else await deferToThread(self._open, kind, chunk_id, payload))
            reasons.append(f"{server}: its copy does not match the id")
        raise ChunkUnavailable(f"no good copy of {kind} {chunk_id[:16]}: " + "; ".join(reasons))

    async def fetch_many(self, kind: str, wanted: dict[str, list[str]], opened: bool = True
                         ) -> dict[str, bytes | ChunkUnavailable]:
        """The verified bytes of every chunk in ``wanted`` (id -> holders), fetched with one
        FetchChunks per holder (and more while replies are full); a chunk no holder has a good
        copy of maps to its ``ChunkUnavailable``, so one bad chunk fails only what uses it.
        In an encrypted repository the bytes are opened (plaintext) unless not ``opened``.

        Each chunk starts at one of its holders in turn, so reads spread over the
        servers; those a holder lacks or holds bad are asked of their next holder.
        """
        found: dict[str, bytes | ChunkUnavailable] = {}
        reasons: dict[str, list[str]] = {}
        queues: dict[str, list[str]] = {}  # chunk id -> holders not tried yet
        for chunk_id, holders in wanted.items():
            if not holders:
                found[chunk_id] = ChunkUnavailable(f"no server holds {kind} {chunk_id[:16]}")
                continue
            self._turn += 1
            start = self._turn % len(holders)
            queues[chunk_id] = holders[start:] + holders[:start]
        while queues:
            by_server: dict[str, list[str]] = {}
            for chunk_id, servers in queues.items():
                by_server.setdefault(servers[0], []).append(chunk_id)
            asked = [defer.ensureDeferred(self._fetch_from(kind, server, ids, opened))
                     for server, ids in by_server.items()]
            # A piece that does not open fails the read with its own error.
            outcomes = await defer.gatherResults(asked, consumeErrors=True).addErrback(first_error)
            for (server, ids), (good, failed) in zip(by_server.items(), outcomes, strict=True):
                for chunk_id, payload in good.items():
                    found[chunk_id] = payload
                    del queues[chunk_id]
                for chunk_id in ids:
                    if chunk_id in good:
                        continue
                    reasons.setdefault(chunk_id, []).append(f"{server}: {failed[chunk_id]}")
                    queues[chunk_id].pop(0)
                    if not queues[chunk_id]:
                        del queues[chunk_id]
                        found[chunk_id] = ChunkUnavailable(
                            f"no good copy of {kind} {chunk_id[:16]}: " + "; ".join(reasons[chunk_id]))
        return found

    async def _fetch_from(self, kind: str, server: str, chunk_ids: list[str], opened: bool = True
                          ) -> tuple[dict[str, bytes], dict[str, str]]:
        """What ``server`` gives good copies of (id -> bytes), and why it gave no others."""
        good: dict[str, bytes] = {}
        failed: dict[str, str] = {}
        left = list(chunk_ids)
        while left:
            asked, left = left[:MAX_FETCH_IDS], left[MAX_FETCH_IDS:]
            try:
                reply = await self.session.servers.request(server, FetchChunks(chunk_ids=asked))
            except defer.CancelledError:
                raise
            except Exception as e:
                why = str(getattr(e, "reason", None) or e)
                failed.update((chunk_id, why) for chunk_id in asked + left)
                break
            wanted = set(asked)
            pieces = [(ref, payload) for ref, payload in reply.pieces() if ref.chunk_id in wanted]
            checks = (_verify_all(kind, pieces) if len(reply.payload) <= HASH_INLINE
                      else await deferToThread(_verify_all, kind, pieces))
            if opened and self.session.sealer.encrypted:
                checks = await deferToThread(self._open_all, kind, pieces, checks)
            for (ref, payload), ok in zip(pieces, checks, strict=True):
                if ok is True:
                    good[ref.chunk_id] = bytes(payload)
                elif ok:
                    good[ref.chunk_id] = ok  # opened
                else:
                    failed[ref.chunk_id] = "its copy does not match the id"
            for chunk_id in reply.missing:
                failed.setdefault(chunk_id, "does not hold it")
            for chunk_id in reply.corrupt:
                failed.setdefault(chunk_id, "its copy is corrupt")
            answered = {ref.chunk_id for ref in reply.chunks} | set(reply.missing) | set(reply.corrupt)
            unanswered = [chunk_id for chunk_id in asked if chunk_id not in answered]
            if not reply.chunks and unanswered:
                # A reply that gives nothing and names nothing would make us ask forever.
                failed.update((chunk_id, "answered nothing") for chunk_id in unanswered + left)
                break
            left = unanswered + left
            # Opened, the sealed reply (up to 8 MiB) is not needed while the next is awaited.
            del reply, pieces, checks
        return good, failed

    def _open_all(self, kind: str, pieces: list, checks: list) -> list:
        """Each verified piece opened (its plaintext), or False; a piece that does not open
        fails the read (another key's, or forged: no other holder's copy can differ)."""
        # A data chunk opens from its view of the reply (AES-GCM reads it in place); an
        # object's envelope is read from bytes.
        return [self._open(kind, ref.chunk_id, payload if kind == Kind.DATA else bytes(payload))
                if ok else False for (ref, payload), ok in zip(pieces, checks, strict=True)]


async def tree_pages(reader, head: objects.TreeHead) -> list[bytes]:
    """The verified bytes of a paged tree's pages, in order, read through ``reader`` (a
    Repository): all of them at once, as a folder's tree is held whole while it is read."""
    wanted = [page.hex() for page in head.pages]
    holders = await reader.locate(wanted)
    fetched = await reader.fetch_many(Kind.TREE, {page: holders.get(page, []) for page in wanted})
    pages = [fetched[page] for page in wanted]
    for page in pages:
        if isinstance(page, ChunkUnavailable):
            raise page
    return pages


async def in_thread_if_large(decode, data: bytes, *args):
    """``decode(data, *args)``, in a thread when ``data`` is larger than ``DECODE_INLINE``."""
    if len(data) <= DECODE_INLINE:
        return decode(data, *args)
    return await deferToThread(decode, data, *args)


def _verify_all(kind: str, pieces: list) -> list[bool]:
    return [verify(kind, ref.chunk_id, ref.checksum, payload) for ref, payload in pieces]
