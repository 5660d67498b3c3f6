"""The roll-up index kept beside each log: per-segment roll-ups, verified against the
log's bytes before use (``scan_indexed``)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import orjson

from proxy.engine.cube import ROW_LEN, ScanResult, add_row, new_result
from proxy.engine.query import NONE_LABEL, TIME_DIMS, Plan, Query, compile_query
from proxy.engine.rollup import INDEX_DIMS
from proxy.storage.logfiles import is_gzip
from proxy.storage.memo import SegmentKey, SegmentMemo
from proxy.storage.segments import build_run, build_segment, crc_range
from proxy.storage.tasks import run_tasks, scan_task, worker_plan

# --- the roll-up index beside each log ----------------------------------------------------------
#
# A report that only needs provider/model/endpoint/status and time (the summary, the
# hourly..monthly views, most --group-by) can be answered from per-hour roll-ups
# instead of re-parsing every line. Each log file gets a hidden index beside it
# (".cost-tracking.jsonl.rollup") holding, for consecutive byte segments of whole
# lines, a CRC-32 of the segment's bytes and its roll-up cells. It can never
# disagree with the log:
#   * a segment is used only if the file is untouched since it was indexed (same
#     device, inode, size, mtime and ctime; ctime cannot be set back by any tool) or
#     its bytes still have the stored length and CRC -- the normal case for a log
#     being appended;
#   * a segment that straddles the report's window is re-read line by line;
#   * any mismatch drops the file's index and rebuilds it from the log.
# Lines appended since the last run are read raw and indexed for the next one.
#
# Why a CRC and not a cryptographic hash: the check guards against accidental change
# (an editor, a tool rewriting bytes in place, a restored backup), not an adversary,
# who could forge the index file itself whatever its hash. Anything that rewrites a
# file through our tools makes a new inode (rotation, reprice --in-place), caught by
# the stat before any checksum. CRC-32 catches every change of up to 32 adjacent bits
# and any other change but one in 4 billion, at nearly twice SHA-1's speed: for a
# log the proxy keeps appending to, every report re-checks every segment.

INDEX_VERSION = 4  # 2: repeated lines skipped; 3: endpoints as the client called them (record schema 2); 4: CRC-32
_SEGMENT = 4 << 20  # bytes per indexed segment: what a window edge re-reads, and a memo entry (memo.py)
_MIN_SEGMENT = 1 << 20  # a shorter tail is read raw each run rather than indexed
_RUN = 8  # consecutive segments one task builds: one read primes the repeats check for all
_INDEX_FILTERABLE = frozenset(("provider", "model", "response_model", "provider_type", "endpoint", "status"))
__all__ = ["INDEX_DIMS", "index_answers", "index_path", "lock_path", "scan_indexed", "update_index"]


def index_path(log: Path) -> Path:
    return log.with_name(f".{log.name}.rollup")


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


def _index_task(task: tuple) -> Any:
    kind, path = task[0], task[1]
    if kind == "verify":
        _, _, a, b, digest, gz = task
        if gz:
            got, whole = crc_range(path, 0, os.path.getsize(path))
            whole = True
        else:
            got, whole = crc_range(path, a, b)
        return ("verify", path, a, whole and got == digest)
    if kind == "build":
        _, _, a, b, gz = task
        return ("build", path, [build_segment(path, a, b, gz)])
    if kind == "run":
        return ("build", path, build_run(path, task[2]))
    if kind == "memo":  # a whole segment for the memo: which one goes back with it
        return ("memo", path, task[2], scan_task((path, task[2], task[3])))
    return ("raw", path, scan_task((path, task[2], task[3])))


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


def _builds(info: dict[str, Any], key: str, start: int, size: int, jobs: int) -> list[tuple]:
    """Tasks rolling up a plain file's bytes from ``start``, a run of consecutive
    segments each (a few per worker at least, so that they finish together). A tail too
    short to be kept in the index is set aside in ``info["tail"]``: read for the query
    alone rather than rolled up first and then read again."""
    info.pop("tail", None)
    ranges = []
    for s in range(start, size, _SEGMENT):
        e = min(s + _SEGMENT, size)
        if e == size and e - s < _MIN_SEGMENT and not info.get("whole"):
            info["tail"] = (s, e)
        else:
            ranges.append((s, e))
    run = max(1, min(_RUN, len(ranges) // (4 * max(1, jobs))))  # --jobs 0 or less: one process
    return [("run", key, ranges[i : i + run]) for i in range(0, len(ranges), run)]


def _refresh(
    paths: Sequence[Path], jobs: int, memo: SegmentMemo | None, since: float | None = None, whole: bool = False, locked: bool = False
) -> dict[str, dict[str, Any]]:
    """Each file's index checked against its bytes, extended over the lines added since
    (or rebuilt), and saved unless another process is updating it (``locked``: the
    caller holds the lock). ``whole``: index to the last whole line, a short last
    segment rolled up again with what followed it (the upkeep's way: a report then reads
    nothing raw); otherwise a tail under ``_MIN_SEGMENT`` is left for the query to read."""
    files: dict[str, dict[str, Any]] = {}
    tasks: list[tuple] = []
    for p in paths:
        st = p.stat()
        if since is not None and st.st_mtime < since - 86400:
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
            "whole": whole,
        }
        files[key] = info
        if segs and data and data.get("stat") != stat:  # segs come from data
            check = segs
            todo = memo.unchecked(key, stat, segs) if memo is not None and not gz else None
            if memo is not None and todo is not None:
                check = [*todo, memo.audit(key, segs)]  # see SegmentMemo.trusted
                # Saved with the stat it was last checked at in full: a reader without a
                # memo (the CLI) then still checks every segment.
                info["stat_saved"] = data.get("stat")
            for seg in check:
                tasks.append(("verify", key, seg["a"], seg["b"], seg["crc32"], gz))
        if whole and not gz and segs and segs[-1]["b"] - segs[-1]["a"] < _SEGMENT and segs[-1]["b"] < st.st_size:
            segs.pop()  # rolled up again with the lines after it: segments stay _SEGMENT long
            info["changed"] = True
        start = segs[-1]["b"] if segs else 0
        if gz:
            if not segs:
                tasks.append(("build", key, 0, None, True))
        else:
            tasks += _builds(info, key, start, st.st_size, jobs)
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
                rebuild += _builds(info, key, 0, st_size, jobs)
        elif kind == "build" and info["verified"]:
            info["new"] += rest[0]
    for kind, key, *rest in run_tasks(_index_task, rebuild, jobs):
        files[key]["new"] += rest[0]
    for key, info in files.items():
        info["all"] = segs = info["segs"] + sorted(info["new"], key=lambda s: s["a"])
        if memo is not None and not info["gz"]:
            memo.remember(key, info["stat"], [seg for seg in segs if seg.get("complete", True)])
        keep_segs: list[dict[str, Any]] = []
        if info["changed"] or info["new"]:
            for seg in segs:  # index only whole, complete segments, contiguous from byte 0
                if not seg.get("complete", True) or seg["a"] != (keep_segs[-1]["b"] if keep_segs else 0):
                    break
                short = seg["b"] - seg["a"] < _MIN_SEGMENT and not whole
                if not info["gz"] and seg is segs[-1] and short and any(seg is n for n in info["new"]):
                    break
                keep_segs.append({k: v for k, v in seg.items() if k not in ("complete", "broken")})
            if info["changed"] or len(keep_segs) > len(info["segs"]):
                with _updating(info["path"], locked) as mine:
                    if mine:
                        _save_index(info["path"], info.get("stat_saved") or info["stat"], keep_segs)
        info["kept"] = keep_segs[-1]["b"] if keep_segs else (info["segs"][-1]["b"] if info["segs"] else 0)
    return files


def lock_path(log: Path) -> Path:
    return log.with_name(f".{log.name}.rollup.lock")


@contextmanager
def _updating(log: Path, held: bool = False, create: bool = False) -> Iterator[bool]:
    """The index's update lock (``flock`` on a file beside it), without waiting: True if
    this process may write the index now (``held``: it holds the lock already), False
    if another process holds it. Only the proxy's upkeep makes the lock file
    (``create``): with none, no proxy keeps this index and nothing can race to write it.
    (Two writers would be safe anyway, the index being replaced whole and checked
    against the log; the lock spares the second one the work.)"""
    if held:
        yield True
        return
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(lock_path(log), flags, os.stat(log).st_mode & 0o666)
    except OSError:
        yield True  # no lock file (or a read-only directory, where nothing is written)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # (closing releases the lock)


def update_index(log: Path, memo: SegmentMemo | None = None) -> int | None:
    """Bring ``log``'s index up to its last whole line (the proxy's upkeep, see
    web/index_upkeep.py): the byte offset it now covers, or None if another process was
    updating it. ``memo``: kept by the caller from one update to the next, so that the
    segments it checked are trusted (SegmentMemo.trusted) rather than all re-read."""
    with _updating(log, create=True) as mine:
        if not mine:
            return None
        # Held across the whole update, so that another updater skips rather than repeats it.
        files = _refresh([log], 1, memo, whole=True, locked=True)
    info = files.get(str(log))
    return info["kept"] if info is not None else 0


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
    files = _refresh(paths, jobs, memo, q.start)
    raw: list[tuple] = []
    todo: list[tuple[SegmentKey, tuple]] = []  # whole segments the memo lacks
    for key, info in files.items():
        for seg in info["all"]:
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
                skey: SegmentKey = (key, st[0], st[1], seg["a"], seg["b"], seg["crc32"])
                hit = shape.get(skey)
                if hit is not None:
                    res.merge(hit)
                else:
                    todo.append((skey, ("memo", key, seg["a"], None if info["gz"] else seg["b"])))
            else:
                raw.append(("raw", key, seg["a"], None if info["gz"] else seg["b"]))
        if "tail" in info:
            raw.append(("raw", key, *info["tail"]))
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
