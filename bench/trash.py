"""Deleting what a step leaves without slowing the steps that follow.

On ext4 without a journal (this bench machine's root file system), a new inode
is not taken from those freed less than 60 s ago, or 360 s while their inode
table block is dirty: each file created scans past them (the kernel's
``recently_deleted``). Measured here: restic restored the 50,000-file tree in
5.16 s, and in 6.85 s (sys 4.04 s instead of 1.77) right after 53,000 files had
been deleted. A tool measured just after another one's repository was deleted
paid for it.

So the bench moves what it would delete into ``bench_work/trash/`` (a rename
frees nothing) and empties it between rounds, then, on such a file system
only, waits out the kernel's window before the next round. It empties it
earlier only when the disk runs short, and says so.
"""

import glob
import os
import shutil
import time

#: Seconds a freed inode counts as recently deleted at most (60 s, plus 300 s while dirty).
RECENT_SECONDS = 360
#: Fewer inodes freed than this slow nothing worth waiting for (a few logs).
MANY = 10_000
#: Below this much free space, the trash is emptied before the next step.
LOW_SPACE = 16 * 1024**3


class Trash:
    def __init__(self, folder: str):
        self.folder = folder
        self._count = 0
        #: When the last emptying ended (monotonic), until the next wait.
        self._emptied_at: float | None = None

    def discard(self, path: str):
        """Move ``path`` (if it is there) into the trash, to be deleted when it is emptied."""
        if not os.path.lexists(path):
            return
        os.makedirs(self.folder, exist_ok=True)
        self._count += 1
        os.rename(path, os.path.join(self.folder, f"{self._count}-{os.path.basename(path)}"))

    def empty(self):
        """Delete what the trash holds (the next steps should ``settle`` first)."""
        if not os.path.lexists(self.folder):
            return
        freed = sum(len(folders) + len(files) for _, folders, files in os.walk(self.folder))
        shutil.rmtree(self.folder)
        os.sync()
        if freed >= MANY:
            self._emptied_at = time.monotonic()

    def settle(self):
        """Wait until what the last emptying freed no longer slows new files."""
        if self._emptied_at is None or not _ext4_without_journal(self.folder):
            return
        left = RECENT_SECONDS - (time.monotonic() - self._emptied_at)
        if left > 0:
            print(f"waiting {left:.0f} s: inodes freed by emptying the trash slow new files on this "
                  f"file system for {RECENT_SECONDS} s (bench/trash.py)", flush=True)
            time.sleep(left)
        self._emptied_at = None

    def make_room(self):
        """Empty the trash now if the disk runs short (and wait: see ``settle``)."""
        if os.path.lexists(self.folder) and shutil.disk_usage(self.folder).free < LOW_SPACE:
            print("the disk runs short: emptying the trash in the middle of a round", flush=True)
            self.empty()
            self.settle()


def _ext4_without_journal(folder: str) -> bool:
    """Whether freed inodes slow new files in ``folder``'s file system (asked of its parent:
    an emptied trash is gone)."""
    st = os.stat(os.path.dirname(folder))
    device = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
    return os.path.isdir(f"/proc/fs/ext4/{device}") and not glob.glob(f"/proc/fs/jbd2/{device}-*")
