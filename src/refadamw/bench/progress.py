"""A progress bar on stderr for benchmark runs, with no dependency.

On a terminal it redraws one line at most every 0.2 s; elsewhere (CI logs,
pipes) it prints a single line per finished run, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class Progress:
    """``start(label, total)``, then ``update(done, loss)`` per step, then ``finish(summary)``."""

    def __init__(self, stream: TextIO | None = None, total_runs: int | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_runs, self.runs_done = total_runs, 0
        self.label, self.total, self._last = "", 0, 0.0

    def _prefix(self) -> str:
        count = f"{self.runs_done + 1}/{self.total_runs}" if self.total_runs else f"{self.runs_done + 1}"
        return f"[{count}] {self.label}"

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self._last = label, max(1, total), 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.monotonic()
        if not self.live or (now - self._last < 0.2 and done < self.total):
            return
        self._last = now
        filled = WIDTH * done // self.total
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r{self._prefix()} [{bar}] {done}/{self.total} loss {loss:.4g}\x1b[K")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        end = "\r" if self.live else ""
        self.stream.write(f"{end}{self._prefix()} {summary}\x1b[K\n" if self.live else f"{self._prefix()} {summary}\n")
        self.stream.flush()
        self.runs_done += 1
