"""``check``'s walk of the object graph: is everything every snapshot references held?

From each indexed snapshot the walk follows the envelope refs alone
(``objects.open_envelope``: snapshot -> root tree -> subtrees and chunk lists
-> data chunks), never the bodies, which client-side encryption will seal. Each
tree or chunk list object is read once (from a live holder, verified); data
refs are only looked up in the catalog, in batches, for a live copy. An object
or chunk that a snapshot references and no live server holds is *missing*; a
snapshot that reaches anything missing is *damaged* (it cannot be fully
restored). The walk goes level by level with a few reads at once, and keeps
per object only its child object ids, never its data refs.
"""

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from sdbackup import objects
from sdbackup.limits import shorten
from sdbackup.objects import Kind
from sdbackup.protocols.messages import SnapshotSummary
from sdbackup.services.objectreads import ObjectUnavailable, read_object

#: Objects read at once.
READS_AT_ONCE = 8
#: Data refs looked up in the catalog at a time.
LOOKUP_BATCH = 2000


@attrs.define
class DagReport:
    snapshots: int = 0
    #: Tree and chunk list objects read.
    trees: int = 0
    #: Ids (hex) referenced and without any good live copy.
    missing: set = attrs.Factory(set)
    #: Ids of the snapshots that reach something missing.
    damaged: list = attrs.Factory(list)


class DagCheck:
    """One walk. ``manager`` gives ``live``, ``db``, ``catalog`` and ``clock``."""

    log = Logger()

    def __init__(self, manager):
        self.manager = manager
        #: Every object read or tried: its child objects (None when it could not be read).
        self.children: dict[str, tuple | None] = {}
        #: Objects with a missing data ref of their own.
        self.broken: set[str] = set()
        self.report = DagReport()
        self._lookups: list[tuple[str, str]] = []  # (data ref, the object referencing it)
        self._memo: dict[str, bool] = {}  # object -> whether it reaches anything missing

    async def run(self, snapshots: list[SnapshotSummary]) -> DagReport:
        self.report.snapshots = len(snapshots)
        # A snapshot's own object is checked like a leaf; its root tree is walked.
        for snapshot in snapshots:
            self._lookups.append((snapshot.snapshot_id, snapshot.snapshot_id))
        await self._look_up()
        frontier = list(dict.fromkeys(s.tree for s in snapshots))
        while frontier:
            found: list[str] = []
            pending = iter(frontier)

            async def reader(pending=pending, found=found):
                for object_id in pending:
                    found.extend(await self._read(object_id))

            await defer.gatherResults([defer.ensureDeferred(reader())
                                       for _ in range(READS_AT_ONCE)])
            await self._look_up()
            frontier = [c for c in dict.fromkeys(found) if c not in self.children]
        self.report.damaged = [s.snapshot_id for s in snapshots
                               if s.snapshot_id in self.broken or self._reaches_missing(s.tree)]
        return self.report

    async def _read(self, object_id: str) -> tuple:
        """Read one tree or chunk list object; its child objects (none when it is missing)."""
        if object_id in self.children:
            return ()
        self.children[object_id] = None
        manager = self.manager
        holders = (await manager.db(manager.catalog.holders, [object_id])).get(object_id, [])
        try:
            kind, payload = await read_object(manager.live, holders, object_id,
                                              (Kind.TREE, Kind.LIST), manager.clock)
        except ObjectUnavailable as e:
            self.log.warn("check: object {object} cannot be read: {why}", object=object_id[:16],
                          why=shorten(e))
            self.report.missing.add(object_id)
            return ()
        envelope = objects.open_envelope(payload, kind)
        self.report.trees += 1
        children = tuple(ref.hex() for ref in envelope.tree_refs)
        self.children[object_id] = children
        self._lookups.extend((ref.hex(), object_id) for ref in envelope.data_refs)
        if len(self._lookups) >= LOOKUP_BATCH:
            await self._look_up()
        return children

    async def _look_up(self):
        """Which pending data refs have a live copy; the others are missing."""
        while self._lookups:
            batch, self._lookups = self._lookups[:LOOKUP_BATCH], self._lookups[LOOKUP_BATCH:]
            manager = self.manager
            holders = await manager.db(manager.catalog.holders, {ref for ref, _ in batch})
            for ref, owner in batch:
                if not any(h in manager.live for h in holders.get(ref, ())):
                    self.report.missing.add(ref)
                    self.broken.add(owner)

    def _reaches_missing(self, root: str) -> bool:
        """Whether anything under ``root`` is missing (memoised over the shared graph)."""
        memo, entered = self._memo, set()
        stack = [(root, False)]
        while stack:
            object_id, expanded = stack.pop()
            if object_id in memo:
                continue
            children = self.children.get(object_id)
            if children is None or object_id in self.broken:
                memo[object_id] = True
            elif expanded:
                memo[object_id] = any(memo.get(c, False) for c in children)
            elif object_id not in entered:
                # (Ids are hashes of the bytes holding the refs, so no cycle can occur; a
                # forged one is walked once all the same.)
                entered.add(object_id)
                stack.append((object_id, True))
                stack.extend((c, False) for c in children if c not in memo)
        return memo[root]
