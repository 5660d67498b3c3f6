"""The roll-up index kept beside each log: per-segment roll-ups, verified against the
log's bytes before use (``scan_indexed``)."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import orjson

from proxy.engine.cube import ROW_LEN, ScanResult, add_row, new_result
from proxy.engine.lines import Dedupe, accumulate
from proxy.engine.query import NONE_LABEL, TIME_DIMS, Plan, Query, compile_query
from proxy.storage.logfiles import is_gzip, open_log
from proxy.storage.memo import SegmentKey, SegmentMemo
from proxy.storage.tasks import primed, run_tasks, scan_task, worker_plan

# --- the roll-up index beside each log ----------------------------------------------------------
#
# A report that only needs provider/model/endpoint/status and time (the summary, the
# hourly..monthly views, most --group-by) can be answered from per-hour roll-ups
# instead of re-parsing every line. Each log file gets a hidden index beside it
# (".cost-tracking.jsonl.rollup") holding, for consecutive byte segments of whole
# lines, the SHA-1 of the segment's bytes and its roll-up cells. It can never
# disagree with the log:
#   * a segment is used only if the file is untouched since it was indexed (same
#     device, inode, size, mtime and ctime; ctime cannot be set back by any tool) or
#     its bytes hash to the stored SHA-1 -- the normal case for a log being appended;
#   * a segment that straddles the report's window is re-read line by line;
#   * any mismatch drops the file's index and rebuilds it from the log.
# Lines appended since the last run are read raw and indexed for the next one.

INDEX_VERSION = 3  # 2: repeated lines skipped (version 1 counted them); 3: endpoints as the client called them (record schema 2)
_SEGMENT = 4 << 20  # bytes per indexed segment: what a window edge re-reads, and a memo entry (memo.py)
_MIN_SEGMENT = 1 << 20  # a shorter tail is read raw each run rather than indexed
INDEX_DIMS = ("provider", "provider_type", "model", "response_model", "endpoint", "status")
_INDEX_FILTERABLE = frozenset(("provider", "model", "response_model", "provider_type", "endpoint", "status"))


def index_path(log: Path) -> Path:
    return log.with_name(f".{log.name}.rollup")


def _index_key(r: Mapping[str, Any], ts: str) -> tuple:
    status = r.get("status")
    return (
        r.get("provider"),
        r.get("provider_type"),
        r.get("model"),
        r.get("response_model"),
        r.get("endpoint"),
        status,
        1 if (r.get("error") or (type(status) is int and status >= 400)) else 0,
        ts[:13],
    )


def _index_plan() -> Plan:
    return Plan(None, None, None, None, None, _index_key, 13, Query(dims=()), spans=True)


def index_answers(q: Query, plan: Plan) -> bool:
    """Whether the roll-ups hold everything this query needs."""
    dims_ok = all(d in TIME_DIMS or d in _INDEX_FILTERABLE for d in q.dims)
    return dims_ok and plan.time_width in (0, 13) and not (q.users or q.teams or q.tags or q.latency or q.top or q.savings or q.habits)


def _file_stat(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_index(log: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(index_path(log).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("v") != INDEX_VERSION or not isinstance(data.get("segments"), list):
        return None
    pos = 0
    for seg in data["segments"]:  # must tile the file from byte 0 with no gap
        if seg.get("a") != pos:
            return None
        pos = seg["b"]
    return data


def _save_index(log: Path, stat: list[int], segments: list[dict[str, Any]]) -> None:
    path = index_path(log)
    tmp: str | None = None
    try:
        # The roll-ups tell what the log tells (who spent what on which model): the
        # index gets the log's read/write bits, never the umask's. mkstemp creates it
        # 0600, so it is never more open than that before the chmod either.
        mode = os.stat(log).st_mode & 0o666
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(orjson.dumps({"v": INDEX_VERSION, "stat": stat, "segments": segments}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new index
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        # Otherwise a read-only log directory: reports still work, just without the index.


def _sha1_range(path: str, a: int, b: int) -> tuple[str, bool]:
    """SHA-1 of bytes [a, b) and whether they are whole lines (preceded and ended by \\n)."""
    h = hashlib.sha1(usedforsecurity=False)
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
            h.update(block)
            left -= len(block)
            last = block
    return h.hexdigest(), whole and last.endswith(b"\n")


def _index_task(task: tuple) -> Any:
    kind, path = task[0], task[1]
    if kind == "verify":
        _, _, a, b, digest, gz = task
        if gz:
            got, whole = _sha1_range(path, 0, os.path.getsize(path))
            whole = True
        else:
            got, whole = _sha1_range(path, a, b)
        return ("verify", path, a, whole and got == digest)
    if kind == "build":
        _, _, a, b, gz = task
        return ("build", path, _build_segment(path, a, b, gz))
    if kind == "memo":  # a whole segment for the memo: which one goes back with it
        return ("memo", path, task[2], scan_task((path, task[2], task[3])))
    return ("raw", path, scan_task((path, task[2], task[3])))


def _build_segment(path: str, a: int, b: int | None, gz: bool) -> dict[str, Any]:
    """Roll-ups of the lines starting in [a, b), or of a whole gzip file."""
    plan = _index_plan()
    res = new_result(plan)
    digest = hashlib.sha1(usedforsecurity=False)
    start = end_byte = 0
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
                nonlocal end_byte, complete
                for line in f:
                    if end_byte >= limit:
                        return
                    if not gz:
                        digest.update(line)
                        end_byte += len(line)
                    complete = line.endswith(b"\n")
                    yield line

            accumulate(owned(), plan, res, dedupe)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        res.broken_files.append(f"{path}: {type(e).__name__}: {e}")
        complete = False
    if gz and not res.broken_files:
        with open(path, "rb") as raw:  # a gzip file is verified by its compressed bytes
            for block in iter(lambda: raw.read(8 << 20), b""):
                digest.update(block)
        end_byte = os.path.getsize(path)
    cells = [[*k, *row, *res.spans[k]] for k, row in res.cells.items()]
    return {
        "a": start,
        "b": end_byte,
        "sha1": digest.hexdigest(),
        "lines": res.lines,
        "bad": res.bad_lines,
        "dup": res.duplicate_lines,
        "first": res.first_ts,
        "last": res.last_ts,
        "cells": cells,
        "complete": complete and not res.broken_files,
        "broken": res.broken_files,
    }


def _use_segment(seg: Mapping[str, Any], plan: Plan, res: ScanResult) -> None:
    """Add an indexed segment that lies wholly inside the window to ``res``."""
    keep, keyf = plan.keep, plan.key
    nd = len(INDEX_DIMS)
    for cell in seg["cells"]:
        provider, family, model, response_model, endpoint, status, err, hour = cell[: nd + 2]
        rec = {
            "provider": provider,
            "provider_type": family,
            "model": model,
            "response_model": response_model,
            "endpoint": endpoint,
            "status": status,
            "error": "error" if err else None,
        }
        if keep is not None and not keep(rec):
            continue
        if keyf is None:
            key: tuple = (provider or NONE_LABEL, model or response_model or NONE_LABEL)
        else:
            key = keyf(rec, hour)
        row = cell[nd + 2 : nd + 2 + ROW_LEN]
        mine = res.cells.get(key)
        if mine is None:
            res.cells[key] = list(row)
        else:
            add_row(mine, row)
        first, last = cell[nd + 2 + ROW_LEN], cell[nd + 3 + ROW_LEN]
        if res.first_ts is None or first < res.first_ts:
            res.first_ts = first
        if res.last_ts is None or last > res.last_ts:
            res.last_ts = last
    res.lines += seg["lines"]
    res.bad_lines += seg["bad"]
    res.duplicate_lines += seg["dup"]


def _builds(info: dict[str, Any], key: str, start: int, size: int) -> list[tuple]:
    """Tasks rolling up a plain file's bytes from ``start``. A tail too short to be kept
    in the index is set aside in ``info["tail"]``: read for the query alone rather than
    rolled up first and then read again."""
    info.pop("tail", None)
    tasks = []
    for s in range(start, size, _SEGMENT):
        e = min(s + _SEGMENT, size)
        if e == size and e - s < _MIN_SEGMENT:
            info["tail"] = (s, e)
        else:
            tasks.append(("build", key, s, e, False))
    return tasks


def scan_indexed(paths: Sequence[Path], plan: Plan, jobs: int, memo: SegmentMemo | None = None) -> ScanResult:
    """The query from the index's roll-ups where it answers the query; otherwise (with a
    ``memo``) from the memo's results of whole segments inside the window, reading what
    it lacks. The segments the window cuts, and the unindexed tail, are read raw."""
    q = plan.query
    answers = index_answers(q, plan)
    shape: dict[SegmentKey, ScanResult] | None = None
    free_plan = None
    if not answers and memo is not None:
        free_plan = compile_query(replace(q, start=None, end=None))  # window-free: shared by every window
        mkey = q.memo_key(plan.time_width)
        if mkey is not None and free_plan.time_width == plan.time_width:
            shape = memo.shape(mkey, q.pricebook)
    res = new_result(plan)
    res.files = list(paths)
    lo, hi = plan.lo, plan.hi
    files: dict[str, dict[str, Any]] = {}
    tasks: list[tuple] = []
    for p in paths:
        st = p.stat()
        if q.start is not None and st.st_mtime < q.start - 86400:
            continue  # see scan._tasks: a file last written before the window holds nothing in it
        key = str(p)
        gz = is_gzip(p)
        stat = _file_stat(st)
        data = _load_index(p)
        segs = list(data["segments"]) if data else []
        if data and data.get("stat", [None, None])[:2] != stat[:2]:
            segs = []  # another file now has this name (rotation): start over
        if segs and segs[-1]["b"] > st.st_size:
            segs = []  # the file shrank: it was rewritten
        info = {
            "path": p,
            "stat": stat,
            "gz": gz,
            "segs": segs,
            "new": [],
            "changed": data is None or data.get("stat") != stat,
            "verified": True,
        }
        files[key] = info
        if segs and data and data.get("stat") != stat:  # segs come from data
            check = segs
            if memo is not None and not gz and memo.trusted(key, stat, segs):
                check = [memo.audit(key, segs)]  # see SegmentMemo.trusted
                # Saved with the stat it was last checked at in full: a reader without a
                # memo (the CLI) then still checks every segment.
                info["stat_saved"] = data.get("stat")
            for seg in check:
                tasks.append(("verify", key, seg["a"], seg["b"], seg["sha1"], gz))
        start = segs[-1]["b"] if segs else 0
        if gz:
            if not segs:
                tasks.append(("build", key, 0, None, True))
        else:
            tasks += _builds(info, key, start, st.st_size)
    results = run_tasks(_index_task, tasks, jobs)
    rebuild: list[tuple] = []
    for kind, key, *rest in results:
        info = files[key]
        if kind == "verify" and not rest[1] and info["verified"]:
            info["verified"] = False  # some byte changed: distrust the whole index of this file
            if memo is not None:
                memo.forget(key)
            info["segs"], info["new"], info["changed"] = [], [], True
            st_size = info["stat"][2]
            if info["gz"]:
                rebuild.append(("build", key, 0, None, True))
            else:
                rebuild += _builds(info, key, 0, st_size)
        elif kind == "build" and info["verified"]:
            info["new"].append(rest[0])
    for kind, key, *rest in run_tasks(_index_task, rebuild, jobs):
        files[key]["new"].append(rest[0])
    raw: list[tuple] = []
    todo: list[tuple[SegmentKey, tuple]] = []  # whole segments the memo lacks
    for key, info in files.items():
        segs = info["segs"] + sorted(info["new"], key=lambda s: s["a"])
        for seg in segs:
            res.broken_files += seg.get("broken", [])
            first, last = seg["first"], seg["last"]
            if first is None:  # nothing readable in it: count its lines, bad ones and repeats
                res.lines += seg["lines"]
                res.bad_lines += seg["bad"]
                res.duplicate_lines += seg["dup"]
            elif (lo is not None and last < lo) or (hi is not None and first >= hi):
                continue
            elif (lo is None or first >= lo) and (hi is None or last < hi) and answers:
                _use_segment(seg, plan, res)
            elif (lo is None or first >= lo) and (hi is None or last < hi) and shape is not None and seg.get("complete", True):
                st = info["stat"]
                skey: SegmentKey = (key, st[0], st[1], seg["a"], seg["b"], seg["sha1"])
                hit = shape.get(skey)
                if hit is not None:
                    res.merge(hit)
                else:
                    todo.append((skey, ("memo", key, seg["a"], None if info["gz"] else seg["b"])))
            else:
                raw.append(("raw", key, seg["a"], None if info["gz"] else seg["b"]))
        if "tail" in info:
            raw.append(("raw", key, *info["tail"]))
        if memo is not None and not info["gz"]:
            memo.remember(key, info["stat"], [seg for seg in segs if seg.get("complete", True)])
        keep_segs: list[dict[str, Any]] = []
        if info["changed"] or info["new"]:
            for seg in segs:  # index only whole, complete segments, contiguous from byte 0
                if not seg.get("complete", True) or seg["a"] != (keep_segs[-1]["b"] if keep_segs else 0):
                    break
                if not info["gz"] and seg is segs[-1] and seg in info["new"] and seg["b"] - seg["a"] < _MIN_SEGMENT:
                    break
                keep_segs.append({k: v for k, v in seg.items() if k not in ("complete", "broken")})
            if info["changed"] or len(keep_segs) > len(info["segs"]):
                _save_index(info["path"], info.get("stat_saved") or info["stat"], keep_segs)
    if not answers and shape is None:
        raw += [task for _, task in todo]
    with worker_plan(plan):
        for _, _, part in run_tasks(_index_task, raw, jobs):
            res.merge(part)
    if todo and shape is not None and free_plan is not None and memo is not None:
        by_range = {(t[1], t[2]): skey for skey, t in todo}
        with worker_plan(free_plan):
            for _, path, a, part in run_tasks(_index_task, [t for _, t in todo], jobs):
                shape[by_range[(path, a)]] = part
                res.merge(part)
        memo.misses += len(todo)
    return res
