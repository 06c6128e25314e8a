"""Restoring a snapshot: read its trees, fetch and verify chunks, have ``fswriter`` put it back.

The walk goes depth first through the snapshot's trees (``TreeReader``). A
folder is created when the walk enters it and gets its metadata when
everything inside it is done (files still downloading included), so folders
finish deepest first and their mtimes stay as saved. With ``--include`` and
``--exclude`` (``selection.RestoreFilter``) the walk keeps the selected entries
only; a folder that merely leads to them is made when the first one inside is
met, so none is made empty. Each include must match something: the trees are
read for that before the target is made, up to each include's first match.

Small files, links, FIFOs and devices are restored in batches: the walk
gathers up to ``BATCH_BYTES`` (or ``BATCH_ENTRIES``) of them, their chunks
come in a few ``FetchChunks`` round trips (``Repository.fetch_many``), and one
thread call writes them all. ``BATCHES_AT_ONCE`` batches are under way while
the walk gathers the next, so fetching, writing and reading trees overlap, and
memory is bounded by the batches in flight. Larger files download chunk by
chunk beside them: at most ``FILES_AT_ONCE`` files and ``CHUNKS_IN_FLIGHT``
chunks are under way, and a file never waits for a chunk slot while it holds
fetched chunks (it writes them first), so files sharing the slots cannot all
wait for each other. Every chunk is verified against its id by the
repository, and every file against its whole-file hash by the writer.

Hard links: the first entry of a ``(dev, inode)`` group met in the walk is
restored whole; the others wait for it and become links to it. If the first
fails, the next one is restored whole instead.

An error concerns one entry (or a folder's contents) and is collected; the
restore goes on, and reports them all at the end.

Into a folder that was already there (``fswriter`` surveys it when it opens
it), an entry of the snapshot that is already in place is left as it is or
replaced as ``--overwrite`` decides (``overwrite.decide``: by default, the same
type, size and mtime mean unchanged), before anything of it is fetched. With
``--delete``, what the folder holds and the snapshot's folder does not is
removed when the folder is finished, just before its metadata is set. A dry
run walks the same way and decides the same, but fetches, writes and removes
nothing.
"""

from collections import deque

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from sdbackup import objects
from sdbackup.client import fswriter
from sdbackup.client.fswriter import FileSystemWriter, Folder, RestoreError
from sdbackup.client.overwrite import DEFAULT_MODE, Action, decide
from sdbackup.client.progress import Progress
from sdbackup.client.repository import ChunkUnavailable, Repository
from sdbackup.client.selection import RestoreFilter
from sdbackup.client.session import ClientError, Session
from sdbackup.client.treereader import Enter, Entry, Leave, TreeReader
from sdbackup.memory import tune_malloc
from sdbackup.objects import Kind, Node
from sdbackup.paths import UnsafePath, display_path

#: Chunks being fetched at once, across all files: bounds memory.
CHUNKS_IN_FLIGHT = 16
#: Chunks fetched ahead within one file.
FILE_WINDOW = 8
#: Files restored at once (many small files are bound by round trips, not bytes).
FILES_AT_ONCE = 16
#: Files of at most this size without chunk lists are fetched whole and written in batches.
SMALL_FILE = 1024 * 1024
#: Bytes of small files gathered in one batch (its chunks come in a few FetchChunks).
BATCH_BYTES = 4 * 1024 * 1024
#: Entries gathered in one batch at most.
BATCH_ENTRIES = 1000
#: Batches fetched or written at once: bounds memory at about this many times BATCH_BYTES.
BATCHES_AT_ONCE = 2
#: Batches written at once.
WRITERS_AT_ONCE = 1


@attrs.define
class RestoreResult:
    snapshot_id: str
    files: int = 0
    folders: int = 0
    #: Links, FIFOs and devices.
    others: int = 0
    bytes: int = 0
    errors: list = attrs.Factory(list)
    notes: list = attrs.Factory(list)
    #: Entries already in place with the snapshot's type, size and mtime: left as they were.
    unchanged: int = 0
    #: Entries in place but different, kept because of ``--overwrite never`` or ``if-newer``.
    skipped: int = 0
    #: Entries removed by ``--delete`` (everything inside a removed folder counts).
    deleted: int = 0
    #: Nothing was written or removed: the counts say what a restore would do.
    dry_run: bool = False


@attrs.define(eq=False)
class _FolderState:
    """A folder being restored: it finishes when the walk has left it and ``pending`` is 0."""

    folder: Folder
    parent: "_FolderState | None"
    pending: int = 1  # the walk is inside it
    finishing: bool = False
    #: Names the snapshot's folder holds (walked), kept for ``--delete``.
    seen: set = attrs.Factory(set)


@attrs.define(eq=False)
class _Unmade:
    """A folder the walk is in that is not made yet: it leads to what ``--include`` selects."""

    event: Enter


@attrs.define(eq=False)
class _Batched:
    """A small entry waiting in a batch; its folder counts it as pending."""

    state: _FolderState
    path: tuple
    node: Node
    holders: dict
    group: "_LinkGroup | None"


@attrs.define(eq=False)
class _LinkGroup:
    """Entries of one ``(dev, inode)``: the first is restored whole, the others link to it."""

    type: str
    source: tuple | None = None  # (_FolderState, name) once the first is in place
    running: bool = True  # an entry is being restored whole
    waiters: list = attrs.Factory(list)

    def wait(self) -> defer.Deferred:
        """The source to link to, or None: then the caller restores its entry whole."""
        if self.source is not None:
            return defer.succeed(self.source)
        if not self.running:
            self.running = True
            return defer.succeed(None)
        d = defer.Deferred()
        self.waiters.append(d)
        return d

    def settle(self, source: tuple | None):
        if source is not None:
            self.source, self.running = source, False
            waiters, self.waiters = self.waiters, []
            for d in waiters:
                d.callback(source)
        elif self.waiters:
            self.waiters.pop(0).callback(None)  # the next one restores itself and becomes the first
        else:
            self.running = False


class Restore:
    def __init__(self, session: Session, snapshot: str, target: str, includes=(),
                 progress: Progress | None = None, overwrite: str = DEFAULT_MODE,
                 delete: bool = False, dry_run: bool = False, listed=None, excludes=(),
                 iincludes=(), iexcludes=()):
        self.session = session
        #: ``--overwrite``, ``--delete``, ``--dry-run``.
        self.overwrite = overwrite
        self.delete = delete
        self.dry_run = dry_run
        #: Called with ``("restored" | "deleted", path)`` for each entry written or removed
        #: (or, in a dry run, that would be): what ``--verbose`` lists.
        self.listed = listed
        self.repository = Repository(session)
        self._trim = lambda: None  # (``run`` tunes the allocator)
        self.snapshot = snapshot
        self.target = target
        #: ``--include`` and ``--exclude`` (a PatternError for one that cannot be read).
        self.selection = RestoreFilter(includes, excludes, iincludes, iexcludes)
        self.progress = progress
        self.chunk_slots = defer.DeferredSemaphore(CHUNKS_IN_FLIGHT)
        self.file_slots = defer.DeferredSemaphore(FILES_AT_ONCE)
        self.batch_slots = defer.DeferredSemaphore(BATCHES_AT_ONCE)
        self.write_slots = defer.DeferredSemaphore(WRITERS_AT_ONCE)
        self._batch: list[_Batched] = []
        self._batch_bytes = 0
        self.writer: FileSystemWriter | None = None
        self.result = RestoreResult(snapshot_id="", dry_run=dry_run)
        #: Chunk ids (hex) found to be all zeros, and their sizes: written as holes, fetched once.
        self._zero_chunks: dict[str, int] = {}
        self._links: dict[tuple, _LinkGroup] = {}
        self._open: set[_FolderState] = set()
        self._root: _FolderState | None = None
        self._running: set[defer.Deferred] = set()
        self._done = defer.Deferred()

    async def run(self) -> RestoreResult:
        self._trim = tune_malloc() or (lambda: None)
        summary = await self.repository.resolve(self.snapshot)
        snapshot = await self.repository.load_snapshot(summary.snapshot_id)
        self.result.snapshot_id = summary.snapshot_id
        if self.progress is not None and not self.selection:
            self.progress.total_bytes, self.progress.total_files = summary.bytes, summary.files
        if self.selection.includes:
            await self._check_includes(snapshot.tree, summary.snapshot_id)
        fswriter.raise_open_files_limit()
        try:
            self.writer = await deferToThread(
                FileSystemWriter, self.target, survey=self.overwrite != "always" or self.delete,
                dry_run=self.dry_run)
        except OSError as e:
            raise ClientError(f"cannot restore into {self.target}: {e.strerror or e}") from None
        try:
            await self._walk(snapshot.tree)
            await self._done  # every folder finished, deepest first
            extras = self._extras(self._root)
            if extras:
                self._removed(*await deferToThread(self.writer.remove_entries, self.writer.root, extras))
            await deferToThread(self.writer.sync)  # durable before we say it is done
        except defer.CancelledError:
            # Interrupted: what waits (on a server, maybe a hung one) stops waiting now; what
            # a thread is writing ends before the folders and files are closed.
            for running in list(self._running):
                running.cancel()
            await threads_idle()
            raise
        finally:
            # After a failure of the whole restore: let what is under way end, then close.
            while self._running:
                await defer.DeferredList(list(self._running))
            for state in list(self._open):
                self.writer.close_folder(state.folder)
            self.writer.close()
        return self.result

    # --- the walk -----------------------------------------------------------------------

    async def _check_includes(self, tree_id: bytes, snapshot_id: str):
        """Every ``--include`` must match something the restore would write, or nothing is
        done (not even the target made): the trees are read, only where a match may be (along
        its path, for a plain path), until each has matched."""
        selection = self.selection
        missing = set(range(len(selection.includes)))
        walk = TreeReader(self.repository).walk(
            tree_id, want=lambda path, node: bool(missing) and selection.wants(path, node.type == "dir"))
        try:
            async for event in walk:
                if isinstance(event, Entry | Enter):
                    missing -= selection.includes_matching(event.path, missing)
                    if not missing:
                        break
        finally:
            await walk.aclose()
        if missing:
            texts = " ".join(repr(selection.includes[i].text) for i in sorted(missing))
            raise ClientError(f"--include {texts}: matches nothing in snapshot {snapshot_id[:8]}"
                              + (" (or only what --exclude leaves out)" if selection.excludes else "")
                              + "; nothing restored")

    async def _walk(self, tree_id: bytes):
        reader = TreeReader(self.repository, chunks=True)
        root = self._root = _FolderState(self.writer.root, None)
        stack: list[_FolderState | _Unmade | None] = []
        selection = self.selection
        want = (lambda path, node: selection.wants(path, node.type == "dir")) if selection else None
        async for event in reader.walk(tree_id, want=want):
            if isinstance(event, Entry):
                await self._entry(await self._made(stack), event)
            elif isinstance(event, Enter):
                if event.node is None:
                    stack.append(root)
                    continue
                if selection.includes and not selection.selects(event.path):
                    # Only on the way to what --include selects: made once something inside is.
                    if event.error:
                        self.result.errors.append(event.error)
                    stack.append(_Unmade(event))
                    continue
                state = await self._enter(await self._made(stack), event)
                if state is None and not event.error:
                    reader.skip()
                stack.append(state)
            elif isinstance(event, Leave):
                state = stack.pop()
                if isinstance(state, _FolderState):
                    self._release(state)
        await self._flush()

    async def _made(self, stack: list) -> "_FolderState | None":
        """The folder the walk is in, made first if it waited (with the waiting ones above it):
        a folder that only leads to selected entries is made, with its metadata, once the first
        of them is met, so none is made empty."""
        first = len(stack)
        while isinstance(stack[first - 1], _Unmade):
            first -= 1
        for index in range(first, len(stack)):
            stack[index] = await self._enter(stack[index - 1], stack[index].event)
        return stack[-1]

    async def _enter(self, parent: _FolderState | None, event: Enter) -> _FolderState | None:
        """Create the folder; None when it cannot be (nothing below it is restored)."""
        if parent is None:
            return None
        parent.seen.add(event.node.name)
        try:
            folder = await deferToThread(self.writer.make_folder, parent.folder, event.node)
        except (RestoreError, OSError) as e:
            self.result.errors.append(_describe(e, event.path))
            return None
        if event.error:
            self.result.errors.append(event.error)
        parent.pending += 1
        state = _FolderState(folder, parent)
        self._open.add(state)
        self.result.folders += 1
        return state

    async def _entry(self, state: _FolderState | None, event: Entry):
        if state is None:
            return
        node = event.node
        state.seen.add(node.name)
        existing = state.folder.existing.get(node.name) if state.folder.existing else None
        action = decide(self.overwrite, node, existing)
        if action is not Action.WRITE or self.dry_run:
            self._not_written(state, event.path, node, action)
            return
        group = None
        if node.links > 1 and (node.dev or node.inode):
            key = (node.dev, node.inode)
            group = self._links.get(key)
            if group is not None and group.type == node.type:
                self._start(state, event.path, self._link(state, node, event.holders, group))
                return
            group = self._links[key] = _LinkGroup(node.type)
        if node.type != "file" or (node.size <= SMALL_FILE and not node.content_lists):
            state.pending += 1
            self._batch.append(_Batched(state, event.path, node, event.holders, group))
            self._batch_bytes += node.size
            if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_ENTRIES:
                await self._flush()
        else:
            await self.file_slots.acquire()
            self._start(state, event.path, self._file(state, node, event.holders, group), slot=True)

    def _not_written(self, state: _FolderState, path: tuple, node: Node, action: Action):
        """An entry left as it is (unchanged, or kept), or one a dry run would write."""
        if action is Action.WRITE:  # a dry run: counted as the restore would count it
            if node.type == "file":
                self.result.files += 1
                self.result.bytes += node.size
            else:
                self.result.others += 1
            self._list("restored", path)
        elif action is Action.UNCHANGED:
            self.result.unchanged += 1
            if node.links > 1 and (node.dev or node.inode) and not self.dry_run:
                # The rest of its hard-link group can link to it: it is the snapshot's.
                self._links.setdefault((node.dev, node.inode), _LinkGroup(node.type)).settle(
                    (state, node.name))
        else:
            self.result.skipped += 1
        if self.progress is not None:
            is_file = node.type == "file"
            self.progress.advance(size=node.size if is_file else 0, files=int(is_file))

    def _list(self, what: str, path: tuple):
        if self.listed is not None:
            self.listed(what, path)

    def _extras(self, state: _FolderState) -> list[bytes]:
        """What ``--delete`` removes from a folder: the names it held that the snapshot's
        folder does not, and that the restore's selection would restore."""
        if not self.delete or not state.folder.existing:
            return []
        return [name for name in state.folder.existing
                if name not in state.seen and self._deletable((*state.folder.path, name))]

    def _deletable(self, path: tuple) -> bool:
        """A path the snapshot does not hold is deleted only where the selection reaches:
        at or under an ``--include`` (everywhere without one), and not at or under an
        ``--exclude``."""
        return self.selection.selects(path)

    def _removed(self, removed: list, errors: list):
        for path, count in removed:
            self.result.deleted += count
            self._list("deleted", path)
        self.result.errors.extend(errors)

    def _finish_folder(self, folder: Folder, extras: list[bytes]):
        """In a thread: remove what ``--delete`` removes, then set the folder's metadata."""
        removed = self.writer.remove_entries(folder, extras) if extras else ([], [])
        return self.writer.finish_folder(folder), removed

    def _start(self, state: _FolderState, path: tuple, work, slot: bool = False):
        state.pending += 1
        d = defer.ensureDeferred(work)
        self._running.add(d)
        d.addBoth(self._entry_done, state, path, slot)
        d.addBoth(lambda _: self._running.discard(d))

    def _entry_done(self, outcome, state: _FolderState, path: tuple, slot: bool):
        if slot:
            self.file_slots.release()
        if isinstance(outcome, Failure):
            self.result.errors.append(_describe(outcome.value, path))
        else:
            self.result.notes.extend(outcome or ())
            self._list("restored", path)
        self._release(state)

    def _release(self, state: _FolderState):
        """One thing inside ``state`` is done; when nothing is left, finish the folder."""
        state.pending -= 1
        if state.pending:
            return
        if state.parent is None:
            self._done.callback(None)
            return
        state.finishing = True
        d = deferToThread(self._finish_folder, state.folder, self._extras(state))
        self._running.add(d)
        d.addBoth(self._folder_done, state)
        d.addBoth(lambda _: self._running.discard(d))

    def _folder_done(self, outcome, state: _FolderState):
        self._open.discard(state)
        if isinstance(outcome, Failure):
            self.result.errors.append(_describe(outcome.value, state.folder.path))
        else:
            notes, removed = outcome
            self.result.notes.extend(notes)
            self._removed(*removed)
        self._release(state.parent)

    # --- batches of small entries ------------------------------------------------------

    async def _flush(self):
        """Send the batch gathered so far on its way (waiting while ``BATCHES_AT_ONCE`` are)."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        await self.batch_slots.acquire()
        d = defer.ensureDeferred(self._write_batch(batch))
        self._running.add(d)
        d.addBoth(lambda _: (self.batch_slots.release(), self._running.discard(d)))

    async def _write_batch(self, batch: list[_Batched]):
        """Fetch the chunks of a batch's files, write all its entries in one thread call."""
        outcomes: list = [None] * len(batch)
        try:
            wanted = {}
            for item in batch:
                for chunk_id in item.node.content if item.node.type == "file" else ():
                    hex_id = chunk_id.hex()
                    if hex_id not in self._zero_chunks:
                        wanted[hex_id] = item.holders.get(hex_id, [])
            fetched = await self.repository.fetch_many(Kind.DATA, wanted) if wanted else {}
            work = []
            for index, item in enumerate(batch):
                if item.node.type != "file":
                    work.append((index, (item.state.folder, item.node, None)))
                    continue
                try:
                    pieces = self._pieces(item.node, fetched)
                except ChunkUnavailable as e:
                    outcomes[index] = e
                    continue
                work.append((index, (item.state.folder, item.node, pieces)))
            del fetched
            done = await self.write_slots.run(deferToThread, self.writer.write_entries,
                                              [entry for _, entry in work])
            for (index, _), outcome in zip(work, done, strict=True):
                outcomes[index] = outcome
        except Exception as e:
            outcomes = [e if outcome is None else outcome for outcome in outcomes]
        for item, outcome in zip(batch, outcomes, strict=True):
            self._batched_done(item, outcome)
        self._trim()  # (its chunks were opened in threads: freed holes of their arenas)

    def _pieces(self, node: Node, fetched: dict) -> list[bytes]:
        """A small file's chunks, from a batch's fetched chunks (ChunkUnavailable if one failed)."""
        pieces = []
        for chunk_id in node.content:
            hex_id = chunk_id.hex()
            zeros = self._zero_chunks.get(hex_id)
            data = bytes(zeros) if zeros is not None else fetched[hex_id]
            if isinstance(data, ChunkUnavailable):
                raise data
            pieces.append(data)
        return pieces

    def _batched_done(self, item: _Batched, outcome):
        if isinstance(outcome, BaseException):
            if item.group is not None:
                item.group.settle(None)
            self.result.errors.append(_describe(outcome, item.path))
        else:
            if item.group is not None:
                item.group.settle((item.state, item.node.name))
            self.result.notes.extend(outcome)
            self._list("restored", item.path)
            if item.node.type == "file":
                self.result.files += 1
                self.result.bytes += item.node.size
                if self.progress is not None:
                    self.progress.advance(size=item.node.size, files=1)
            else:
                self.result.others += 1
        self._release(item.state)

    # --- entries ------------------------------------------------------------------------

    @staticmethod
    async def _first_of_group(state: _FolderState, node: Node, group: _LinkGroup | None, written):
        """Await ``written``, then tell the rest of ``node``'s hard-link group where its first
        copy is, or that it failed (they are then restored whole)."""
        try:
            notes = await written
        except BaseException:
            if group is not None:
                group.settle(None)
            raise
        if group is not None:
            group.settle((state, node.name))
        return notes

    async def _file(self, state: _FolderState, node: Node, holders: dict, group: _LinkGroup | None):
        notes = await self._first_of_group(
            state, node, group, defer.ensureDeferred(self._write_file(state.folder, node, holders)))
        self.result.files += 1
        self.result.bytes += node.size
        if self.progress is not None:
            self.progress.advance(files=1)
        return notes

    async def _special(self, state: _FolderState, node: Node, group: _LinkGroup | None):
        notes = await self._first_of_group(
            state, node, group, deferToThread(self.writer.make_special, state.folder, node))
        self.result.others += 1
        return notes

    async def _link(self, state: _FolderState, node: Node, holders: dict, group: _LinkGroup):
        source = await group.wait()
        if source is None:  # the first copy failed: this one is restored whole
            if node.type != "file":
                return await self._special(state, node, group)
            await self.file_slots.acquire()
            try:
                return await self._file(state, node, holders, group)
            finally:
                self.file_slots.release()
        source_state, source_name = source
        if source_state.finishing:  # its descriptor is closing: the writer opens it again
            source_folder = Folder(None, source_state.folder.path)
        else:
            source_state.pending += 1  # keeps its descriptor open while we link
            source_folder = source_state.folder
        try:
            await deferToThread(self.writer.link, state.folder, node, source_folder, source_name)
        finally:
            if source_folder is source_state.folder:
                self._release(source_state)
        if node.type == "file":
            self.result.files += 1
            if self.progress is not None:
                self.progress.advance(files=1)
        else:
            self.result.others += 1
        return []

    # --- file contents --------------------------------------------------------------------

    async def _write_file(self, folder: Folder, node: Node, holders: dict) -> list[str]:
        if node.size <= SMALL_FILE and not node.content_lists:  # one of a link group, restored alone
            fetched = await self.repository.fetch_many(Kind.DATA, {
                chunk_id.hex(): holders.get(chunk_id.hex(), []) for chunk_id in node.content
                if chunk_id.hex() not in self._zero_chunks})
            pieces = self._pieces(node, fetched)
            del fetched
            notes = await deferToThread(self.writer.write_file, folder, node, pieces)
            if self.progress is not None:
                self.progress.advance(size=node.size)
            return notes
        out = await deferToThread(self.writer.open_file, folder, node)
        pending: deque = deque()  # (chunk id, Deferred of its bytes or size of zeros, holds a slot)
        try:
            async for hex_id, servers in self._chunks(node, holders):
                zeros = self._zero_chunks.get(hex_id)
                if zeros is not None:
                    pending.append((hex_id, defer.succeed(zeros), False))
                else:
                    # Never wait for a slot while holding fetched chunks: write them instead, so
                    # files that share the slots cannot all wait for each other.
                    while pending and not self.chunk_slots.tokens:
                        await self._write_next(pending, out)
                    await self.chunk_slots.acquire()
                    fetch = defer.ensureDeferred(self.repository.fetch(Kind.DATA, hex_id, servers))
                    pending.append((hex_id, fetch, True))
                while pending and (len(pending) >= FILE_WINDOW or pending[0][1].called):
                    await self._write_next(pending, out)
            while pending:
                await self._write_next(pending, out)
            self._trim()
            return await deferToThread(out.finish)
        except BaseException:
            for _, d, holds in pending:
                if holds:
                    d.addBoth(lambda _: self.chunk_slots.release())
            await deferToThread(out.abort)
            raise

    async def _write_next(self, pending: deque, out: fswriter.FileOut):
        hex_id, d, holds = pending.popleft()
        try:
            data = await d
            if isinstance(data, int):
                await deferToThread(out.write_zeros, data)
                size = data
            else:
                if await deferToThread(out.write, data):
                    self._zero_chunks[hex_id] = len(data)
                size = len(data)
        finally:
            if holds:
                self.chunk_slots.release()
        if self.progress is not None:
            self.progress.advance(size=size)

    async def _chunks(self, node: Node, holders: dict):
        """``(chunk id hex, holders)`` of a file in order, reading its chunk lists if any."""
        for chunk_id in node.content:
            hex_id = chunk_id.hex()
            yield hex_id, holders.get(hex_id, [])
        for list_id in node.content_lists:
            hex_id = list_id.hex()
            data = await self.repository.fetch(Kind.LIST, hex_id, holders.get(hex_id, []))
            ids = [chunk_id.hex() for chunk_id in objects.decode_chunk_list(data)]
            located = await self.repository.locate(list(dict.fromkeys(ids)))
            for chunk_hex in ids:
                yield chunk_hex, located.get(chunk_hex, [])


def _describe(error: BaseException, path: tuple) -> str:
    """One line for an entry's error (a RestoreError already names its entry)."""
    where = display_path(path) or "."
    if isinstance(error, RestoreError):
        return str(error)
    if isinstance(error, OSError):
        return f"{where}: {error.strerror or error}"
    if isinstance(error, ClientError | UnsafePath | objects.ObjectFormatError):
        return f"{where}: {error}"
    return f"{where}: {type(error).__name__}: {error}"


async def threads_idle():
    """Once no thread of the reactor's pool is running a call (a cancelled ``deferToThread``
    does not stop its thread)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    pool = reactor.getThreadPool()
    while pool.working:
        await deferLater(reactor, 0.01)
