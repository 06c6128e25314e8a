"""Names as bytes, shown as text: a lossless escape for listings and messages.

A Linux name is any bytes but ``/`` and NUL. ``escape`` turns a name into
printable text (valid UTF-8 stays as it is; a backslash, a control character
or a byte that is not UTF-8 becomes a backslash escape), and ``unescape``
gives back exactly the same bytes, so an escaped name can travel in JSON and
be typed on a command line.
"""

import re

_SIMPLE = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_ESCAPE = re.compile(r"\\(\\|n|t|r|x[0-9a-fA-F]{2})")
_BACK = {"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}


def escape(name: bytes) -> str:
    """Printable, lossless text for ``name``."""
    text = name.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _SIMPLE:
            out.append(_SIMPLE[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():
            # Controls (C0, C1), line and paragraph separators...: their UTF-8 bytes, escaped,
            # so a listing stays one line a name and a terminal acts on none of them.
            out.extend(f"\\x{byte:02x}" for byte in ch.encode())
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> bytes:
    """The bytes ``escape`` was given."""
    if "\\" not in text:
        return text.encode("utf-8", "surrogateescape")
    parts, last = [], 0
    for m in _ESCAPE.finditer(text):
        parts.append(text[last : m.start()].encode("utf-8", "surrogateescape"))
        code = m.group(1)
        parts.append(bytes([int(code[1:], 16)]) if code[0] == "x" else _BACK[code])
        last = m.end()
    parts.append(text[last:].encode("utf-8", "surrogateescape"))
    return b"".join(parts)
