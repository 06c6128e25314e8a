"""Path rules that keep data where it belongs. Pure functions, no I/O but ``realpath``."""

import os
import posixpath


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


def check_snapshot_path(path: str) -> str:
    """Refuse a snapshot path that could escape a restore target."""
    if not path or "\x00" in path:
        raise UnsafePath(f"empty or NUL in path {path!r}")
    if path.startswith("/") or "\\" in path:
        raise UnsafePath(f"absolute or backslashed path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"path {path!r} has an empty, '.' or '..' component")
    return path


class TargetFolder:
    """Where the paths of a snapshot land under a restore's target, never outside it.

    Each name is checked, then that the folder it will be written in resolves
    (following any links already on disk) inside the target. A folder found
    safe is remembered for the rest of the restore, which creates links last.
    """

    def __init__(self, target: str):
        self.target = target
        self.root = os.path.realpath(target)
        self._inside = self.root.rstrip(os.sep) + os.sep
        self._safe = {self.root}

    def path_for(self, path: str) -> str:
        check_snapshot_path(path)
        destination = os.path.join(self.root, *path.split("/"))
        parent = os.path.dirname(destination)
        if parent not in self._safe:
            real = os.path.realpath(parent)
            if real != self.root and not real.startswith(self._inside):
                raise UnsafePath(f"{path!r} would be written outside {self.target} (through a link)")
            self._safe.add(parent)
        return destination


def target_path(target: str, path: str) -> str:
    """Where ``path`` of a snapshot lands under ``target``, never outside it."""
    return TargetFolder(target).path_for(path)


def path_in_include(path: str, includes: list[str]) -> bool:
    """True when ``path`` is one of ``includes`` or inside one, or a folder above one."""
    if not includes:
        return True
    for include in includes:
        include = include.strip("/")
        if path == include or path.startswith(include + "/") or include.startswith(path + "/"):
            return True
    return False
