"""Reading a snapshot's trees depth first, a few folders ahead of the reader.

``ls`` and ``restore`` see a snapshot as a stream of events, ``Enter`` (a
folder, before its entries), ``Entry`` (anything else) and ``Leave`` (after the
folder's last entry), in name order, holding only the folders on the path
from the root plus a window of subtrees fetched ahead. Memory does not grow
with the size of the snapshot, only with its depth.

Each folder costs two round trips, one ``Locate`` to the manager and one fetch
from a server: the tree is fetched from holders its parent's ``Locate`` found,
then one ``Locate`` finds, at once, the holders of its subtrees and chunk
lists and, for a restore, of every chunk of its files (a paged folder's
pages are read first, all at once: ``Repository.read_tree``). While the reader is
busy with a folder, the next ``AHEAD`` subfolders of each folder on the path
are already on their way.
"""

import attrs
from attrs import frozen
from twisted.internet import defer

from sdbackup import objects
from sdbackup.client.repository import ChunkUnavailable, Repository
from sdbackup.objects import Kind, Node, Tree
from sdbackup.paths import display_path

#: Subtrees fetched ahead in each folder on the path.
AHEAD = 8

_EMPTY = Tree(())


@frozen
class LoadedTree:
    """A folder's tree and the holders (hex id -> servers) of what it references."""

    tree: Tree
    holders: dict


@frozen
class Enter:
    """A folder, before its entries. ``node`` is None for the root; ``error`` says why its
    entries cannot be read (a ``Leave`` follows at once)."""

    path: tuple
    node: Node | None
    error: str = ""


@frozen
class Entry:
    """Anything but a folder, with the holders its folder's ``Locate`` found."""

    path: tuple
    node: Node
    holders: dict


@frozen
class Leave:
    path: tuple
    node: Node | None


@frozen
class _Failed:
    error: BaseException


@attrs.define
class _Level:
    path: tuple
    node: Node | None
    loaded: LoadedTree
    index: int = 0  # next entry to yield
    scan: int = 0  # next entry to consider fetching ahead
    ahead: dict = attrs.Factory(dict)  # entry index -> Deferred of a LoadedTree or _Failed


#: Errors that make one folder unreadable; anything else stops the walk.
FOLDER_ERRORS = (ChunkUnavailable, objects.ObjectFormatError)


class TreeReader:
    def __init__(self, repository: Repository, chunks: bool = False, ahead: int = AHEAD):
        self.repository = repository
        #: Locate the chunks and chunk lists of each folder's files too (restore), not only
        #: its subtrees (ls).
        self.chunks = chunks
        self.ahead = ahead
        self._stack: list[_Level] = []
        self._entered: _Level | None = None  # the folder of the last Enter, if it has entries

    async def load(self, tree_id: bytes, holders: list[str] | None = None) -> LoadedTree:
        """A tree and the holders of what it references (one fetch, one ``Locate``)."""
        if not tree_id:
            return LoadedTree(_EMPTY, {})
        hex_id = tree_id.hex()
        if holders is None:
            holders = (await self.repository.locate([hex_id])).get(hex_id, [])
        data = await self.repository.fetch(Kind.TREE, hex_id, holders)
        tree = await self.repository.read_tree(data)
        wanted = []
        for node in tree.nodes:
            if node.subtree:
                wanted.append(node.subtree.hex())
            if self.chunks:
                wanted.extend(ref.hex() for ref in node.content_lists)
                wanted.extend(ref.hex() for ref in node.content)
        located = await self.repository.locate(list(dict.fromkeys(wanted))) if wanted else {}
        return LoadedTree(tree, located)

    def skip(self):
        """Leave the folder of the last ``Enter`` without its entries (``Leave`` comes next)."""
        if self._entered is not None:
            level, self._entered = self._entered, None
            level.index = level.scan = len(level.loaded.tree.nodes)

    async def walk(self, tree_id: bytes, prefix: tuple = (), node: Node | None = None, want=None):
        """Events for the tree ``tree_id`` (found at ``prefix``, as ``node``), depth first.

        ``want(path, node)`` keeps an entry (and, for a folder, what it holds)
        or leaves it out. The root's tree must be readable; a folder below it
        that is not gives an ``Enter`` with an ``error``.
        """
        root = await self.load(tree_id)
        self._stack = [_Level(prefix, node, root)]
        self._fetch_ahead(self._stack[-1], want)
        self._entered = self._stack[-1]
        yield Enter(prefix, node)
        while self._stack:
            self._entered = None
            level = self._stack[-1]
            nodes = level.loaded.tree.nodes
            if level.index >= len(nodes):
                self._stack.pop()
                yield Leave(level.path, level.node)
                continue
            index = level.index
            level.index += 1
            child = nodes[index]
            path = (*level.path, child.name)
            pending = level.ahead.pop(index, None)
            if pending is None and want is not None and not want(path, child):
                continue
            if child.type != "dir":
                yield Entry(path, child, level.loaded.holders)
                continue
            if pending is None:
                pending = self._start(child, level.loaded.holders)
            self._fetch_ahead(level, want)
            outcome = await pending
            if isinstance(outcome, _Failed):
                if not isinstance(outcome.error, FOLDER_ERRORS):
                    raise outcome.error
                yield Enter(path, child, error=f"{display_path(path)}: its entries cannot be read: "
                                               f"{outcome.error}")
                yield Leave(path, child)
                continue
            self._stack.append(_Level(path, child, outcome))
            self._fetch_ahead(self._stack[-1], want)
            self._entered = self._stack[-1]
            yield Enter(path, child)

    def _fetch_ahead(self, level: _Level, want):
        nodes = level.loaded.tree.nodes
        level.scan = max(level.scan, level.index)
        while len(level.ahead) < self.ahead and level.scan < len(nodes):
            index = level.scan
            level.scan += 1
            child = nodes[index]
            if child.type == "dir" and (want is None or want((*level.path, child.name), child)):
                level.ahead[index] = self._start(child, level.loaded.holders)

    def _start(self, node: Node, holders: dict) -> defer.Deferred:
        """Load ``node``'s subtree; the outcome, never a failure (an abandoned one logs nothing)."""
        async def load():
            try:
                return await self.load(node.subtree, holders.get(node.subtree.hex(), [])
                                       if node.subtree else None)
            except Exception as e:
                return _Failed(e)
        return defer.ensureDeferred(load())
