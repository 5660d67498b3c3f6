"""Reading logs: finding a log's files (rotated siblings, globs, directories), gzip,
time order, seeking to a time, ``records_since`` and ``iter_jsonl``."""

from __future__ import annotations

import glob
import gzip
import io
import logging
import os
import re
import zlib
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import orjson

from proxy.core.records import upgrade_record
from proxy.core.timestamps import LINE_HEAD, TS_AT, canonical_ts, iso_ms
from proxy.engine.lines import Dedupe
from proxy.engine.totals import well_typed


def iter_jsonl(lines: Iterable[bytes], bad: list[int] | None = None, dedupe: Dedupe | None = None) -> Iterator[dict[str, Any]]:
    """Records from raw lines; a torn or corrupt line is counted in ``bad``, never raised.
    A repeated line or record id is skipped (see ``Dedupe``); pass one ``dedupe`` to
    carry what was seen from one file into the next."""
    return (rec for rec, _ in iter_jsonl_lines(lines, bad, dedupe))


def iter_jsonl_lines(
    lines: Iterable[bytes], bad: list[int] | None = None, dedupe: Dedupe | None = None
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """``iter_jsonl``, each record with the line it was read from."""
    dd = Dedupe() if dedupe is None else dedupe
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            if bad is not None:
                bad[0] += 1
            continue
        if not isinstance(rec, dict):
            if bad is not None:
                bad[0] += 1
        elif not dd.seen_line(line) and not dd.seen_record(rec):
            # Judged after the repeat check, as the scan judges it (engine.lines).
            if well_typed(rec):
                yield upgrade_record(rec), line
            elif bad is not None:
                bad[0] += 1


# --- files -----------------------------------------------------------------------------

# Suffixes logrotate and friends add: .1  .2.gz  .gz  -20261101  .2026-11-01.gz  -2026-11-01T10
_ROTATED = re.compile(r"(?:[.-](?:\d+|\d{4}-?\d{2}-?\d{2}(?:[T_-]?\d{2,6})?))?(?:\.gz)?")


def log_files(patterns: Sequence[str], rotated: bool = True) -> list[Path]:
    """The files ``patterns`` name (paths, globs, directories), each plain path joined by
    its rotated siblings (``x.jsonl.1``, ``x.jsonl.2.gz``…) unless ``rotated`` is off.
    Raises FileNotFoundError naming a pattern that matches nothing."""
    found: list[Path] = []
    for pat in patterns:
        if glob.has_magic(pat):
            matches = [Path(p) for p in sorted(glob.glob(pat)) if os.path.isfile(p)]
        elif os.path.isdir(pat):
            matches = [Path(p) for p in sorted(glob.glob(os.path.join(pat, "*.jsonl*"))) if os.path.isfile(p)]
        else:
            matches = [Path(pat)] if os.path.isfile(pat) else []
            if rotated:
                base = os.path.basename(pat)
                for sib in sorted(glob.glob(glob.escape(pat) + "[.-]*")):
                    if _ROTATED.fullmatch(os.path.basename(sib)[len(base) :]) and os.path.isfile(sib):
                        matches.append(Path(sib))
        if not matches:
            raise FileNotFoundError(pat)
        found.extend(matches)
    seen: set[str] = set()
    out: list[Path] = []
    for path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_log(path: Path) -> IO[bytes]:
    """A binary line reader, decompressing gzip (found by its magic bytes, not its name)."""
    if is_gzip(path):
        return io.BufferedReader(gzip.GzipFile(path, "rb"), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def first_timestamp(path: Path) -> str | None:
    """The first readable record time in a file: enough to put files in time order."""
    try:
        with open_log(path) as f:
            for i, line in enumerate(f):
                if i >= 100:
                    break
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and (ts := canonical_ts(rec.get("timestamp"))):
                    return ts
    except (OSError, EOFError, zlib.error):
        pass
    return None


def order_files(paths: Sequence[Path]) -> list[Path]:
    """Oldest first, by each file's first record (rotation names order differently)."""
    keyed = [(first_timestamp(p) or "~", i, p) for i, p in enumerate(paths)]  # "~" sorts after digits
    return [p for _, _, p in sorted(keyed)]


_TS_KEY = b'"timestamp":"'


def _line_ts(line: bytes) -> bytes | None:
    """A line's raw timestamp bytes, found without parsing the line."""
    if line.startswith(LINE_HEAD):
        return line[TS_AT : TS_AT + 24]
    i = line.find(_TS_KEY, 0, 120)
    if i < 0:
        return None
    i += len(_TS_KEY)
    j = line.find(b'"', i, i + 40)
    return line[i:j] if j > 0 else None


def _seek_since(f: IO[bytes], size: int, since: bytes) -> None:
    """Move ``f`` to (about) the first line stamped at or after ``since``: the log is
    appended in time order, so bisecting byte offsets finds it in ~30 reads."""
    lo, hi = 0, size
    while hi - lo > 65536:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # to the start of the next whole line
        ts = None
        for _ in range(8):
            line = f.readline()
            if not line:
                break
            ts = _line_ts(line)
            if ts is not None:
                break
        if ts is None or ts >= since:
            hi = mid
        else:
            lo = mid
    f.seek(lo)
    if lo:
        f.readline()


# Records are stamped at the call's start but written at its end: a call may land
# in the file after later-started ones, so seeking starts this much earlier.
LATE_SLACK = 3600.0


def _lines_upto(f: IO[bytes], end: int) -> Iterator[bytes]:
    """The whole lines of ``f`` from where it stands that end at or before byte ``end``."""
    at = f.tell()
    for line in f:
        at += len(line)
        if at > end:
            return
        yield line


def records_since(
    path: str | os.PathLike[str], since: float, slack: float = LATE_SLACK, until: tuple[int, int, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Records of a log and its rotated siblings stamped at or after ``since``, oldest
    file first. Used at start-up (/health window, budgets): bisects to the window and
    skips older lines on their raw bytes, so a month-long log costs only its tail.
    ``until`` (device, inode, size): that file is read only up to that size, the point
    from which a ``storage.follow.LogFollower`` takes over (serve --workers)."""
    since_text = iso_ms(max(0.0, since)).encode()
    seek_to = iso_ms(max(0.0, since - slack)).encode()
    try:
        paths = order_files(log_files([str(path)]))
    except FileNotFoundError:
        return
    # One memory across files: a batch cut short just before a rotation was retried
    # into the new file, so its repeats start the next file.
    dedupe = Dedupe()
    for p in paths:
        try:
            if p.stat().st_mtime < since:
                continue  # last written before the window opened
            with open_log(p) as f:
                lines: Iterable[bytes] = f
                if not is_gzip(p):
                    st = os.fstat(f.fileno())
                    _seek_since(f, st.st_size, seek_to)
                    if until is not None and (st.st_dev, st.st_ino) == until[:2]:
                        lines = _lines_upto(f, until[2])
                fresh = (line for line in lines if (ts := _line_ts(line)) is None or ts >= since_text)
                for rec in iter_jsonl(fresh, dedupe=dedupe):
                    canon = canonical_ts(rec.get("timestamp"))
                    if canon is not None and canon >= since_text.decode():
                        rec["timestamp"] = canon
                        yield rec
        except (OSError, EOFError, zlib.error) as e:
            logging.getLogger("proxy").warning("cannot read %s: %s", p, e)
