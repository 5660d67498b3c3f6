"""``scan``: a report's records aggregated from log files, in parallel and from the
roll-up index where it answers; ``iter_selected``: the selected records themselves."""

from __future__ import annotations

import gzip
import multiprocessing
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, select
from proxy.engine.query import Plan, Query, compile_query
from proxy.engine.totals import well_typed
from proxy.storage.index import index_answers, scan_indexed
from proxy.storage.logfiles import is_gzip, open_log
from proxy.storage.memo import SegmentMemo
from proxy.storage.tasks import default_jobs, mp_methods, scan_task, worker_plan

# =====================================================================================
# Reports over log files: the engine behind `analyze_costs.py` / `python -m proxy report`
# (and meant for the analytics API and dashboard too).
#
# A scan reads each line once. Lines outside the time window are skipped from their
# raw bytes (our writer puts the timestamp at a fixed offset), the rest are parsed
# with orjson, filtered, and added to one small "cube": a dict from the tuple of the
# dimensions the report needs to a row of integer counters. Every view a report shows
# (overall, by provider, by model, by hour, any --group-by) is a roll-up of that cube,
# so a record is touched once however many sections are printed. Big plain files are
# split by byte range across processes; partial results merge by addition, and each
# range first reads the lines just before it to recognise repeats (see primed), so
# the answer is the same for any split. The one thing kept beside the log, the
# roll-up index, is checked against the log's bytes before use (see storage/index.py).
# =====================================================================================


_CHUNK = 32 << 20  # bytes per parallel task: small enough to balance two cores
_PARALLEL_MIN = 24 << 20  # below this, forking costs more than it saves

# A progress callback: (bytes done, bytes in all), called in this process as work finishes.
Progress = Callable[[int, int], None]


def _task_bytes(task: tuple[str, int, int | None]) -> int:
    path, start, end = task
    return (end - start) if end is not None else Path(path).stat().st_size


def _sized_task(task: tuple[str, int, int | None]) -> tuple[int, ScanResult]:
    """A task's result with its size, for progress as results come back in any order."""
    return _task_bytes(task), scan_task(task)


def _tasks(paths: Sequence[Path], plan: Plan, chunk: int) -> list[tuple[str, int, int | None]]:
    tasks: list[tuple[str, int, int | None]] = []
    lo = plan.query.start
    for p in paths:
        st = p.stat()
        # A file last written before the window opened holds no record in it: every
        # record's time (the call's start) precedes its write. A day of slack covers
        # clock steps; rotated history then costs nothing for a recent report.
        if lo is not None and st.st_mtime < lo - 86400:
            continue
        if is_gzip(p):
            tasks.append((str(p), 0, None))
            continue
        size = st.st_size  # fixed now: lines appended while we read belong to the next run
        for s in range(0, max(size, 1), chunk):
            tasks.append((str(p), s, min(s + chunk, size)))
    return tasks


def scan(
    paths: Sequence[Path],
    query: Query,
    jobs: int | None = None,
    use_index: bool = True,
    progress: Progress | None = None,
    memo: SegmentMemo | None = None,
) -> ScanResult:
    """Aggregate the records of ``paths`` that ``query`` selects (from the roll-up
    index where it answers the query and ``use_index``, or from ``memo``'s results of
    whole segments; the answer is the same). ``progress`` hears of each finished byte
    range (a chunk of a big log)."""
    plan = compile_query(query)
    jobs = default_jobs() if jobs is None else jobs
    if use_index and (memo is not None or index_answers(query, plan)):
        res = scan_indexed(paths, plan, jobs, memo)
        if progress is not None:
            size = sum(p.stat().st_size for p in paths)
            progress(size, size)
        return res
    total = sum(p.stat().st_size for p in paths)
    # Chunks for a progress bar too, one process or many: any split gives the same answer.
    chunked = (jobs > 1 or progress is not None) and total >= _PARALLEL_MIN
    tasks = _tasks(paths, plan, _CHUNK if chunked else 1 << 62)
    res = new_result(plan)
    res.files = list(paths)
    work = sum(_task_bytes(t) for t in tasks) if progress is not None else 0
    done = 0
    with worker_plan(plan):
        if jobs > 1 and len(tasks) > 1 and "fork" in mp_methods():
            with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
                for size, part in pool.imap_unordered(_sized_task, tasks):
                    res.merge(part)
                    if progress is not None:
                        done += size
                        progress(done, work)
        else:
            for task in tasks:
                res.merge(scan_task(task))
                if progress is not None:
                    done += _task_bytes(task)
                    progress(done, work)
    if progress is not None and not tasks:
        progress(0, 0)
    return res


def iter_selected(
    paths: Sequence[Path], query: Query, res: ScanResult | None = None, progress: Progress | None = None
) -> Iterator[dict[str, Any]]:
    """The selected records themselves, file by file in the given order (for per-request
    output). Counts go to ``res`` when given; ``progress`` hears of the bytes read."""
    plan = compile_query(replace(query, dims=()))
    res = res if res is not None else new_result(plan)
    lo = query.start
    dedupe = Dedupe()  # one pass over the files in order: a repeat across a rotation is caught too
    todo = [p for p in paths if lo is None or p.stat().st_mtime >= lo - 86400]
    sizes = [p.stat().st_size for p in todo]
    total, before = sum(sizes), 0
    for p, size in zip(todo, sizes):
        try:
            with open_log(p) as f:
                # A plain file's position is in the bytes counted; a gzip file's is not.
                plain = progress is not None and not is_gzip(p)
                n = 0
                for rec, ts in select(f, plan, res, dedupe):
                    n += 1
                    if plain and progress is not None and not n % 4096:
                        progress(before + min(f.tell(), size), total)
                    if not well_typed(rec):
                        res.bad_lines += 1  # as the scan counts it (engine.lines.accumulate)
                        continue
                    if res.first_ts is None or ts < res.first_ts:
                        res.first_ts = ts
                    if res.last_ts is None or ts > res.last_ts:
                        res.last_ts = ts
                    yield rec
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            res.broken_files.append(f"{p}: {type(e).__name__}: {e}")
        before += size
        if progress is not None:
            progress(before, total)
