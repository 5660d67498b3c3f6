"""A scan's units of work: byte ranges of a log read in worker processes (``scan_task``),
and the pool that runs them (``run_tasks``)."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, accumulate, select
from proxy.engine.query import Plan
from proxy.storage.logfiles import open_log

# --- reading files, in parallel when it pays -------------------------------------------------

_WORKER_PLAN: Plan | None = None  # set before forking; workers inherit it


@contextmanager
def worker_plan(plan: Plan) -> Iterator[None]:
    """Make ``plan`` the one ``scan_task`` reads, for the ``with`` block (forked workers inherit it)."""
    global _WORKER_PLAN
    _WORKER_PLAN = plan
    try:
        yield
    finally:
        _WORKER_PLAN = None


def lines_in_range(f: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """Lines that *start* in [start, end): each line belongs to exactly one range."""
    if start:
        f.seek(start - 1)
        f.readline()  # the line that started before us, or just the newline at start-1
    pos = f.tell()
    for line in f:
        if pos >= end:
            return
        pos += len(line)
        yield line


# A byte range is read with the lines just before it in mind (see Dedupe): the first
# copy of a repeat near its start may lie in the range before. 1 MiB, some 1,500
# lines, is many times an ordinary batch and costs a few percent of a range's time.
# Limits, kept so that an index segment depends on its own file's bytes only: copies
# farther apart than this that fall in different ranges are both counted, and so are
# copies in two files (a cut batch retried after a rotation); the streaming readers
# (records_since, iter_selected) read files in one pass and catch those too.
DEDUPE_OVERLAP = 1 << 20


def primed(f: IO[bytes], plan: Plan, start: int) -> Dedupe:
    """A Dedupe that has seen the lines up to ``DEDUPE_OVERLAP`` bytes before ``start``,
    judged as the range's own lines are, so any split gives the same answer."""
    dd = Dedupe()
    if start > 0:
        begin = max(0, start - DEDUPE_OVERLAP)
        f.seek(begin)  # (lines_in_range seeks itself only past byte 0)
        scratch = new_result(plan)
        for _ in select(lines_in_range(f, begin, start), plan, scratch, dd):
            pass
    return dd


def scan_task(task: tuple[str, int, int | None]) -> ScanResult:
    plan = _WORKER_PLAN
    assert plan is not None
    path, start, end = task
    res = new_result(plan)
    try:
        with open_log(Path(path)) as f:
            if end is None:
                accumulate(f, plan, res)
            else:
                dedupe = primed(f, plan, start)
                accumulate(lines_in_range(f, start, end), plan, res, dedupe)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        # A truncated or damaged gzip: keep what was read, say so.
        res.broken_files.append(f"{path}: {type(e).__name__}: {e}")
    return res


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_tasks(fn: Callable[[Any], Any], tasks: list[Any], jobs: int) -> list[Any]:
    if jobs > 1 and len(tasks) > 1 and "fork" in mp_methods():
        with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            return list(pool.imap_unordered(fn, tasks))
    return [fn(t) for t in tasks]


def mp_methods() -> list[str]:
    return multiprocessing.get_all_start_methods()
