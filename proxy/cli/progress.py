"""A progress bar on stderr for long reads (a report or a reprice over a big log):
one line redrawn in place while stderr is a terminal, nothing when it is not (a pipe,
a file, cron), so scripts and mail never see it."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO

_WIDTH = 24
_INTERVAL = 0.1  # seconds between redraws; the first and the last are always drawn
_MIB = 1 << 20


class ProgressLine:
    """Call it with (bytes done, bytes in all; 0 when unknown). The line is erased when
    the work is done, before the report is written, and on leaving the ``with`` block."""

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.drawn = False
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = bool(total) and done >= total
        if self.drawn and not finished and now - self.last < _INTERVAL:
            return
        self.last = now
        if total:
            pct = min(100, done * 100 // total)
            filled = pct * _WIDTH // 100
            text = f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {pct:3d}%  {done / _MIB:,.0f}/{total / _MIB:,.0f} MiB"
        else:
            text = f"{self.label} {done / _MIB:,.0f} MiB"
        self.stream.write("\r" + text + "\x1b[K")
        self.drawn = True
        if finished:
            self.clear()
        else:
            self.stream.flush()

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.clear()
