"""The tree builder: the walk's folders turned into tree objects, bottom-up.

The second stage of a backup (walk -> tree builder -> chunker -> packer ->
store), shaped like restic's archiver. For each folder the walk enters, a
``Frame`` gathers the Nodes of its entries: a file's content comes from the
chunker, or, when the parent snapshot has the same file (same type, size,
mtime, ctime and inode), from the parent's tree without reading it - once the
cluster confirmed its chunks are still held (``HeldCheck``); a file whose
chunks are gone is read again. A folder's tree is encoded and stored only
when everything it references is confirmed stored or known, so the cluster
never holds a tree that points at nothing; then its Node, with the tree id,
goes to the folder above. The root frame's tree leads to every backed-up path.

An unchanged folder encodes to the tree id it had in the parent snapshot, so
it is not stored again: an unchanged backup sends almost nothing.

Memory stays bounded whatever the size of the tree: the walk is depth-first,
so only the open folders hold their Nodes (and the parent's tree for each);
a folder left by the walk keeps only what it waits for, and the builder
waits for the cluster once ``MAX_UNFINISHED`` such folders, ``MAX_NODES``
Nodes in them or ``MAX_CHECKING`` files taken from the parent wait; the
uploader keeps a bounded number of batches in flight; the parent's trees
are read a bounded window ahead (``parenttrees.ParentTrees``).
"""

import bisect
import operator
from collections import deque

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sdbackup import hashing, objects
from sdbackup.chunking import FileReader, read_small_files
from sdbackup.client.parenttrees import ParentTrees
from sdbackup.client.session import ClientError
from sdbackup.client.walk import Enter, Entry, Leave, Report
from sdbackup.names import escape
from sdbackup.objects import Kind, Node
from sdbackup.protocols.messages import MAX_CHUNK_SIZE
from sdbackup.sealing import PLAIN

#: Folders left by the walk whose trees are not confirmed yet, files taken from the parent
#: whose chunks are being checked, and Nodes held by folders, before the builder waits.
MAX_UNFINISHED = 256
MAX_CHECKING = 10_000
MAX_NODES = 20_000
#: Files up to this size are read many at a time, up to SMALL_FILES_AT_ONCE to a thread hop.
SMALL_FILE = 1024 * 1024
SMALL_FILES_AT_ONCE = 64
SMALL_FILES_BYTES = 4 * 1024 * 1024
#: Folders with more entries than this are encoded in a thread.
ENCODE_INLINE = 2000
#: A tree object (a page of a paged one) is stored as one chunk.
MAX_TREE_SIZE = MAX_CHUNK_SIZE


@attrs.define
class Stats:
    files: int = 0  # every entry but folders
    dirs: int = 0
    bytes: int = 0  # of regular files
    unchanged: int = 0  # files taken from the parent snapshot without reading them


def unchanged(old: Node, st) -> bool:
    """True when ``old`` (from the parent snapshot) is the same file as ``st`` shows, as restic
    decides: same type, size, mtime, ctime and inode."""
    return (old.type == "file" and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.inode == st.st_ino)


#: A Node's fields besides its name and what it points to.
_METADATA = ("type", "mode", "uid", "gid", "user", "group", "mtime_ns", "atime_ns", "ctime_ns",
             "size", "dev", "inode", "links", "rdev", "target", "xattrs")
_DEFAULTS = tuple(attrs.fields_dict(Node)[name].default for name in _METADATA)
_metadata_of = operator.attrgetter(*_METADATA)
_name = operator.attrgetter("name")


def same_metadata(old: Node, fields: dict) -> bool:
    """True when ``old`` has exactly the metadata in ``fields`` (a walk entry's): then it can
    stand for the entry as it is, without building a Node again."""
    return _metadata_of(old) == tuple(map(fields.get, _METADATA, _DEFAULTS))


def seal_tree(nodes: list, path: bytes, sealer=PLAIN) -> list[tuple[bytes, bytes, str]]:
    """The tree objects of a folder's nodes, sealed by ``sealer`` (runs in a thread for large
    folders), each ``(id, bytes, checksum)``: the folder's one tree, or, for a folder too
    large for one (``objects.split_tree``), its pages and then their head, which is its
    tree id. A page larger than a chunk may be (an entry of that size) is a ClientError
    naming the folder."""
    tree = objects.make_tree(nodes)
    plain = objects.encode_tree(tree)
    pages = ([tree] if len(plain) <= objects.TREE_PAGE_SIZE
             else objects.split_tree(tree, objects.TREE_PAGE_SIZE))
    if len(pages) == 1:  # (also one entry larger than a page alone: a head has two pages)
        return [_sealed_tree(sealer, plain, path)]
    sealed = [_sealed_tree(sealer, objects.encode_tree(page), path) for page in pages]
    return [*sealed, _sealed_tree(sealer, objects.encode_tree_head(s[0] for s in sealed), path)]


def _sealed_tree(sealer, plain: bytes, path: bytes) -> tuple[bytes, bytes, str]:
    data = sealer.seal(Kind.TREE, plain)
    if len(data) > MAX_TREE_SIZE:
        raise ClientError(f"the folder {escape(path) or '/'} cannot be backed up: a page of its "
                          f"tree would be {len(data)} bytes, and at most {MAX_TREE_SIZE} fit in "
                          f"one chunk")
    return bytes.fromhex(objects.object_id(Kind.TREE, data)), data, hashing.checksum(data)


def _read_small_files(sealer, files: list) -> list:
    """``read_small_files``, each file's chunks sealed (in the reading thread)."""
    results = read_small_files(files)
    if sealer.encrypted:
        for result in results:
            if not isinstance(result, OSError):
                result.chunks = sealer.seal_chunks(result.chunks)
    return results


def _next_chunks(reader: FileReader, sealer) -> list:
    """A large file's next chunks ``[(id, bytes)]``, sealed (in the reading thread)."""
    return sealer.seal_pieces(reader.next_pieces())


class Segment:
    """What part of a file's content waits for: its chunks' confirmations. The open segment
    holds one count of its own, dropped by ``seal``; at zero, ``ready`` runs."""

    __slots__ = ("pending", "ready")

    def __init__(self):
        self.pending = 1
        self.ready = None

    def done(self):
        self.pending -= 1
        if self.pending == 0:
            self.ready()

    def seal(self, ready):
        self.ready = ready
        self.done()


class FileContent:
    """A file's chunk ids as they are read: inline up to ``INLINE_CONTENT`` ids, else in
    chunk list objects of that many, each stored once its chunks are confirmed."""

    __slots__ = ("frame", "ids", "lists", "segment", "uploader")

    def __init__(self, uploader, frame: "Frame"):
        self.uploader = uploader
        self.frame = frame
        self.ids: list[bytes] = []
        self.lists: list[bytes] = []
        self.segment = self._segment()

    def _segment(self) -> Segment:
        self.frame.pending += 1
        return Segment()

    def add(self, chunks: list):
        """``[(chunk id, bytes)]``, in file order: each is stored (once per backup)."""
        for chunk_id, data in chunks:
            if len(self.ids) == objects.INLINE_CONTENT:
                self._seal_list()
            self.ids.append(chunk_id)
            segment = self.segment
            if not self.uploader.store(Kind.DATA, chunk_id, data, segment.done):
                segment.pending += 1

    def _seal_list(self):
        data = self.frame.archiver.sealer.seal(Kind.LIST, objects.encode_chunk_list(self.ids))
        list_id = bytes.fromhex(objects.object_id(Kind.LIST, data))
        checksum = hashing.checksum(data)
        self.lists.append(list_id)
        self.ids = []
        frame, uploader = self.frame, self.uploader

        def store_list():
            if uploader.store(Kind.LIST, list_id, data, frame.done, checksum):
                frame.done()

        self.segment.seal(store_list)
        self.segment = self._segment()

    def finish(self) -> tuple[tuple, tuple]:
        """``(content, content_lists)`` for the file's Node."""
        if self.lists and self.ids:
            self._seal_list()
        self.segment.seal(self.frame.done)
        if self.lists:
            return (), tuple(self.lists)
        return tuple(self.ids), ()

    def abandon(self):
        """The file could not be read to its end: no Node will use these chunks."""
        self.segment.seal(self.frame.done)


class Frame:
    """A folder of the snapshot being built: its Nodes so far and a count of what it waits
    for (entries not done, chunks and subtrees not confirmed; one for the walk itself)."""

    __slots__ = ("archiver", "entry", "folder", "nodes", "old", "parent", "parent_count",
                 "parent_id", "parent_tree", "pending", "position", "prefetched", "same")

    def __init__(self, archiver: "Archiver", entry, parent: "Frame | None", folder):
        self.archiver = archiver
        self.entry = entry
        self.parent = parent
        self.folder = folder
        self.nodes: list[Node] = []
        self.pending = 1  # the walk has not left it yet
        self.old: Node | None = None  # this folder's Node in the parent snapshot
        self.parent_id = b""  # and its tree id there
        self.parent_tree: objects.Tree | None = None
        self.parent_count = -1  # the number of entries it had there
        self.same = 0  # Nodes taken as they were in the parent snapshot
        self.prefetched: dict[bytes, int] = {}  # subtrees of parent_tree asked for ahead
        self.position: tuple = ()  # where its parent tree is in the walk's order

    @property
    def path(self) -> bytes:
        return self.folder.path if self.folder is not None else b""

    def add(self, node: Node, old: Node | None = None):
        self.nodes.append(node)
        self.archiver._nodes += 1
        if node is old:
            self.same += 1

    def old_node(self, name: bytes) -> Node | None:
        return self.parent_tree.find(name) if self.parent_tree is not None else None

    def done(self):
        self.pending -= 1
        if self.pending == 0:
            self.archiver._ready(self)


class Archiver:
    """Builds the trees of one backup from the walk's events; ``run`` gives the root tree id."""

    log = Logger()

    def __init__(self, walker, uploader, held, parents: ParentTrees | None, report: Report,
                 progress=None, reactor=None, sealer=PLAIN, listed=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        #: Seals chunks and trees for an encrypted repository (``sdbackup.sealing``).
        self.sealer = sealer
        self.walker = walker
        self.uploader = uploader
        self.held = held
        self.parents = parents
        self.report = report
        self.progress = progress
        #: Called with ``("new" | "modified", path)`` for each file read (``--verbose``).
        self.listed = listed
        self.signal = uploader.signal
        self.stats = Stats()
        self.root: bytes | None = None
        self._parent_root = b""
        self._stack: list[Frame] = []
        self._small: list = []  # (frame, entry, expected node) to read in one hop
        self._small_bytes = 0
        self._rereads: deque = deque()  # reused files whose chunks are gone: read them
        self._ready_frames: deque[Frame] = deque()
        self._settling = False
        self._unfinished = 0  # frames left by the walk, tree not confirmed
        self._nodes = 0  # Nodes held by frames
        self._background = 0  # tree encodings and chunk list checks under way
        # Files are read in one thread of their own: the buffers of every read come from one
        # allocator arena and are reused, rather than left behind in the arena of whichever
        # pool thread took each hop (measured on 1 GiB: 83 MiB peak against 122 to 136).
        self._reading = ThreadPool(1, 1, "sdbackup-read")

    async def run(self, parent_root: bytes = b"") -> bytes:
        """Walk, read and store everything; the root tree's id once it is confirmed stored.
        ``parent_root`` is the parent snapshot's root tree, if there is one."""
        self._parent_root = parent_root
        self._reading.start()
        walking = deferToThread(self.walker.next_events)
        try:
            while True:
                events, walking = await walking, None
                if not events:
                    break
                # The walker reads ahead in its thread while these events are handled.
                walking = deferToThread(self.walker.next_events)
                await self._take(events)
                await self._do_rereads()
                if self._crowded(1):
                    await self._until(lambda: not self._crowded(2))
            await self._until(lambda: self.root is not None)
        finally:
            if walking is not None:
                await walking.addErrback(lambda _: None)  # it may be using folders
            self._reading.stop()
            self.walker.close()
        return self.root

    def _crowded(self, share: int) -> bool:
        """True when more than a ``share``-th of a bound is in use. Nodes count only while
        some are in unfinished folders: an open folder's Nodes cannot be let go of."""
        return (self._unfinished > MAX_UNFINISHED // share
                or self.held.waiting > MAX_CHECKING // share
                or (self._unfinished > 0 and self._nodes > MAX_NODES // share))

    # --- the walk's events ----------------------------------------------------------

    async def _take(self, events: list):
        for event in events:
            kind = type(event)
            if kind is Entry:
                frame = self._stack[-1]
                self.stats.files += 1
                if event.type == "file":
                    await self._file(frame, event)
                else:
                    old = frame.old_node(event.name)
                    same = old is not None and same_metadata(old, event.fields)
                    frame.add(old if same else Node(**event.fields), old)
                    self._advance(0, 1)
            elif kind is Enter:
                await self._enter(event)
            elif kind is Leave:
                self._leave(event)
            else:  # Release
                event.folder.release()
        self.signal.check()

    async def _enter(self, event: Enter):
        parent = self._stack[-1] if self._stack else None
        entry = event.entry
        frame = Frame(self, entry, parent, event.folder)
        if parent is None:
            parent_id, wanted = self._parent_root, False
        else:
            parent.pending += 1
            self.stats.dirs += 1
            old = parent.old_node(entry.name)
            parent_id = old.subtree if old is not None and old.type == "dir" else b""
            wanted = parent.prefetched.get(parent_id, 0) > 0
            if wanted:
                parent.prefetched[parent_id] -= 1
            frame.old = old
            if old is not None:
                index = bisect.bisect_left(parent.parent_tree.nodes, entry.name, key=_name)
                frame.position = (*parent.position, index)
        if parent_id and self.parents is not None:
            tree, frame.prefetched = await self.parents.enter(parent_id, wanted, frame.position)
            if tree is not None:
                frame.parent_id, frame.parent_tree = parent_id, tree
                frame.parent_count = len(tree.nodes)
        self._stack.append(frame)

    def _leave(self, event: Leave):
        frame = self._stack.pop()
        if frame.prefetched:
            self.parents.release(frame.prefetched)
        frame.parent_tree = frame.prefetched = None
        if event.folder is not None:
            event.folder.release()
        self._unfinished += 1
        frame.done()

    # --- files --------------------------------------------------------------------------

    async def _file(self, frame: Frame, entry: Entry):
        old = frame.old_node(entry.name)
        if old is not None and unchanged(old, entry.st):
            # Setting or removing an extended attribute changes the ctime: an unchanged file
            # has the parent's, and the walk did not read them (a syscall or two per file).
            if old.xattrs:
                entry.fields["xattrs"] = old.xattrs
            self._reuse(frame, entry, old)
            return
        if self.listed is not None:
            self.listed("modified" if old is not None else "new", entry.path)
        await self._read(frame, entry)

    def _reuse(self, frame: Frame, entry: Entry, old: Node):
        """The parent's content for an unchanged file, once its chunks are known held."""
        if same_metadata(old, entry.fields):
            node = old  # the common case: nothing about the file changed
        else:
            node = Node(**entry.fields, content=old.content, content_lists=old.content_lists,
                        hash=old.hash)
        entry.fields = None  # the Node has it all: only the entry's folder, name and stat wait
        frame.pending += 1
        entry.folder.hold()
        if old.content_lists:
            self._background += 1
            d = defer.ensureDeferred(self._check_lists(frame, entry, node, old))
            d.addErrback(self.signal.fail)
            d.addBoth(self._background_done)
        elif self.held.check(old.content, lambda held: self._checked(frame, entry, node, old, held)):
            self._checked(frame, entry, node, old, True)

    def _checked(self, frame: Frame, entry: Entry, node: Node, old: Node, held: bool):
        if not held:
            self._rereads.append((frame, entry, node))  # keeps its count and its folder
            self.signal.fire()
            return
        frame.add(node, old)
        self.stats.unchanged += 1
        self.stats.bytes += node.size
        self._advance(node.size, 1)
        entry.folder.release()
        frame.done()

    async def _check_lists(self, frame: Frame, entry: Entry, node: Node, old: Node):
        """A very long file's chunk lists and every chunk in them still held?"""
        held = True
        try:
            for list_id in node.content_lists:
                data = await self.parents.repository.fetch_object(Kind.LIST, list_id.hex())
                ids = objects.decode_chunk_list(data)
                if not await self._held([list_id, *ids]):
                    held = False
                    break
        except (ClientError, objects.ObjectFormatError) as e:
            self.report.note(f"{entry.path}: the parent snapshot's chunk list cannot be read "
                             f"({e}); reading the file again")
            held = False
        self._checked(frame, entry, node, old, held)

    async def _held(self, chunk_ids: list) -> bool:
        answer = defer.Deferred()
        if self.held.check(chunk_ids, answer.callback):
            return True
        self.held.flush()
        return await answer

    async def _do_rereads(self):
        while self._rereads:
            frame, entry, expected = self._rereads.popleft()
            await self._read(frame, entry, expected)
            entry.folder.release()  # the check's hold and count: the read has its own
            frame.done()

    async def _read(self, frame: Frame, entry: Entry, expected: Node | None = None):
        frame.pending += 1
        entry.folder.hold()
        if entry.st.st_size <= SMALL_FILE:
            self._small.append((frame, entry, expected))
            self._small_bytes += entry.st.st_size
            if len(self._small) >= SMALL_FILES_AT_ONCE or self._small_bytes >= SMALL_FILES_BYTES:
                await self._read_small()
        else:
            await self._read_large(frame, entry, expected)

    async def _read_small(self):
        """Small files are read many to a thread hop; one by one, each would wait on a hop."""
        batch, self._small, self._small_bytes = self._small, [], 0
        if not batch:
            return
        results = await self._read_in_thread(_read_small_files, self.sealer,
                                      [(entry.folder.fd, entry.name, entry.st) for _, entry, _ in batch])
        for (frame, entry, expected), result in zip(batch, results, strict=True):
            if isinstance(result, OSError):
                self._unreadable(frame, entry, result)
                continue
            content = FileContent(self.uploader, frame)
            content.add(result.chunks)
            self._file_read(frame, entry, content, result, expected)
            self._advance(result.size, 0)
        await self.uploader.room()

    async def _read_large(self, frame: Frame, entry: Entry, expected: Node | None):
        reader = FileReader(entry.folder.fd, entry.name, entry.st)
        content = None
        try:
            await self._read_in_thread(reader.open)
            content = FileContent(self.uploader, frame)
            while chunks := await self._read_in_thread(_next_chunks, reader, self.sealer):
                content.add(chunks)
                self._advance(sum(len(data) for _, data in chunks), 0)
                await self.uploader.room()
            result = await self._read_in_thread(reader.finish)
        except OSError as e:
            if content is not None:
                content.abandon()
            self._unreadable(frame, entry, e)
            return
        finally:
            reader.close()
        self._file_read(frame, entry, content, result, expected)

    def _read_in_thread(self, f, *args):
        return deferToThreadPool(self.reactor, self._reading, f, *args)

    def _file_read(self, frame: Frame, entry: Entry, content: FileContent, result,
                   expected: Node | None):
        ids, lists = content.finish()
        if result.changed:
            self.report.warn(f"{entry.path} changed while it was read: its copy may mix old "
                             f"and new contents")
        if expected is None:
            node = Node(**(entry.fields | {"size": result.size, "xattrs": result.xattrs}),
                        content=ids, content_lists=lists, hash=result.hash)
        else:  # read again: the Node taken from the parent holds the entry's metadata
            node = attrs.evolve(expected, size=result.size, content=ids, content_lists=lists,
                                hash=result.hash, xattrs=result.xattrs)
            if node.hash != expected.hash and not result.changed:
                self.report.warn(f"{entry.path} has new contents although its size and times "
                                 f"are those of the parent snapshot")
        frame.add(node)
        self.stats.bytes += result.size
        self._advance(0, 1)
        entry.folder.release()
        frame.done()

    def _unreadable(self, frame: Frame, entry: Entry, error: OSError):
        self.report.warn(f"cannot read {entry.path}: {error.strerror}")
        self.stats.files -= 1
        entry.folder.release()
        frame.done()

    def _advance(self, size: int, files: int):
        if self.progress is not None:
            self.progress.advance(size, files)

    # --- folders, bottom-up -------------------------------------------------------------

    def _ready(self, frame: Frame):
        """``frame`` waits for nothing more: seal its tree. Frames that become ready while
        one is being sealed queue up, so a chain of them never recurses."""
        self._ready_frames.append(frame)
        if self._settling:
            return
        self._settling = True
        try:
            while self._ready_frames:
                ready = self._ready_frames.popleft()
                try:
                    self._finish(ready)
                except Exception:
                    self.signal.fail(Failure())
        finally:
            self._settling = False

    def _finish(self, frame: Frame):
        nodes, frame.nodes = frame.nodes, None
        self._nodes -= len(nodes)
        if frame.same == len(nodes) == frame.parent_count:
            # Every entry is the parent snapshot's, as it was: so is the tree.
            self._sealed(frame, [(frame.parent_id, b"", "")])
            return
        sealer = self.sealer
        if len(nodes) <= ENCODE_INLINE and not sealer.encrypted:
            self._sealed(frame, seal_tree(nodes, frame.path))
            return
        self._background += 1
        d = deferToThread(seal_tree, nodes, frame.path, sealer)
        d.addCallback(lambda sealed: self._sealed(frame, sealed))
        d.addErrback(self.signal.fail)
        d.addBoth(self._background_done)

    def _sealed(self, frame: Frame, sealed: list):
        *pages, (tree_id, data, checksum) = sealed
        parent = frame.parent
        if parent is None:
            def then():
                self._unfinished -= 1
                self.root = tree_id
                self.signal.fire()
        else:
            old = frame.old
            if old is not None and old.subtree == tree_id and same_metadata(old, frame.entry.fields):
                node = old
            else:
                node = Node(**frame.entry.fields, subtree=tree_id)

            def then():
                self._unfinished -= 1
                parent.add(node, old)
                parent.done()
        if tree_id == frame.parent_id:
            then()  # the parent snapshot's tree (and pages) is held: it was just read from the cluster
            return

        def store():
            if self.uploader.store(Kind.TREE, tree_id, data, then, checksum):
                then()
        self._after_pages(pages, store)

    def _after_pages(self, pages: list, then):
        """Store a paged tree's pages, and ``then()`` once every one is confirmed: its head
        is stored after them, as every tree is after what it points to."""
        left = len(pages) + 1

        def one_done():
            nonlocal left
            left -= 1
            if not left:
                then()
        for page_id, data, checksum in pages:
            if self.uploader.store(Kind.TREE, page_id, data, one_done, checksum):
                one_done()
        one_done()

    def _background_done(self, _):
        self._background -= 1
        self.signal.fire()

    # --- waiting ----------------------------------------------------------------------------

    async def _until(self, condition):
        """Let everything under way go on until ``condition()`` holds."""
        while True:
            self.signal.check()
            if condition():
                return
            await self._do_rereads()
            await self._read_small()
            self.signal.check()
            if condition():
                return
            self.uploader.flush()
            self.held.flush()
            if not (self.uploader.busy or self.held.busy or self._background or self._rereads):
                raise AssertionError(f"the backup waits for nothing: {self._unfinished} folders "
                                     f"unfinished")
            await self.signal.wait()
