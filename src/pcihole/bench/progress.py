"""A plain-text progress bar on stderr (no dependency): redrawn in place on a terminal, a line per
tenth of the work otherwise (so a log or a captured test output stays short)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.start = time.monotonic()
        self._last_tenth = -1

    def step(self, what: str, n: int = 1) -> None:
        """Count `n` units of work done; `what` says what is being measured now."""
        self.done = min(self.total, self.done + n)
        self._draw(what)

    def note(self, what: str) -> None:
        """Say what is being measured without counting work."""
        self._draw(what)

    def _draw(self, what: str) -> None:
        fraction = self.done / self.total
        filled = int(BAR_WIDTH * fraction)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"pcihole bench [{bar}] {fraction:4.0%} {time.monotonic() - self.start:5.0f}s  {what}"
        if self.interactive:
            width = 120
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
            return
        tenth = int(fraction * 10)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(line + "\n")
            self.stream.flush()

    def abandon(self) -> None:
        """End the bar where it is (the bench stopped): on a terminal, the next line starts clean."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def finish(self, what: str = "done") -> None:
        self.done = self.total
        self._last_tenth = -1
        self._draw(what)
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
