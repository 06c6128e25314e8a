"""``sdbackup diff A B``: what changed from one snapshot to another, as restic shows it.

Both snapshots' trees are walked at once, name by name. A subtree whose id is the
same on both sides holds the same entries (trees are content-addressed), so it is
skipped unread: a diff of two backups of a large, mostly unchanged folder reads
only the folders on the way to what changed. A folder only one side has is walked
to list everything in it. Output streams as the walk goes; memory grows with the
depth of the trees, not with their size.

Each change is one line, restic's modifier then the path (``/`` first, ``/`` after a
folder): ``+`` added, ``-`` removed, ``M`` a file's content (or a link's target, a
device's number) changed, ``T`` the type changed, ``U`` only the metadata (mode,
owner, mtime, extended attributes) changed, shown with ``--metadata`` as restic does.
"""

import sys

import attrs
from twisted.internet import defer

from sdbackup.client import jsonout
from sdbackup.client.progress import human_bytes
from sdbackup.client.repository import Repository
from sdbackup.objects import Node, Tree
from sdbackup.paths import display_path
from sdbackup.protocols.messages import SnapshotSummary

ADDED, REMOVED, CONTENT, TYPE, METADATA = "+", "-", "M", "T", "U"
#: Subtrees loaded ahead while a folder's entries are walked.
AHEAD = 8


def _metadata(node: Node) -> tuple:
    return (node.mode, node.uid, node.gid, node.user, node.group, node.mtime_ns, node.xattrs)


def _content(node: Node) -> tuple:
    return (node.content, node.content_lists, node.hash, node.size, node.target, node.rdev)


def modifier(old: Node, new: Node) -> str:
    """restic's modifier for an entry both snapshots hold: ``T``, ``M``, ``U``, or ``""``
    when nothing a user sees changed (a folder's contents are compared on their own)."""
    if old.type != new.type:
        return TYPE
    if old.type != "dir" and _content(old) != _content(new):
        return CONTENT
    if _metadata(old) != _metadata(new):
        return METADATA
    return ""


def pairs(old: Tree, new: Tree):
    """``(name, old node or None, new node or None)`` of two folders' entries, in name order."""
    a, b = old.nodes, new.nodes
    i = j = 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and a[i].name < b[j].name):
            yield a[i].name, a[i], None
            i += 1
        elif i >= len(a) or b[j].name < a[i].name:
            yield b[j].name, None, b[j]
            j += 1
        else:
            yield a[i].name, a[i], b[j]
            i += 1
            j += 1


def shown_path(path: tuple, node: Node) -> str:
    """restic's path: from the snapshot's root, a folder with ``/`` at the end."""
    return "/" + display_path(path) + ("/" if node.type == "dir" else "")


@attrs.define
class Side:
    """What one side of the diff has that the other lacks (restic's ``added``/``removed``)."""

    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes: int = 0

    def count(self, node: Node):
        if node.type == "dir":
            self.dirs += 1
        elif node.type == "file":
            self.files += 1
            self.bytes += node.size
        else:
            self.others += 1


@attrs.define
class DiffStats:
    added: Side = attrs.Factory(Side)
    removed: Side = attrs.Factory(Side)
    changed_files: int = 0


@attrs.frozen
class Change:
    modifier: str
    path: tuple
    node: Node  # the new side's, or the old one's for a removal


class TreeLoader:
    """Trees by id, a few at once: ``prefetch`` starts loads that ``load`` then waits for."""

    def __init__(self, repository: Repository, ahead: int = AHEAD):
        self.repository = repository
        self.ahead = ahead
        self._started: dict[bytes, defer.Deferred] = {}

    def prefetch(self, tree_ids):
        for tree_id in tree_ids:
            if len(self._started) >= self.ahead:
                return
            if tree_id and tree_id not in self._started:
                self._started[tree_id] = defer.ensureDeferred(self._load(tree_id))

    async def _load(self, tree_id: bytes) -> tuple:
        """``(tree, None)`` or ``(None, error)``: an abandoned load logs nothing."""
        try:
            return await self.repository.load_tree(tree_id), None
        except Exception as e:
            return None, e

    def discard(self, tree_id: bytes):
        """A tree prefetched but not wanted after all: its place goes to another."""
        self._started.pop(tree_id, None)

    async def load(self, tree_id: bytes) -> Tree:
        if not tree_id:
            return Tree(())
        started = self._started.pop(tree_id, None)
        if started is None:
            return await self.repository.load_tree(tree_id)
        tree, error = await started
        if error is not None:
            raise error
        return tree


async def walk(loader: TreeLoader, tree_id: bytes, prefix: tuple):
    """``(path, node)`` of everything under the tree ``tree_id``, depth first in name order."""
    tree = await loader.load(tree_id)
    loader.prefetch(n.subtree for n in tree.nodes if n.type == "dir")
    for node in tree.nodes:
        path = (*prefix, node.name)
        yield path, node
        if node.type == "dir" and node.subtree:
            async for item in walk(loader, node.subtree, path):
                yield item


async def changes(loader: TreeLoader, old_id: bytes, new_id: bytes, stats: DiffStats,
                  metadata: bool = False, prefix: tuple = ()):
    """The ``Change``\\ s from the tree ``old_id`` to ``new_id``, counted in ``stats``."""
    if old_id == new_id:
        return
    old, new = await loader.load(old_id), await loader.load(new_id)
    paired = list(pairs(old, new))
    loader.prefetch(n.subtree for _, a, b in paired for n in (a, b)
                    if n is not None and n.type == "dir" and (a is None or b is None
                                                              or a.subtree != b.subtree))
    for name, a, b in paired:
        path = (*prefix, name)
        if b is None or a is None:
            async for change in _one_side(loader, path, a or b, stats, removed=b is None):
                yield change
            continue
        mod = modifier(a, b)
        if mod == TYPE:
            stats.changed_files += a.type == "file" or b.type == "file"
            yield Change(TYPE, path, b)
            for side, node, removed in ((stats.removed, a, True), (stats.added, b, False)):
                if node.type == "dir":
                    async for item_path, item in walk(loader, node.subtree, path):
                        side.count(item)
                        yield Change(REMOVED if removed else ADDED, item_path, item)
            continue
        if mod == CONTENT:
            stats.changed_files += a.type == "file"
            yield Change(CONTENT, path, b)
        elif mod == METADATA and metadata:
            yield Change(METADATA, path, b)
        if a.type == "dir":
            async for change in changes(loader, a.subtree, b.subtree, stats, metadata, path):
                yield change


async def _one_side(loader: TreeLoader, path: tuple, node: Node, stats: DiffStats, removed: bool):
    side = stats.removed if removed else stats.added
    mark = REMOVED if removed else ADDED
    side.count(node)
    yield Change(mark, path, node)
    if node.type == "dir":
        async for item_path, item in walk(loader, node.subtree, path):
            side.count(item)
            yield Change(mark, item_path, item)


def change_line(change: Change) -> str:
    """restic's text line: the modifier in five columns, then the path."""
    return f"{change.modifier:<5}{shown_path(change.path, change.node)}"


def summary_lines(stats: DiffStats, old: SnapshotSummary, new: SnapshotSummary) -> list[str]:
    """restic's closing counts, and the size change from one snapshot to the other."""
    a, r = stats.added, stats.removed
    change = new.bytes - old.bytes
    return [
        "",
        f"Files:       {a.files:>5} new, {r.files:>5} removed, {stats.changed_files:>5} changed",
        f"Dirs:        {a.dirs:>5} new, {r.dirs:>5} removed",
        f"Others:      {a.others:>5} new, {r.others:>5} removed",
        f"  Added:   {human_bytes(a.bytes)}",
        f"  Removed: {human_bytes(r.bytes)}",
        f"  Size:    {human_bytes(old.bytes)} -> {human_bytes(new.bytes)} "
        f"({'+' if change >= 0 else '-'}{human_bytes(abs(change))})",
    ]


# --- JSON: restic's ``diff --json`` -----------------------------------------------------------


def change_json(change: Change) -> dict:
    return {"message_type": "change", "path": shown_path(change.path, change.node),
            "modifier": change.modifier}


def _side_json(side: Side) -> dict:
    return {"files": side.files, "dirs": side.dirs, "others": side.others, "bytes": side.bytes}


def statistics_json(stats: DiffStats, old: SnapshotSummary, new: SnapshotSummary) -> dict:
    """restic's closing ``statistics`` message, with each snapshot's size and the change."""
    return {"message_type": "statistics", "source_snapshot": old.snapshot_id,
            "target_snapshot": new.snapshot_id, "changed_files": stats.changed_files,
            "added": _side_json(stats.added), "removed": _side_json(stats.removed),
            "source_bytes": old.bytes, "target_bytes": new.bytes,
            "bytes_change": new.bytes - old.bytes}



async def cmd_diff(session, args) -> int:
    """Print the changes from snapshot ``args.old`` to ``args.new`` as they are found."""
    repository = Repository(session)
    old, new = await repository.resolve(args.old), await repository.resolve(args.new)
    old_tree = (await repository.load_snapshot(old.snapshot_id)).tree
    new_tree = (await repository.load_snapshot(new.snapshot_id)).tree
    as_json = getattr(args, "json", False)
    stats = DiffStats()
    write = sys.stdout.write
    if not as_json:
        write(f"comparing snapshot {old.snapshot_id[:8]} to {new.snapshot_id[:8]}:\n\n")
    async for change in changes(TreeLoader(repository), old_tree, new_tree, stats, args.metadata):
        write((jsonout.dumps(change_json(change)) if as_json else change_line(change)) + "\n")
    if as_json:
        write(jsonout.dumps(statistics_json(stats, old, new)) + "\n")
    else:
        write("\n".join(summary_lines(stats, old, new)) + "\n")
    return 0
