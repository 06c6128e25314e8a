"""The parent snapshot's trees, read ahead of the walk in the order it will want them.

Part of the tree builder (archiver.py): for each folder the walk enters, the
builder takes the folder's tree in the parent snapshot from here, to find
the files that did not change. The trees are read in rounds (one Locate for
many ids, their fetches together) well ahead of the walk. A tree waits as its
bytes, only scanned for its subfolders (``objects.tree_subfolders``), and is
decoded when its folder is entered, on the trusted path
(``objects.decode_tree(trusted=True)``): its bytes were checked against its
id, and its nodes are only compared with what the walk finds. Bytes take about
a quarter of the memory of decoded Nodes, so the window holds four times as
many trees, and the walk seldom meets one it let go of and must read again.
"""

import bisect
import heapq

from attrs import frozen
from twisted.internet import defer

from sdbackup import objects
from sdbackup.client.repository import in_thread_if_large, tree_pages
from sdbackup.client.walk import Report
from sdbackup.objects import Kind

#: Ids located at once, such rounds under way, and trees (and their nodes, which take
#: about 200 bytes each as a tree's bytes, 700 once decoded) read ahead of the walk at most:
#: about 12 MiB of trees. A window that fills is costly: a tree let go is read again, and
#: reads under way below it are wasted. At 2,048 trees and 40,000 nodes, an unchanged backup of the
#: 50k tree (2,736 trees, 53,000 nodes) read 3,500-3,800 trees, and took 8.8 s rather than
#: 7.6 s; a window of 80,000 nodes cost 10 MiB more of peak memory than this one on 200
#: folders of 1,000 files, where neither lets go.
ROUND_TREES = 16
LOAD_ROUNDS = 16
TREES_AHEAD = 4096
NODES_AHEAD = 60_000


@frozen
class ReadTree:
    """A tree read ahead, as it waits for its folder: its bytes (a paged tree's pages, one
    item for any other), how many nodes it holds, and ``(index, subtree id)`` of its
    subfolders."""

    pages: tuple
    nodes: int
    subfolders: list


def subtrees(read: ReadTree | None) -> dict[bytes, int]:
    """The subfolders' tree ids of a tree read in name order (the walk's order), with how
    many subfolders have each (empty folders share one)."""
    counts: dict[bytes, int] = {}
    if read is not None:
        for _, subtree in read.subfolders:
            counts[subtree] = counts.get(subtree, 0) + 1
    return counts


def positions_below(read: ReadTree, position: tuple) -> list[tuple[tuple, bytes]]:
    """Where each subfolder's tree comes in the walk's order: after ``position`` (its
    folder's), by the index of its name. Comparing these tuples is comparing walk order."""
    return [((*position, index), subtree) for index, subtree in read.subfolders]


class ParentTrees:
    """The parent snapshot's trees, read ahead of the walk in the order it will want them.

    Both go depth-first in name order. Every tree to read has a *position*,
    the indexes of the names that lead to it, and positions compare like the
    walk's order; the next trees read are those that come first. A round
    locates ``ROUND_TREES`` ids at once and fetches them together (one FetchChunks per holder),
    up to ``LOAD_ROUNDS`` rounds at once (fewer at first), while fewer than ``TREES_AHEAD`` trees
    (and ``NODES_AHEAD`` nodes, as bytes) wait to be entered. When
    the window is full and a tree that comes sooner is waiting, the tree read
    that comes last is let go, to be read again when its turn comes: the
    window always holds what the walk needs next.

    Each tree read ahead is counted as wanted by the folder above it; a folder
    entered takes its tree (``enter``) and, with it, the count of its
    subfolders' trees, which it gives back when the walk leaves it
    (``release``): a folder gone since the parent snapshot drops its trees and
    everything read ahead below it. A tree that cannot be read is a note; its
    folder is backed up without a parent.
    """

    def __init__(self, repository, report: Report):
        self.repository = repository
        self.report = report
        self._refs: dict[bytes, int] = {}  # folders that may still enter each tree
        self._heap: list[tuple[tuple, bytes]] = []  # (position, id) to read, soonest first
        self._trees: dict[bytes, ReadTree | None] = {}  # read, not entered yet
        self._position: dict[bytes, tuple] = {}  # of each tree read or being read
        self._placed: list[tuple[tuple, bytes]] = []  # positions of trees read, sorted
        self._below: dict[bytes, dict[bytes, int]] = {}  # each read tree's subtrees, wanted
        self._nodes = 0  # in the trees read ahead
        self._seen = [0, 0]  # trees read and their nodes: how many a tree being read may bring
        self._loading: dict[bytes, list] = {}
        self._rounds = 0

    async def enter(self, tree_id: bytes, wanted: bool, position: tuple = ()
                    ) -> tuple[objects.Tree | None, dict]:
        """A folder's tree in the parent snapshot (None if it cannot be read), and its
        subtrees, now wanted on behalf of this folder: ``release`` them when it is left.
        ``wanted``: the tree was counted for this folder (it is a subfolder's)."""
        if tree_id in self._trees:
            read = self._trees[tree_id]
        else:
            waiter = defer.Deferred()
            if tree_id in self._loading:
                self._loading[tree_id].append(waiter)
            else:
                self._loading[tree_id] = [waiter]
                self._start([(position, tree_id)])
            read = await waiter
        if wanted and self._refs.get(tree_id) == 1 and tree_id in self._below:
            below = self._below.pop(tree_id)  # the last folder to enter it takes them over
            self._forget(tree_id)
            self._pump()
        else:
            if wanted:
                self.release({tree_id: 1})
            below = subtrees(read)
            if read is not None:
                self._want(below, positions_below(read, position))
                self._pump()
        return await self._decode(tree_id, read), below

    def release(self, counts: dict[bytes, int]):
        """Give wanted trees back; what nobody wants any more is dropped, with what was read
        ahead below it."""
        self._release(counts)
        self._pump()

    def _want(self, counts: dict[bytes, int], positions: list):
        for tree_id, count in counts.items():
            self._refs[tree_id] = self._refs.get(tree_id, 0) + count
        for item in positions:
            heapq.heappush(self._heap, item)

    def _release(self, counts: dict[bytes, int]):
        pending = [counts]
        while pending:
            for tree_id, count in pending.pop().items():
                left = self._refs.get(tree_id, 0) - count
                if left > 0:
                    self._refs[tree_id] = left
                    continue
                below = self._below.pop(tree_id, None)
                self._forget(tree_id)
                if below:
                    pending.append(below)

    def _forget(self, tree_id: bytes):
        self._refs.pop(tree_id, None)
        if tree_id in self._trees:
            read = self._trees.pop(tree_id)
            self._nodes -= read.nodes if read is not None else 0
            self._position.pop(tree_id, None)

    def _nodes_per_tree(self) -> float:
        trees, nodes = self._seen
        return nodes / trees if trees else 16

    def _room(self, more: int = 0) -> bool:
        reading = len(self._loading) + more
        return (len(self._trees) + reading < TREES_AHEAD
                and self._nodes + reading * self._nodes_per_tree() < NODES_AHEAD)

    def _readable(self, tree_id: bytes) -> bool:
        return tree_id in self._refs and tree_id not in self._trees and tree_id not in self._loading

    def _pump(self):
        heap = self._heap
        while heap and self._rounds < self._rounds_allowed():
            position, tree_id = heap[0]
            if not self._readable(tree_id):
                heapq.heappop(heap)
                continue
            if not self._room():
                if self._let_go_after(position):
                    continue
                return
            ids: list[tuple[tuple, bytes]] = []
            while heap and len(ids) < ROUND_TREES and self._room(len(ids)):
                position, tree_id = heapq.heappop(heap)
                if self._readable(tree_id) and all(t != tree_id for _, t in ids):
                    ids.append((position, tree_id))
            self._start(ids)

    def _let_go_after(self, position: tuple) -> bool:
        """Make room for the tree at ``position``: let go of the tree read that comes last in
        the walk's order, if it comes after; True if one was let go."""
        placed = self._placed
        if len(placed) > 2 * len(self._trees) + 64:  # drop the positions of trees gone
            placed[:] = [(p, t) for p, t in placed if self._position.get(t) == p and t in self._trees]
        while placed:
            last, tree_id = placed[-1]
            if tree_id not in self._trees or self._position.get(tree_id) != last:
                placed.pop()
                continue
            if last <= position:
                return False
            placed.pop()
            read = self._trees.pop(tree_id)
            self._nodes -= read.nodes if read is not None else 0
            del self._position[tree_id]
            below = self._below.pop(tree_id, None)
            if below:
                self._release(below)
            heapq.heappush(self._heap, (last, tree_id))  # still wanted: read again in turn
            return True
        return False

    def _start(self, ids: list[tuple[tuple, bytes]]):
        for position, tree_id in ids:
            self._loading.setdefault(tree_id, [])
            self._position[tree_id] = position
        self._rounds += 1
        defer.ensureDeferred(self._load([tree_id for _, tree_id in ids]))

    async def _load(self, ids: list[bytes]):
        undelivered = set(ids)
        try:
            try:
                holders = await self.repository.locate([t.hex() for t in ids])
            except Exception as e:
                self.report.note(f"cannot locate the parent snapshot's trees: {e}")
                holders = {}
            try:
                fetched = await self.repository.fetch_many(
                    Kind.TREE, {t.hex(): holders.get(t.hex(), []) for t in ids})
            except Exception as e:  # their folders are read again (the finally gives None)
                self.report.note(f"cannot fetch the parent snapshot's trees ({e}): "
                                 f"their folders are read again")
                return
            for tree_id in ids:
                self._deliver(tree_id, await self._scan(tree_id, fetched[tree_id.hex()]),
                              undelivered)
        finally:
            for tree_id in list(undelivered):
                self._deliver(tree_id, None, undelivered)
            self._rounds -= 1
            self._pump()

    async def _scan(self, tree_id: bytes, data) -> ReadTree | None:
        """The tree in fetched ``data``, scanned for its subfolders (a paged tree's pages
        read and scanned in turn); None, noted, when it could not be had or read."""
        try:
            if isinstance(data, Exception):
                raise data
            scanned = await in_thread_if_large(objects.tree_subfolders, data)
            pages, scans = [data], [scanned]
            if isinstance(scanned, objects.TreeHead):
                pages = await tree_pages(self.repository, scanned)
                scans = [await in_thread_if_large(objects.page_subfolders, page) for page in pages]
            nodes, subfolders = 0, []
            for count, found in scans:
                subfolders.extend((nodes + index, subtree) for index, subtree in found)
                nodes += count
            return ReadTree(tuple(pages), nodes, subfolders)
        except Exception as e:
            self._unreadable(tree_id, e)
            return None

    async def _decode(self, tree_id: bytes, read: ReadTree | None) -> objects.Tree | None:
        """The tree of a folder entered; None, noted, when it could not be read."""
        if read is None:
            return None
        try:
            pages = [await in_thread_if_large(objects.decode_page, page, True) for page in read.pages]
            return pages[0] if len(pages) == 1 else objects.join_pages(pages)
        except Exception as e:
            self._unreadable(tree_id, e)
            return None

    def _unreadable(self, tree_id: bytes, error: Exception):
        self.report.note(f"the parent snapshot's tree {tree_id.hex()[:16]} cannot be read "
                         f"({error}): its folder is read again")

    def _deliver(self, tree_id: bytes, read: ReadTree | None, undelivered: set):
        undelivered.discard(tree_id)
        waiters = self._loading.pop(tree_id)
        position = self._position.pop(tree_id, ())
        if read is not None:
            self._seen[0] += 1
            self._seen[1] += read.nodes
        if tree_id in self._refs:
            # Wanted: keep it for its folder, and read on below it, in the walk's order.
            self._trees[tree_id] = read
            self._position[tree_id] = position
            bisect.insort(self._placed, (position, tree_id))
            self._nodes += read.nodes if read is not None else 0
            self._below[tree_id] = below = subtrees(read)
            if read is not None:
                self._want(below, positions_below(read, position))
            self._pump()
        for waiter in waiters:
            waiter.callback(read)

    def _rounds_allowed(self) -> int:
        """Rounds under way at once: one until a round's worth of trees was read, then one
        more for each such, up to ``LOAD_ROUNDS``. How many nodes a tree brings is a guess
        from the trees read so far: a root of a few folders of a thousand files each had
        ``LOAD_ROUNDS`` rounds of its subfolders read on a guess of a few nodes a tree, four
        times the window (measured on 200,000 files in 200 folders: 28 MiB of trees)."""
        trees, _ = self._seen
        return min(LOAD_ROUNDS, 1 + trees // ROUND_TREES)
