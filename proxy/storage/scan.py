"""``scan``: a report's records aggregated from log files, in parallel and from the
roll-up index where it answers; ``iter_selected``: the selected records themselves."""

from __future__ import annotations

import gzip
import multiprocessing
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, select
from proxy.engine.query import Plan, Query, compile_query
from proxy.engine.totals import well_typed
from proxy.storage.index import index_answers, scan_indexed
from proxy.storage.logfiles import is_gzip, open_log
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


def scan(paths: Sequence[Path], query: Query, jobs: int | None = None, use_index: bool = True) -> ScanResult:
    """Aggregate the records of ``paths`` that ``query`` selects (from the roll-up
    index where it answers the query and ``use_index``; the answer is the same)."""
    plan = compile_query(query)
    jobs = default_jobs() if jobs is None else jobs
    if use_index and index_answers(query, plan):
        return scan_indexed(paths, plan, jobs)
    total = sum(p.stat().st_size for p in paths)
    chunk = _CHUNK if jobs > 1 and total >= _PARALLEL_MIN else 1 << 62
    tasks = _tasks(paths, plan, chunk)
    res = new_result(plan)
    res.files = list(paths)
    with worker_plan(plan):
        if jobs > 1 and len(tasks) > 1 and "fork" in mp_methods():
            with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
                for part in pool.imap_unordered(scan_task, tasks):
                    res.merge(part)
        else:
            for task in tasks:
                res.merge(scan_task(task))
    return res


def iter_selected(paths: Sequence[Path], query: Query, res: ScanResult | None = None) -> Iterator[dict[str, Any]]:
    """The selected records themselves, file by file in the given order (for per-request
    output). Counts go to ``res`` when given."""
    plan = compile_query(replace(query, dims=()))
    res = res if res is not None else new_result(plan)
    lo = query.start
    dedupe = Dedupe()  # one pass over the files in order: a repeat across a rotation is caught too
    for p in paths:
        if lo is not None and p.stat().st_mtime < lo - 86400:
            continue
        try:
            with open_log(p) as f:
                for rec, ts in select(f, plan, res, dedupe):
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
