"""Backing up: one snapshot of some paths, as a pipeline of small stages.

    walk (walk.py)  ->  tree builder (archiver.py)  ->  chunker (chunking.py)
        ->  packer and store (uploader.py)

``Backup`` only wires them: it picks the parent snapshot (like restic: the
latest one of this host with the same set of paths, or the one asked for;
none with ``force``), runs the tree builder until the root tree is stored,
then stores the snapshot object and asks the manager to commit it. Each
stage says in its module what it owns.
"""

import os
import pwd
import socket
import time

import attrs
from twisted.logger import Logger

from sdbackup import hashing, objects
from sdbackup.client.archiver import Archiver
from sdbackup.client.parenttrees import ParentTrees
from sdbackup.client.progress import Progress
from sdbackup.client.repository import Repository
from sdbackup.client.selection import BackupSelection
from sdbackup.client.session import ClientError, Session
from sdbackup.client.uploader import HeldCheck, Signal, Uploader
from sdbackup.client.walk import Report, Walker, plan
from sdbackup.limits import snapshot_problem
from sdbackup.memory import tune_malloc
from sdbackup.names import escape
from sdbackup.objects import Kind
from sdbackup.protocols.messages import CommitSnapshot, SnapshotSummary


@attrs.define
class BackupResult:
    snapshot_id: str
    files: int  # every entry but folders
    dirs: int
    bytes: int  # in regular files
    new_bytes: int  # file data the cluster did not hold before
    warnings: list  # the backup is incomplete (the command exits 3)
    unchanged: int = 0  # files taken from the parent snapshot, not read again
    parent: str = ""  # the parent snapshot's id, "" when there was none
    notes: list = attrs.Factory(list)  # worth telling, not a problem (a socket skipped)

    @property
    def entries(self) -> int:
        return self.files + self.dirs


class Backup:
    log = Logger()

    def __init__(self, session: Session, paths: list[str], progress: Progress | None = None,
                 parent: str | None = None, force: bool = False, tags: tuple = (),
                 host: str | None = None, selection: BackupSelection | None = None, listed=None):
        self.session = session
        #: ``--verbose``: called with ``("new" | "modified", path)`` for each file read.
        self.listed = listed
        self.paths = paths
        self.progress = progress
        self.parent = parent
        self.force = force
        self.tags = tuple(tags)
        self.host = host or socket.gethostname()
        self.selection = selection
        self.report = Report()

    async def run(self) -> BackupResult:
        started = time.time_ns()
        trim = tune_malloc()
        walk_plan = plan(self.paths)
        problem = snapshot_problem(self.host, [escape(p) for p in walk_plan.paths], list(self.tags))
        if problem:  # the manager would refuse the snapshot: say so before storing anything
            raise ClientError(f"cannot back up: the snapshot's {problem}")
        repository = Repository(self.session)
        parent = None if self.force else await self._parent(repository, walk_plan.paths)
        parent_root, parents = b"", None
        if parent is not None:
            parent_root = bytes.fromhex(parent.tree)
            parents = ParentTrees(repository, self.report)
        signal = Signal()
        uploader = Uploader(self.session, signal, self.report.warn, after_batch=trim)
        archiver = Archiver(Walker(walk_plan, self.report, selection=self.selection), uploader,
                            HeldCheck(self.session, uploader, signal), parents, self.report,
                            self.progress, reactor=self.session.reactor, sealer=self.session.sealer,
                            listed=self.listed)
        root = await archiver.run(parent_root)
        stats = archiver.stats
        snapshot = objects.Snapshot(
            time_ns=started, host=self.host, paths=walk_plan.paths, tree=root, tags=self.tags,
            parent=bytes.fromhex(parent.snapshot_id) if parent is not None else b"",
            user=_user(), summary={"files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
                                   "new_bytes": uploader.new_bytes, "unchanged": stats.unchanged})
        data = self.session.sealer.seal(Kind.SNAPSHOT, objects.encode_snapshot(snapshot))
        snapshot_id = objects.object_id(Kind.SNAPSHOT, data)
        await uploader.store_now(Kind.SNAPSHOT, bytes.fromhex(snapshot_id), data,
                                 hashing.checksum(data))
        committed = await self.session.ask(CommitSnapshot(snapshot_id=snapshot_id))
        self.log.info("snapshot {snapshot} saved: {files} files, {dirs} folders, {unchanged} "
                      "unchanged", snapshot=snapshot_id[:16], files=stats.files, dirs=stats.dirs,
                      unchanged=stats.unchanged)
        return BackupResult(committed.snapshot.snapshot_id, stats.files, stats.dirs, stats.bytes,
                            uploader.new_bytes, self.report.warnings, stats.unchanged,
                            parent.snapshot_id if parent is not None else "", self.report.notes)

    async def _parent(self, repository: Repository, paths: tuple) -> SnapshotSummary | None:
        """The snapshot asked for, else the latest of this host with the same set of paths."""
        if self.parent:
            return await repository.resolve(self.parent)
        wanted = {escape(p) for p in paths}
        for summary in reversed(await repository.snapshots()):
            if summary.host == self.host and set(summary.paths) == wanted:
                return summary
        return None




def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return ""

