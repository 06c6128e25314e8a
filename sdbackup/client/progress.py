"""A one-line progress bar on a terminal; silent elsewhere.

With totals (a restore knows them) it draws a bar and an estimate of the time
left; without (a backup walks as it goes and never counts ahead) it shows what
is done and how fast. The line always fits the terminal's width, so a redraw
never wraps into a new line, and each redraw clears what the last one left.
"""

import shutil
import sys
import time

import attrs

#: Move to the start of the line; then erase from the cursor to its end.
_REDRAW, _CLEAR_TO_END = "\r", "\x1b[K"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@attrs.frozen
class Counts:
    """What a progress line reports at one moment."""

    bytes: int
    files: int
    elapsed: float
    total_bytes: int = 0
    total_files: int = 0
    current: str = ""


def progress_line(counts: Counts, width: int) -> str:
    """The line for ``counts``, at most ``width`` columns; the current file is cut first."""
    rate = counts.bytes / max(counts.elapsed, 1e-6)
    if counts.total_bytes or counts.total_files:
        fraction = min(counts.bytes / counts.total_bytes, 1.0) if counts.total_bytes else 1.0
        left = (counts.total_bytes - counts.bytes) / rate if rate > 0 else 0.0
        bar_width = 20
        filled = int(bar_width * fraction)
        facts = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] {fraction:4.0%} "
            f"{human_bytes(counts.bytes)}/{human_bytes(counts.total_bytes)} "
            f"{counts.files}/{counts.total_files} files "
            f"ETA {human_duration(left) if rate > 0 and fraction < 1 else '-'}"
        )
    else:
        facts = (f"{human_duration(counts.elapsed)} {human_bytes(counts.bytes)} "
                 f"{human_bytes(rate)}/s {counts.files} files")
    room = width - len(facts) - 1
    if counts.current and room > 8:
        current = counts.current if len(counts.current) <= room else "…" + counts.current[-(room - 1):]
        facts = f"{facts} {current}"
    return facts[:width]


class Progress:
    def __init__(self, total_bytes: int = 0, total_files: int = 0, stream=None, enabled=None,
                 width: int | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.bytes = 0
        self.files = 0
        self.current = ""
        self.started = time.monotonic()
        self._width = width
        self._last_draw = 0.0

    def advance(self, size: int = 0, files: int = 0, current: str = ""):
        self.bytes += size
        self.files += files
        if current:
            self.current = current
        now = time.monotonic()
        if self.enabled and now - self._last_draw > 0.1:
            self._last_draw = now
            self.draw(now)

    def counts(self, now: float) -> Counts:
        return Counts(self.bytes, self.files, now - self.started, self.total_bytes, self.total_files,
                      self.current)

    def draw(self, now: float):
        # One column short of the width: a line filling the last column wraps on some terminals.
        width = (self._width or shutil.get_terminal_size().columns) - 1
        self.stream.write(_REDRAW + progress_line(self.counts(now), width) + _CLEAR_TO_END)
        self.stream.flush()

    def clear(self):
        """Erase the line, so that a line printed next (``--verbose``) does not run into the
        bar; the next redraw brings it back."""
        if self.enabled:
            self.stream.write(_REDRAW + _CLEAR_TO_END)
            self.stream.flush()

    def finish(self):
        """Leave the final figures on their own line, so what follows starts on a fresh one."""
        if self.enabled:
            self.current = ""
            self.draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def interrupted(self):
        """End the line after an interruption, keeping the figures reached."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
