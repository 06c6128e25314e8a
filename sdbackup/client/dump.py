"""``sdbackup dump SNAPSHOT PATH``: a file's bytes, or a folder as a tar stream, on stdout.

A file's chunks are fetched a few ahead, each verified against its id as a restore
verifies them, written out in order and hashed; at the end the whole file's hash and
size are checked against the snapshot's. Bytes already written cannot be taken back,
so a mismatch makes the command fail (exit 1) with a message: a script must not use
the output.

A folder (or ``/``, the whole snapshot) becomes a POSIX (pax) tar stream written with
``tarfile`` in streaming mode (``w|``): entries named by their path from the snapshot's
root, as ``restore`` puts them, with their modes, owners, times (nanoseconds in pax
headers), link targets, devices and hard links; names that are not UTF-8 keep their
exact bytes. The walk and the chunks are read on the reactor, the tar written in a
thread; nothing holds a whole file, and memory does not grow with the folder's size.
"""

import os
import stat
import sys
import tarfile
from collections import deque

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from sdbackup import hashing
from sdbackup.client.diff import TreeLoader, walk
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError
from sdbackup.objects import Kind, Node
from sdbackup.paths import display_path, parse_path

#: Chunks fetched ahead of the one being written.
AHEAD = 4
#: Chunk ids located in one ``Locate``.
LOCATE_BATCH = 256
#: Files up to this size (without chunk lists) go into a tar in batches, their chunks fetched
#: together: many small files cost a few round trips, not one each.
SMALL_FILE = 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
BATCH_ENTRIES = 1000
#: Batches fetched ahead of the one being written: memory stays near this many batches.
BATCHES_AHEAD = 3

_TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE}


class DumpError(ClientError):
    """The bytes read are not the file the snapshot describes."""


def _text(name: bytes) -> str:
    """A name for ``tarfile``, which writes it back as the same bytes (surrogateescape)."""
    return name.decode("utf-8", "surrogateescape")


def tar_info(path: tuple, node: Node, link_to: tuple | None = None) -> tarfile.TarInfo:
    """The tar header of an entry; ``link_to``: the path of an earlier hard link to it."""
    info = tarfile.TarInfo(_text(b"/".join(path)) or ".")
    info.type = _TAR_TYPES[node.type]
    info.mode = stat.S_IMODE(node.mode)
    info.uid, info.gid = node.uid, node.gid
    info.uname, info.gname = node.user, node.group
    seconds, fraction = divmod(node.mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if fraction:  # the nanoseconds, exactly, in a pax header (GNU tar restores them)
        info.pax_headers = {"mtime": f"{seconds}.{fraction:09d}"}
    if node.type == "file":
        if link_to is not None:
            info.type = tarfile.LNKTYPE
            info.linkname = _text(b"/".join(link_to))
        else:
            info.size = node.size
    elif node.type == "symlink":
        info.linkname = _text(node.target)
    elif node.type in ("chardev", "blockdev"):
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
    return info


async def file_chunks(repository: Repository, node: Node, ahead: int = AHEAD):
    """A file's chunks, verified, in order, ``ahead`` of them fetched at once."""

    async def fetch(hex_id: str, holders: list[str]):
        try:
            return await repository.fetch(Kind.DATA, hex_id, holders), None
        except Exception as e:  # (kept as the result: an abandoned fetch logs nothing)
            return None, e

    pending: deque = deque()
    batch: list[str] = []

    async def drain(keep: int):
        while len(pending) > keep:
            data, error = await pending.popleft()
            if error is not None:
                raise error
            yield data

    async def start(ids: list[str]):
        located = await repository.locate(list(dict.fromkeys(ids)))
        for hex_id in ids:
            async for data in drain(ahead - 1):
                yield data
            pending.append(defer.ensureDeferred(fetch(hex_id, located.get(hex_id, []))))

    async for chunk_id in repository.content(node):
        batch.append(chunk_id.hex())
        if len(batch) == LOCATE_BATCH:
            async for data in start(batch):
                yield data
            batch = []
    async for data in start(batch):
        yield data
    async for data in drain(0):
        yield data


class _Checked:
    """What was written of one file, hashed as it goes (in the writing thread)."""

    def __init__(self):
        self.hasher = hashing.file_hasher()
        self.size = 0

    def write(self, out, data: bytes):
        self.hasher.update(data)
        out.write(data)
        self.size += len(data)

    def check(self, path: tuple, node: Node):
        where = display_path(path) or "/"
        if self.size != node.size:
            raise DumpError(f"{where}: read {self.size} bytes, the snapshot says {node.size}; "
                            "the output is not the file")
        if node.hash and self.hasher.digest() != node.hash:
            raise DumpError(f"{where}: the bytes read do not match the file's hash; the output "
                            "is not the file")


async def dump_file(repository: Repository, path: tuple, node: Node, out) -> int:
    """Write a file's bytes to ``out`` (binary); its size."""
    checked = _Checked()
    async for data in file_chunks(repository, node):
        await deferToThread(checked.write, out, data)
    await deferToThread(out.flush)
    checked.check(path, node)
    return checked.size


class TarDump:
    """Entries written to a streaming tar from the reactor, in the order given.

    Small files are gathered in batches (up to ``BATCH_BYTES`` or ``BATCH_ENTRIES``, with the
    entries around them) whose chunks come in a few round trips (``fetch_many``) while the
    batches before them are written, ``BATCHES_AHEAD`` at most: memory stays near that many
    batches. A larger file is streamed chunk by chunk once the batches before it are written.
    """

    def __init__(self, repository: Repository, out):
        self.repository = repository
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                                encoding="utf-8", errors="surrogateescape")
        self._links: dict[tuple, tuple] = {}  # (dev, inode) of a hard-linked file -> its path
        self._batch: list[tuple] = []  # (path, node, TarInfo) gathered
        self._batch_bytes = 0
        self._queue: deque = deque()  # (batch, Deferred of its chunks) fetched ahead
        self.entries = 0

    def _header(self, info: tarfile.TarInfo):
        self.tar.addfile(info)
        self.tar.members.clear()  # (a streaming tar has no use for them: memory stays flat)

    def _pad(self, size: int):
        blocks, remainder = divmod(size, tarfile.BLOCKSIZE)
        if remainder:
            self.tar.fileobj.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
            blocks += 1
        self.tar.offset += blocks * tarfile.BLOCKSIZE

    async def add(self, path: tuple, node: Node):
        try:
            await self._add(path, node)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self):
        """After an error: the stream ends where it is (no tar trailer claims it whole)."""
        self.tar.closed = self.tar.fileobj.closed = True

    async def _add(self, path: tuple, node: Node):
        link_to = None
        if node.type == "file" and node.links > 1:
            key = (node.dev, node.inode)
            link_to = self._links.get(key)
            if link_to is None:
                self._links[key] = path
        info = tar_info(path, node, link_to)
        self.entries += 1
        if info.type == tarfile.REGTYPE and (node.size > SMALL_FILE or node.content_lists):
            await self._flush()
            while self._queue:
                await self._write_oldest()
            await deferToThread(self._header, info)
            checked = _Checked()
            async for data in file_chunks(self.repository, node):
                await deferToThread(checked.write, self.tar.fileobj, data)
            checked.check(path, node)
            await deferToThread(self._pad, checked.size)
            return
        self._batch.append((path, node, info))
        if info.type == tarfile.REGTYPE:
            self._batch_bytes += node.size
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_ENTRIES:
            await self._flush()

    async def _flush(self):
        """Start fetching the gathered batch's chunks; write the oldest while too many wait."""
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._queue.append((batch, defer.ensureDeferred(self._fetch(batch))))
        while len(self._queue) > BATCHES_AHEAD:
            await self._write_oldest()

    async def _fetch(self, batch: list) -> tuple:
        """``(chunks by hex id, None)`` or ``(None, error)``: an abandoned fetch logs nothing."""
        try:
            ids = list(dict.fromkeys(c.hex() for _, node, info in batch
                                     if info.type == tarfile.REGTYPE for c in node.content))
            if not ids:
                return {}, None
            located = await self.repository.locate(ids)
            return await self.repository.fetch_many(
                Kind.DATA, {i: located.get(i, []) for i in ids}), None
        except Exception as e:
            return None, e

    async def _write_oldest(self):
        batch, fetching = self._queue.popleft()
        fetched, error = await fetching
        if error is not None:
            raise error
        await deferToThread(self._write_batch, batch, fetched)

    def _write_batch(self, batch: list, fetched: dict):
        """In a thread: each entry's header and, for a file, its bytes, checked."""
        for path, node, info in batch:
            self._header(info)
            if info.type != tarfile.REGTYPE:
                continue
            checked = _Checked()
            for chunk_id in node.content:
                data = fetched[chunk_id.hex()]
                if isinstance(data, Exception):
                    raise data
                checked.write(self.tar.fileobj, data)
            checked.check(path, node)
            self._pad(checked.size)

    async def close(self):
        try:
            await self._flush()
            while self._queue:
                await self._write_oldest()
        except BaseException:
            self._abandon()
            raise
        await deferToThread(self.tar.close)


async def cmd_dump(session, args) -> int:
    if sys.stdout.isatty():  # (as restic: bytes on a terminal help no one)
        raise ClientError("dump writes binary data: redirect its output to a file or a pipe")
    repository = Repository(session)
    summary = await repository.resolve(args.snapshot)
    snapshot = await repository.load_snapshot(summary.snapshot_id)
    names = parse_path(args.path)
    node = None
    if names:
        node = await repository.find(snapshot.tree, b"/".join(names))
        if node is None:
            raise ClientError(f"{args.path}: not in snapshot {summary.snapshot_id[:8]}")
    out = sys.stdout.buffer
    if node is not None and node.type == "file":
        await dump_file(repository, names, node, out)
        return 0
    tar = TarDump(repository, out)
    if node is not None:
        await tar.add(names, node)
    if node is None or node.type == "dir":
        async for path, entry in walk(TreeLoader(repository), node.subtree if node else snapshot.tree,
                                      names):
            await tar.add(path, entry)
    await tar.close()
    await deferToThread(out.flush)
    return 0
