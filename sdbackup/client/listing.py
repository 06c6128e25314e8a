"""How ``sdbackup ls`` shows an entry of a snapshot: pure formatting, no I/O.

Names are escaped (``sdbackup.names.escape``) so that any name, with a
newline or bytes that are not UTF-8, shows on one line and can be typed back.
A folder ends with ``/``, a link shows ``-> target``; the long form adds what
``ls -l`` shows: type and mode (with s/S/t/T), owner, group, size and mtime.
"""

import datetime
import os
import stat

from sdbackup.names import escape
from sdbackup.objects import Node
from sdbackup.paths import display_path

_TYPE_BITS = {
    "file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK,
}


def mode_string(node: Node) -> str:
    """``drwxr-xr-x``, ``-rwsr-xr-x``, ``drwxrwxrwt``... as ``ls -l`` shows them."""
    return stat.filemode(_TYPE_BITS[node.type] | stat.S_IMODE(node.mode))


def name_part(path: tuple, node: Node) -> str:
    """The path as text, ``/`` after a folder, ``-> target`` after a link."""
    text = display_path(path) or "/"
    if node.type == "dir":
        return text if text.endswith("/") else text + "/"
    if node.type == "symlink":
        return f"{text} -> {escape(node.target)}"
    return text


def timestamp(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def long_line(path: tuple, node: Node) -> str:
    """``mode user group size mtime path``; a device shows ``major,minor`` for its size."""
    user = node.user or str(node.uid)
    group = node.group or str(node.gid)
    if node.type in ("chardev", "blockdev"):
        size = f"{os.major(node.rdev)},{os.minor(node.rdev)}"
    else:
        size = str(node.size)
    return (f"{mode_string(node)} {user:<8} {group:<8} {size:>12} {timestamp(node.mtime_ns)}  "
            f"{name_part(path, node)}")


def entry_line(path: tuple, node: Node, long: bool = False) -> str:
    return long_line(path, node) if long else name_part(path, node)
