"""What a restore does with an entry already at a restored path: ``--overwrite``, pure.

restic's four modes, with if-changed kept simple and documented: an existing
entry of the same type, size and modification time (to the nanosecond, as a
restore sets it) is taken to be the snapshot's own and left as it is. Nothing
reads its content to compare: a file changed without its size or mtime moving
is not restored again (``--overwrite always`` is).
"""

import enum
import stat

from attrs import frozen

from sdbackup.objects import Node

#: The ``--overwrite`` choices, as typed.
MODES = ("always", "if-changed", "if-newer", "never")
DEFAULT_MODE = "if-changed"

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
          stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFSOCK: "socket"}


class Action(enum.Enum):
    #: Restore the entry (nothing there, or what is there is to be replaced).
    WRITE = "write"
    #: Same type, size and mtime: left as it is, counted unchanged.
    UNCHANGED = "unchanged"
    #: Something else is there and the mode says keep it (never, or if-newer with an older
    #: snapshot entry): left as it is, counted skipped.
    KEEP = "keep"


@frozen
class Existing:
    """What ``lstat`` says of an entry already in a restored folder (never followed)."""

    type: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st) -> "Existing":
        return cls(_TYPES.get(stat.S_IFMT(st.st_mode), "other"), st.st_size, st.st_mtime_ns)


def decide(mode: str, node: Node, existing: Existing | None) -> Action:
    """The action for the snapshot's ``node`` where ``existing`` is (None: nothing is)."""
    if existing is None:
        return Action.WRITE
    same = (existing.type == node.type and existing.mtime_ns == node.mtime_ns
            and (node.type not in ("file", "symlink") or existing.size == _size(node)))
    if mode == "always":
        return Action.WRITE
    if same:
        return Action.UNCHANGED
    if mode == "if-changed":
        return Action.WRITE
    if mode == "if-newer":
        return Action.WRITE if node.mtime_ns > existing.mtime_ns else Action.KEEP
    if mode == "never":
        return Action.KEEP
    raise ValueError(f"--overwrite {mode!r}: one of {', '.join(MODES)}")


def _size(node: Node) -> int:
    """The size ``lstat`` gives the restored entry: a link's is its target's length."""
    return len(node.target) if node.type == "symlink" else node.size
