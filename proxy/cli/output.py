"""Where a command writes its output (``--output FILE`` or stdout), the one place that
opens it for ``report`` and ``export``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Sequence

from proxy.errors import UsageError


def open_output(path: str | None, fmt: str, inputs: Sequence[Path] = ()) -> tuple[IO[str], bool]:
    """The stream to write to, and whether to close it after. Opening for writing
    truncates, so an output that is one of the logs being read (``--output
    logs/cost-tracking.jsonl``) is refused before anything is lost."""
    if not path or path == "-":
        return sys.stdout, False
    target = Path(path).resolve()
    for log in inputs:
        try:
            same = os.path.samefile(path, log)
        except OSError:  # the output does not exist yet
            same = False
        if same:
            raise UsageError(f"--output: {path} is a log this command reads; writing it would erase it (name another file)")
        # cost-tracking.jsonl.1, -20261101.gz: readers take such a file for a rotated part
        # of the log, and would count its records twice.
        here = log.resolve()
        sibling = target.name.startswith(here.name) and target.name[len(here.name) : len(here.name) + 1] in (".", "-")
        if sibling and target.parent == here.parent:
            raise UsageError(f"--output: {path} would be read as a rotated part of {log}, counting its calls twice (name another file)")
    try:
        # newline="" lets the csv module write its own \r\n, which spreadsheets expect.
        return open(path, "w", encoding="utf-8", newline="" if fmt == "csv" else None), True
    except OSError as e:
        raise UsageError(f"--output: cannot write {path}: {e.strerror or e}") from None
