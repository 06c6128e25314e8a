"""Path rules that keep data where it belongs. Pure functions, no I/O.

Inside a snapshot a path is a tuple of names (bytes); on a command line and in
listings it is text, each name escaped with ``sdbackup.names.escape`` and
joined with ``/``. A restore creates every entry by one name at a time,
relative to the folder that holds it, so the only rule it needs from here is
which names are names at all.
"""

import os
import posixpath

from sdbackup.names import escape, unescape


class UnsafePath(Exception):
    code = "unsafe-path"


def snapshot_path(local_path: str, cwd: str | None = None) -> str:
    """How a local path is named inside a snapshot.

    A relative path without ``..`` keeps its name (``some/folder``); any other
    path is made absolute and stored without its leading slash, as tar does.
    """
    normalized = os.path.normpath(local_path)
    parts = normalized.split(os.sep)
    if not os.path.isabs(normalized) and ".." not in parts and normalized != ".":
        return posixpath.join(*parts)
    absolute = os.path.abspath(os.path.join(cwd or os.getcwd(), local_path))
    stripped = absolute.lstrip(os.sep)
    if not stripped:
        raise UnsafePath("the root folder cannot be named inside a snapshot")
    return posixpath.join(*stripped.split(os.sep))


def check_name(name: bytes) -> bytes:
    """``name`` if it names an entry of a folder: any bytes but ``/`` and NUL, not ``.`` or ``..``.

    A tree from a hostile cluster or client may carry anything; ``objects.Node``
    refuses such names already, and a restore checks again before it creates.
    """
    if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise UnsafePath(f"{name!r} is not a name a folder can hold")
    return name


def parse_path(text: str) -> tuple[bytes, ...]:
    """The names of a path typed as ``ls`` shows it (``a/b\\x ff/c``); ``()`` for the root.

    Slashes at either end and repeated ones are ignored; ``.`` and ``..`` are refused.
    """
    names = tuple(name for name in unescape(text).split(b"/") if name)
    for name in names:
        if name in (b".", b"..") or b"\0" in name:
            raise UnsafePath(f"{text!r}: a path in a snapshot has no '.', '..' or NUL")
    return names


def display_path(names: tuple[bytes, ...]) -> str:
    """Text for a path in a snapshot: each name escaped, joined with ``/``."""
    return "/".join(escape(name) for name in names)
