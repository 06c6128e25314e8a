"""``sdbackup find PATTERN... [--snapshot ID]...``: which snapshots hold matching paths.

Patterns follow restic's: a pattern without ``/`` is matched against each entry's
name, one with ``/`` against its whole path from the snapshot's root (a leading
``/`` is implied); ``*``, ``?`` and ``[...]`` do not cross a ``/``, and ``**``
matches any number of folders. Names are bytes: a pattern is typed with the escapes
``ls`` shows (``\\xe9``).

Snapshots of one host share most of their trees, so a subtree found to hold no
match is remembered by its id (with its path, for a pattern with ``/``) and not
read again in the other snapshots: a find over many snapshots reads mostly the
folders that changed. The ids remembered are 32 bytes a folder; the matches stream
out as they are found.
"""

import datetime
import fnmatch
import sys

from sdbackup.client import jsonout
from sdbackup.client.diff import TreeLoader
from sdbackup.client.listing import long_line
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError
from sdbackup.names import unescape
from sdbackup.objects import Node


class Pattern:
    """One restic pattern, as bytes."""

    def __init__(self, text: str):
        raw = unescape(text)
        if not raw.strip(b"/"):
            raise ClientError(f"find: {text!r} is not a pattern")
        #: A pattern with ``/`` matches the whole path, so whether a subtree holds a match
        #: depends on where it is.
        self.by_path = b"/" in raw.strip(b"/") or raw.startswith(b"/")
        self.parts = [p for p in raw.split(b"/") if p]

    def matches(self, path: tuple) -> bool:
        if not self.by_path:
            return fnmatch.fnmatchcase(path[-1], self.parts[0])
        return _match_parts(self.parts, list(path))


def _match_parts(parts: list, names: list) -> bool:
    if not parts:
        return not names
    if parts[0] == b"**":
        return any(_match_parts(parts[1:], names[i:]) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and _match_parts(parts[1:], names[1:])


class Finder:
    """Walks snapshots for paths matching any of ``patterns``, skipping subtrees known to hold
    none."""

    def __init__(self, repository: Repository, patterns: list[Pattern]):
        self.loader = TreeLoader(repository)
        self.patterns = patterns
        self._by_path = any(p.by_path for p in patterns)
        self._empty: set = set()
        #: Trees read, and subtrees skipped because they were known to hold no match.
        self.trees_read = 0
        self.trees_skipped = 0

    def _key(self, tree_id: bytes, prefix: tuple):
        return (tree_id, prefix) if self._by_path else tree_id

    async def matches(self, tree_id: bytes, prefix: tuple = ()):
        """``(path, node)`` of every match under the tree ``tree_id``, depth first."""
        key = self._key(tree_id, prefix)
        if key in self._empty:
            self.trees_skipped += 1
            self.loader.discard(tree_id)
            return
        tree = await self.loader.load(tree_id)
        self.trees_read += 1
        self.loader.prefetch(n.subtree for n in tree.nodes
                             if n.type == "dir" and self._key(n.subtree, (*prefix, n.name))
                             not in self._empty)
        found = False
        for node in tree.nodes:
            path = (*prefix, node.name)
            if any(p.matches(path) for p in self.patterns):
                found = True
                yield path, node
            if node.type == "dir" and node.subtree:
                async for match in self.matches(node.subtree, path):
                    found = True
                    yield match
        if not found:
            self._empty.add(key)


def match_json(path: tuple, node: Node) -> dict:
    out = jsonout.node(path, node)
    for key in ("message_type", "struct_type"):
        out.pop(key)
    return out


async def cmd_find(session, args) -> int:
    patterns = [Pattern(text) for text in args.patterns]
    repository = Repository(session)
    if args.snapshot:
        chosen = {}
        for ref in args.snapshot:
            summary = await repository.resolve(ref)
            chosen[summary.snapshot_id] = summary
        snapshots = sorted(chosen.values(), key=lambda s: (s.time, s.snapshot_id))
    else:
        snapshots = await repository.snapshots()
    finder = Finder(repository, patterns)
    as_json = getattr(args, "json", False)
    out = sys.stdout
    results = []
    for summary in snapshots:
        tree = (await repository.load_snapshot(summary.snapshot_id)).tree
        hits = []
        async for path, node in finder.matches(tree):
            if as_json:
                hits.append(match_json(path, node))  # (restic's shape: a list per snapshot)
                continue
            if not hits:
                out.write(f"Found matching entries in snapshot {summary.snapshot_id[:8]} from "
                          f"{datetime.datetime.fromtimestamp(summary.time):%Y-%m-%d %H:%M:%S}\n")
            hits.append(None)
            out.write(long_line(path, node) + "\n")
        if as_json and hits:
            results.append({"matches": hits, "hits": len(hits), "snapshot": summary.snapshot_id})
        elif hits:
            out.write("\n")
    if as_json:
        out.write(jsonout.dumps(results) + "\n")
    return 0
