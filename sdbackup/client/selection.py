"""Which paths a backup or a restore takes: restic's patterns, compiled once. Pure, no I/O.

A pattern is a path whose names may hold wildcards: ``*`` (any characters of one
name), ``?`` (one character), ``[abc]``, ``[a-z]``, ``[!abc]`` or ``[^abc]``, and a
name that is ``**`` alone stands for any number of folders (none included). As
in restic:

* a pattern matches a path when its names match a run of the path's names,
  and then it matches everything inside that path too (``node_modules``
  excludes every folder of that name and all they hold);
* a pattern that starts with ``/`` is anchored: its first name must be the
  path's first (``/home/me/tmp``); any other one matches at any depth
  (``*.o``, ``cache/*.bin``);
* ``!pattern`` (among the excludes) re-includes what an earlier pattern excluded;
  the last pattern that matches decides. What lies inside an excluded folder is
  never seen, so it cannot be re-included (restic's rule too).

A backslash escapes the next character (``\\*`` is a star) and reads the escapes
``ls`` shows for names that are not plain text (``\\\\``, ``\\n``, ``\\t``, ``\\r``,
``\\xff``), so any name, whatever its bytes, can be typed. Names are bytes on
Linux: paths and patterns are matched as text decoded with ``surrogateescape``
(``os.fsdecode``), so a byte that is not UTF-8 matches itself and nothing else.

Each pattern becomes one compiled regular expression, searched in the path
written ``/name/name/...``; with no ``!`` pattern all excludes are one expression,
so a folder of 50,000 entries costs 50,000 searches.

For a restore (``RestoreFilter``) paths are those of the snapshot as ``ls``
shows them (``/`` is the snapshot's root), and an ``--include`` without wildcards
names one path from the snapshot's root (``x``, ``./x``, ``/x`` and ``x/`` are the
same), as ``--include`` always did; its excludes follow the rules above.
"""

import os
import posixpath
import re

import attrs

#: The first bytes of a ``CACHEDIR.TAG`` file (https://bford.info/cachedir/).
CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"

_DOUBLE_STAR = "**"
_SIMPLE_ESCAPES = {"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}
_HEX = set("0123456789abcdefABCDEF")
_WILDCARDS = re.compile(r"(?<!\\)(?:\\\\)*[*?\[]")


class PatternError(ValueError):
    """A pattern that cannot be read (an unclosed ``[``, nothing but ``!``)."""


def _escape_at(text: str, i: int) -> tuple[bytes, int]:
    """The bytes the escape starting at ``text[i] == "\\"`` stands for, and the index after it."""
    if i + 1 >= len(text):
        raise PatternError("a pattern cannot end with a lone backslash")
    nxt = text[i + 1]
    if nxt in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[nxt], i + 2
    digits = text[i + 2 : i + 4]
    if nxt == "x" and len(digits) == 2 and set(digits) <= _HEX:
        return bytes([int(digits, 16)]), i + 4
    return nxt.encode("utf-8", "surrogateescape"), i + 2


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def name_regex(part: str) -> str:
    """A regular expression (text) for one name of a pattern; it never matches ``/``."""
    out: list[str] = []
    literal = bytearray()

    def flush():
        if literal:
            out.append(re.escape(_text(bytes(literal))))
            literal.clear()

    i = 0
    while i < len(part):
        ch = part[i]
        if ch == "\\":
            data, i = _escape_at(part, i)
            literal += data
            continue
        if ch == "*":
            flush()
            while i < len(part) and part[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if ch == "?":
            flush()
            out.append("[^/]")
            i += 1
            continue
        if ch == "[":
            flush()
            cls, i = _char_class(part, i)
            out.append(cls)
            continue
        literal += ch.encode("utf-8", "surrogateescape")
        i += 1
    flush()
    return "".join(out)


def _char_class(part: str, start: int) -> tuple[str, int]:
    """``[...]`` at ``part[start]`` as a regular expression, and the index after it."""
    i = start + 1
    negated = i < len(part) and part[i] in "!^"
    if negated:
        i += 1
    items: list[str] = []
    chars: list[str] = []  # the class's characters so far, to build ranges
    while True:
        if i >= len(part):
            raise PatternError(f"unclosed '[' in {part!r}")
        ch = part[i]
        if ch == "]" and chars:
            i += 1
            break
        if ch == "\\":
            data, i = _escape_at(part, i)
            ch = _text(data)
        else:
            i += 1
        if (ch == "-" and chars and i < len(part) and part[i] != "]" and items
                and items[-1] == re.escape(chars[-1])):
            high = part[i]
            if high == "\\":
                data, i = _escape_at(part, i)
                high = _text(data)
            else:
                i += 1
            low = chars[-1]
            if len(low) != 1 or len(high) != 1 or low > high:
                raise PatternError(f"bad range {low}-{high} in {part!r}")
            items[-1] = f"{re.escape(low)}-{re.escape(high)}"
            chars.append(high)
            continue
        for c in ch:
            chars.append(c)
            items.append(re.escape(c))
    return ("[^/" if negated else "[") + "".join(items) + "]", i


@attrs.frozen
class Pattern:
    """One compiled pattern; ``search`` it in a path written ``/a/b/c``."""

    text: str
    negated: bool
    anchored: bool
    ignore_case: bool
    #: Each name of the pattern: a compiled expression, or None for ``**``.
    names: tuple
    regex: re.Pattern
    #: ``regex`` without its end: the pattern's names, and what they start with.
    body: str

    def matches(self, path: str) -> bool:
        return self.regex.search(path) is not None

    def may_match_inside(self, names: list[str]) -> bool:
        """True when something inside the folder ``names`` (the names of its path) could match."""
        if not self.anchored:
            return True
        for index, name in enumerate(names):
            if index >= len(self.names) or self.names[index] is None:
                return True
            if self.names[index].fullmatch(name) is None:
                return False
        return True


def compile_pattern(text: str, ignore_case: bool = False, plain_anchored: bool = False) -> Pattern:
    """``text`` as a ``Pattern``. ``plain_anchored``: a pattern without wildcards is anchored
    (a restore's paths); ``./`` at its start anchors it too."""
    negated = text.startswith("!")
    body = text[1:] if negated else text
    if not body.strip():
        raise PatternError(f"empty pattern {text!r}")
    anchored = body.startswith(("/", "./")) or (plain_anchored and not _WILDCARDS.search(body))
    parts = [p for p in posixpath.normpath("/" + body).split("/") if p]
    # ``**`` first is "at any depth", which a pattern is without ``/`` first; ``**`` last adds
    # nothing, since a pattern matches what is inside what it matches.
    while parts and parts[0] == _DOUBLE_STAR:
        parts.pop(0)
        anchored = False
    while parts and parts[-1] == _DOUBLE_STAR:
        parts.pop()
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    names, pieces = [], []
    for part in parts:
        if part == _DOUBLE_STAR:
            if names and names[-1] is None:
                continue  # **/** is **
            names.append(None)
            pieces.append("(?:/.*)?")  # any folders, none included
            continue
        piece = name_regex(part)
        names.append(re.compile(piece, flags))
        pieces.append("/" + piece)
    body = ("\\A" if anchored else "") + "".join(pieces)
    return Pattern(text, negated, anchored, ignore_case, tuple(names),
                   re.compile(body + "(?=/|\\Z)", flags), body)


def path_text(names) -> str:
    """A path (names as bytes) as patterns see it: ``/a/b``, decoded as ``os.fsdecode`` does
    (the root is ``""``: only ``/`` matches it)."""
    return _text(b"/" + b"/".join(names)) if names else ""


def _any_of(sources: list[tuple[str, bool]], end: str) -> re.Pattern | None:
    """One expression for several ``(source, ignore_case)``, each followed by ``end``."""
    if not sources:
        return None
    return re.compile("|".join(f"(?{'i' if ignore_case else ''}:{source}{end})"
                               for source, ignore_case in sources), re.DOTALL)


class Excludes:
    """Backup excludes (``--exclude``, ``--iexclude`` and files of them), in order.

    ``excluded(path)`` takes an absolute path as text (``os.fsdecode``); the walk asks
    ``excluded_in(folder, name)`` of each entry of a folder it took."""

    def __init__(self, patterns: list[Pattern]):
        self.patterns = list(patterns)
        self._negations = any(p.negated for p in self.patterns)
        self._combined = self._names = self._tails = None
        if self.patterns and not self._negations:
            self._combined = _any_of([(p.body, p.ignore_case) for p in self.patterns], "(?=/|\\Z)")
            # In a folder that is not excluded, a match must end at the entry's own name: a
            # pattern of one name (``*.o``) is matched against that name alone.
            one_name = [p for p in self.patterns if not p.anchored and len(p.names) == 1
                        and p.names[0] is not None]
            self._names = _any_of([(p.names[0].pattern, p.ignore_case) for p in one_name], "")
            one_name_ids = {id(p) for p in one_name}
            others = [p for p in self.patterns if id(p) not in one_name_ids]
            self._tails = _any_of([(p.body, p.ignore_case) for p in others], "\\Z")

    def __bool__(self):
        return bool(self.patterns)

    def excluded_in(self, folder: str, name: str) -> bool:
        """``excluded(folder + "/" + name)`` for an entry of a folder that is not excluded."""
        if self._negations:
            return self.excluded(f"{folder}/{name}")
        if self._names is not None and self._names.fullmatch(name) is not None:
            return True
        return self._tails is not None and self._tails.search(f"{folder}/{name}") is not None

    def excluded(self, path: str) -> bool:
        if self._combined is not None:
            return self._combined.search(path) is not None
        matched = False
        for pattern in self.patterns:
            if pattern.negated:
                if matched and pattern.matches(path):
                    matched = False
            elif not matched and pattern.matches(path):
                matched = True
        return matched


def compile_excludes(patterns=(), ipatterns=()) -> Excludes:
    """``--exclude`` then ``--iexclude`` patterns (a PatternError says which is wrong)."""
    return Excludes([compile_pattern(p) for p in patterns]
                    + [compile_pattern(p, ignore_case=True) for p in ipatterns])


def tag_file(text: str) -> tuple[bytes, bytes]:
    """``--exclude-if-present NAME[:HEADER]`` as ``(name, header)`` (bytes, as in a folder)."""
    name, _, header = text.partition(":")
    if not name or "/" in name:
        raise PatternError(f"--exclude-if-present {text!r}: give a file name (and :HEADER)")
    return os.fsencode(name), os.fsencode(header)


@attrs.frozen
class BackupSelection:
    """What a backup leaves out, besides what it is not given."""

    excludes: Excludes = attrs.Factory(lambda: Excludes([]))
    #: ``(name, header)``: a folder holding a file ``name`` that begins with ``header`` (any
    #: entry ``name`` if empty) is kept with that file alone (``--exclude-if-present``,
    #: ``--exclude-caches``).
    tag_files: tuple = ()
    #: Mount points inside the backed-up paths are kept empty (``--one-file-system``).
    one_file_system: bool = False


# --- files of patterns and of paths ----------------------------------------------------------


def expand(text: str, environ=None) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the variable (empty when unset, as restic's
    ``os.ExpandEnv``), ``$$`` by ``$``, and ``~`` or ``~user`` at the start expanded."""
    environ = os.environ if environ is None else environ

    def variable(m):
        if m.group(0) == "$$":
            return "$"
        return environ.get(m.group(1) or m.group(2), "")

    text = re.sub(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", variable, text)
    negated = text.startswith("!")
    body = text[1:] if negated else text
    if body.startswith("~"):
        body = os.path.expanduser(body)
    return ("!" if negated else "") + body


def pattern_lines(data: bytes, environ=None) -> list[str]:
    """The patterns of an exclude file: one a line, blank lines and ``#`` comments left out,
    spaces around a pattern removed, variables and ``~`` expanded."""
    patterns = []
    for raw in data.split(b"\n"):
        line = _text(raw).strip()
        if line and not line.startswith("#"):
            patterns.append(expand(line, environ))
    return patterns


def path_lines(data: bytes, verbatim: bool = False) -> list[str]:
    """The paths of a ``--files-from`` file (``verbatim``: every non-empty line as it is;
    else blank lines and ``#`` comments left out and spaces around a path removed)."""
    paths = []
    for raw in data.split(b"\n"):
        if verbatim:
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if raw:
                paths.append(_text(raw))
            continue
        line = _text(raw).strip()
        if line and not line.startswith("#"):
            paths.append(line)
    return paths


def raw_paths(data: bytes) -> list[str]:
    """The paths of a ``--files-from-raw`` file: separated by NUL bytes."""
    return [_text(p) for p in data.split(b"\0") if p]


def has_wildcards(text: str) -> bool:
    return _WILDCARDS.search(text) is not None


# --- a restore's selection --------------------------------------------------------------------


class RestoreFilter:
    """A restore's ``--include`` and ``--exclude`` patterns, over snapshot paths (names as
    bytes). With includes, an entry is restored when one matches it (or a folder holding
    it), and no exclude does; a folder is entered when something inside may be restored."""

    def __init__(self, includes=(), excludes=(), iincludes=(), iexcludes=()):
        self.includes = ([compile_pattern(p, plain_anchored=True) for p in includes]
                         + [compile_pattern(p, True, plain_anchored=True) for p in iincludes])
        self.excludes = compile_excludes(excludes, iexcludes)
        for pattern in self.includes:
            if pattern.negated:
                raise PatternError(f"--include {pattern.text!r}: '!' is for excludes")

    def __bool__(self):
        return bool(self.includes or self.excludes)

    def selects(self, names: tuple) -> bool:
        """True when the entry at ``names`` is restored (and, for a folder, what it holds)."""
        text = path_text(names)
        if self.excludes and self.excludes.excluded(text):
            return False
        return not self.includes or any(p.matches(text) for p in self.includes)

    def wants(self, names: tuple, is_folder: bool) -> bool:
        """True when the walk keeps the entry: selected, or a folder that may hold one."""
        text = path_text(names)
        if self.excludes and self.excludes.excluded(text):
            return False
        if not self.includes or any(p.matches(text) for p in self.includes):
            return True
        if not is_folder:
            return False
        decoded = [_text(name) for name in names]
        return any(p.may_match_inside(decoded) for p in self.includes)

    def includes_matching(self, names: tuple, among) -> set:
        """The indexes (of ``among``) of the includes that match ``names``."""
        text = path_text(names)
        return {i for i in among if self.includes[i].matches(text)}


# --- from the command line: the files its options name are read here, before any connection ---


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PatternError(f"{option} {path}: {e.strerror}") from None


def backup_selection(args) -> BackupSelection:
    """``sdbackup backup``'s selection options as a ``BackupSelection`` (PatternError: a usage
    error, such as a pattern that cannot be read or a file of them that cannot)."""
    excludes = list(args.exclude)
    iexcludes = list(args.iexclude)
    for path in args.exclude_file:
        excludes.extend(pattern_lines(_read("--exclude-file", path)))
    for path in args.iexclude_file:
        iexcludes.extend(pattern_lines(_read("--iexclude-file", path)))
    tags = [tag_file(text) for text in args.exclude_if_present]
    if args.exclude_caches:
        tags.append((os.fsencode(CACHEDIR_TAG), CACHEDIR_SIGNATURE))
    return BackupSelection(compile_excludes(excludes, iexcludes), tuple(dict.fromkeys(tags)),
                           args.one_file_system)


def files_from(args, glob_paths) -> list[str]:
    """The paths that ``--files-from`` (globs expanded by ``glob_paths(pattern)``),
    ``--files-from-verbatim`` and ``--files-from-raw`` name, in order.

    A glob that matches nothing is a PatternError: the user's list names nothing there."""
    paths = []
    for path in args.files_from:
        for line in path_lines(_read("--files-from", path)):
            if not has_wildcards(line):
                paths.append(line)
                continue
            found = sorted(glob_paths(line))
            if not found:
                raise PatternError(f"--files-from {path}: {line!r} matches no file")
            paths.extend(found)
    for path in args.files_from_verbatim:
        paths.extend(path_lines(_read("--files-from-verbatim", path), verbatim=True))
    for path in args.files_from_raw:
        paths.extend(raw_paths(_read("--files-from-raw", path)))
    return paths
