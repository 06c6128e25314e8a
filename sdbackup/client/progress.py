"""A one-line progress bar on a terminal; silent elsewhere.

With totals (a restore knows them) it draws a bar; without (a backup walks
as it goes and never counts ahead) it shows what is done and how fast.
"""

import sys
import time


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    def __init__(self, total_bytes: int = 0, total_files: int = 0, stream=None, enabled=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.bytes = 0
        self.files = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_width = 0

    def advance(self, size: int = 0, files: int = 0):
        self.bytes += size
        self.files += files
        now = time.monotonic()
        if self.enabled and now - self._last_draw > 0.1:
            self._last_draw = now
            self.draw(now)

    def draw(self, now: float):
        rate = self.bytes / max(now - self.started, 1e-6)
        if not self.total_bytes and not self.total_files:
            line = f"\r{human_bytes(self.bytes)} {human_bytes(rate)}/s files {self.files}"
            self.stream.write(line.ljust(self._last_width))
            self._last_width = len(line)
            self.stream.flush()
            return
        fraction = self.bytes / self.total_bytes if self.total_bytes else 1.0
        width = 30
        filled = int(width * min(fraction, 1.0))
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} "
            f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} "
            f"{human_bytes(rate)}/s files {self.files}/{self.total_files}"
        )
        self.stream.write(line)
        self.stream.flush()

    def finish(self):
        if self.enabled:
            self.draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
