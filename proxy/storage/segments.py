"""The roll-up index's segments (storage/index.py): each one's roll-up cells built from
the log's bytes (``build_segment``, ``build_run``), and the CRC-32 each is checked by
(``crc_range``)."""

from __future__ import annotations

import bisect
import gc
import gzip
import mmap
import os
import zlib
from itertools import accumulate as running_sum
from pathlib import Path
from typing import Any, Iterator, Sequence

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, accumulate
from proxy.engine.rollup import index_plan, primed_from, roll_up
from proxy.storage.logfiles import open_log
from proxy.storage.tasks import DEDUPE_OVERLAP, lines_in_range, primed


def _crc(data: Any, crc: int = 0) -> int:
    return zlib.crc32(data, crc)


def _digest(crc: int) -> str:
    return f"{crc:08x}"


def crc_range(path: str, a: int, b: int) -> tuple[str, bool]:
    """CRC-32 of bytes [a, b) and whether they are whole lines (preceded and ended by \\n)."""
    crc = 0
    with open(path, "rb") as f:
        whole = True
        if a:
            f.seek(a - 1)
            whole = f.read(1) == b"\n"
        left = b - a
        last = b""
        while left > 0:
            block = f.read(min(left, 8 << 20))
            if not block:
                return "", False
            crc = _crc(block, crc)
            left -= len(block)
            last = block
    return _digest(crc), whole and last.endswith(b"\n")


def _segment(start: int, end: int, crc: int, res: ScanResult, complete: bool) -> dict[str, Any]:
    cells = [[*k, *row, *res.spans[k]] for k, row in res.cells.items()]
    return {
        "a": start,
        "b": end,
        "crc32": _digest(crc),
        "lines": res.lines,
        "bad": res.bad_lines,
        "dup": res.duplicate_lines,
        "first": res.first_ts,
        "last": res.last_ts,
        "cells": cells,
        "complete": complete and not res.broken_files,
        "broken": res.broken_files,
    }


def build_segment(path: str, a: int, b: int | None, gz: bool) -> dict[str, Any]:
    """Roll-ups of the lines starting in [a, b), or of a whole gzip file."""
    plan = index_plan()
    res = new_result(plan)
    crc = start = end_byte = 0
    complete = True
    try:
        with open_log(Path(path)) as f:
            dedupe = primed(f, plan, a) if not gz else Dedupe()
            if not gz and a:
                f.seek(a - 1)
                f.readline()  # the line that began before a belongs to the previous segment
            start = end_byte = f.tell() if not gz else 0
            limit = b if (b is not None and not gz) else 1 << 62

            def owned() -> Iterator[bytes]:
                nonlocal end_byte, complete, crc
                for line in f:
                    if end_byte >= limit:
                        return
                    if not gz:
                        crc = _crc(line, crc)
                        end_byte += len(line)
                    complete = line.endswith(b"\n")
                    yield line

            accumulate(owned(), plan, res, dedupe)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        res.broken_files.append(f"{path}: {type(e).__name__}: {e}")
        complete = False
    if gz and not res.broken_files:
        crc = 0
        with open(path, "rb") as raw:  # a gzip file is verified by its compressed bytes
            for block in iter(lambda: raw.read(8 << 20), b""):
                crc = _crc(block, crc)
        end_byte = os.path.getsize(path)
    return _segment(start, end_byte, crc, res, complete)


class _Recent:
    """The lines a run has just rolled up: where each starts, its hash and record id.
    Enough to prime the next segment's Dedupe as ``primed`` would from the file."""

    def __init__(self) -> None:
        self.parts: list[tuple[list[int], list[int], list[Any]]] = []  # consecutive

    def add(self, start: int, lines: list[bytes], seen: tuple[list[int], list[Any]] | None) -> None:
        if seen is None:  # the pure loop took this segment: nothing known line by line
            self.parts = []
        elif lines:
            self.parts.append((list(running_sum(map(len, lines[:-1]), initial=start)), *seen))
            end = start + sum(map(len, lines))
            while len(self.parts) > 1 and self.parts[1][0][0] <= end - DEDUPE_OVERLAP:
                del self.parts[0]  # the next segment's priming starts after it

    def primed(self, a: int) -> Dedupe | None:
        """The Dedupe ``primed(f, plan, a)`` gives, if these lines reach back far enough."""
        begin = max(0, a - DEDUPE_OVERLAP)
        if not self.parts or self.parts[0][0][0] > begin:
            return None
        dd = Dedupe()
        for starts, hashes, rids in self.parts:
            i = bisect.bisect_left(starts, begin)
            for h, rid in zip(hashes[i:], rids[i:]):
                dd.feed(h, rid)
        return dd


def build_run(path: str, ranges: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """``build_segment`` of each of ``ranges`` (consecutive, of a plain file), read in
    one pass: each segment's repeats check is primed from the lines before it as they
    were read, and the roll-up takes the fast path where it can (engine/rollup.py)."""
    # Nothing made here is cyclic garbage, and the collector would walk every young
    # record and row a few hundred times per segment.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_run(path, ranges)
    finally:
        if collecting:
            gc.enable()


def _build_run(path: str, ranges: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    plan = index_plan()
    out: list[dict[str, Any]] = []
    recent = _Recent()
    try:
        with open(path, "rb", buffering=1 << 20) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)  # the CRC reads the page cache in place: no copy
            try:
                if ranges[0][0]:
                    f.seek(ranges[0][0] - 1)
                    f.readline()  # the line that began before the run belongs to the segment before
                pos = f.tell()
                for a, b in ranges:
                    dedupe = recent.primed(a)
                    if dedupe is None:
                        begin = max(0, a - DEDUPE_OVERLAP)
                        f.seek(begin)
                        dedupe = primed_from(lines_in_range(f, begin, a), plan) if a else Dedupe()
                        f.seek(pos)
                    lines = f.readlines(b - pos) if b > pos else []  # the lines that start before b
                    res = new_result(plan)
                    seen = roll_up(lines, plan, res, dedupe)
                    end = pos + sum(map(len, lines))
                    crc = _crc(view[pos:end]) if end <= len(view) else _crc(b"".join(lines))  # (grown since mapped)
                    out.append(_segment(pos, end, crc, res, not lines or lines[-1].endswith(b"\n")))
                    recent.add(pos, lines, seen)
                    pos = end
            finally:
                view.release()
    except (OSError, ValueError):  # (ValueError: mmap of a file emptied meanwhile)
        # The rest one by one, so that the error is told with the segment it is in.
        out += [build_segment(path, a, b, False) for a, b in ranges[len(out) :]]
    return out
