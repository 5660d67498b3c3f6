"""The one aggregation engine: every sum of records (CLI reports, /health, the
analytics API, the dashboard) goes through ``Totals``.

Money is summed as integer units of 1e-10 USD (the precision records are written
with), so adding a million records gives the exact decimal total, never float drift.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import heapq
import io
import logging
import math
import operator
import os
import re
import tempfile
import time
import zlib
from calendar import monthrange
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import orjson

from .pricing import name_candidates, normalize_model

COST_UNITS_PER_USD = 10**10
MILLION_DEC = Decimal(1_000_000)  # rates are USD per 1M tokens
_UNIT = Decimal(1).scaleb(-10)


def cost_units(value: Any) -> int | None:
    """A record's cost (float from JSON, Decimal live) as integer 1e-10 USD units."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return int(value.scaleb(10).to_integral_value())
    return round(value * COST_UNITS_PER_USD)


def units_to_usd(units: int) -> Decimal:
    """Exact USD for integer units (trailing zeros dropped: 0.02, not 0.0200000000)."""
    return (Decimal(units) * _UNIT).normalize() if units else Decimal(0)


_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    priced: int = 0
    unpriced: int = 0  # records with tokens but no cost: totals are then "at least"
    cost_units: int = 0
    input_cost_units: int = 0
    output_cost_units: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_FIELDS, 0))
    # Records whose usage is unknown (a stream cut before its usage arrived): their
    # cost is unknown too, so a total that includes them is also "at least".
    unknown: int = 0

    def add(self, rec: Mapping[str, Any]) -> None:
        self.requests += 1
        status = rec.get("status")
        if rec.get("error") or (isinstance(status, int) and status >= 400):
            self.errors += 1
        total = cost_units(rec.get("total_cost"))
        if total is None:
            tokens_total = rec.get("total_tokens")
            if tokens_total:
                self.unpriced += 1
            elif tokens_total is None:
                self.unknown += 1
        else:
            self.priced += 1
            self.cost_units += total
            self.input_cost_units += cost_units(rec.get("input_cost")) or 0
            self.output_cost_units += cost_units(rec.get("output_cost")) or 0
        tokens = self.tokens
        for name in _TOKEN_FIELDS:
            v = rec.get(name)
            if v:
                tokens[name] += v

    def merge(self, other: "Totals") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.priced += other.priced
        self.unpriced += other.unpriced
        self.cost_units += other.cost_units
        self.input_cost_units += other.input_cost_units
        self.output_cost_units += other.output_cost_units
        self.unknown += other.unknown
        for k, v in other.tokens.items():
            self.tokens[k] = self.tokens.get(k, 0) + v

    @property
    def total_cost(self) -> Decimal:
        return units_to_usd(self.cost_units)

    @property
    def incomplete(self) -> bool:
        """True when some requests' cost is missing, so ``total_cost`` is a lower bound."""
        return bool(self.unpriced or self.unknown)


def parse_timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class RollingWindow:
    """Totals over the last ``seconds``, per provider, in one-minute buckets.

    Adding a record is O(1); reading the window merges at most one bucket per minute.
    """

    def __init__(self, seconds: int = 86400, bucket: int = 60, clock: Any = time.time) -> None:
        self.seconds, self.bucket, self._clock = seconds, bucket, clock
        self._buckets: deque[tuple[int, dict[str, Totals]]] = deque()

    def add(self, rec: Mapping[str, Any], ts: float | None = None) -> None:
        if ts is None:
            ts = parse_timestamp(rec["timestamp"])
        b = int(ts // self.bucket)
        if self._buckets and self._buckets[-1][0] == b:
            slot = self._buckets[-1][1]
        elif not self._buckets or self._buckets[-1][0] < b:
            slot = {}
            self._buckets.append((b, slot))
        else:
            # An out-of-order record (long call finishing late): find its bucket.
            found = next((s for k, s in self._buckets if k == b), None)
            if found is not None:
                slot = found
            else:
                slot = {}
                self._buckets.append((b, slot))
                self._buckets = deque(sorted(self._buckets, key=lambda x: x[0]))
        provider = rec.get("provider") or "unknown"
        t = slot.get(provider)
        if t is None:
            t = slot[provider] = Totals()
        t.add(rec)

    def totals(self) -> tuple[Totals, dict[str, Totals]]:
        cutoff = int((self._clock() - self.seconds) // self.bucket)
        while self._buckets and self._buckets[0][0] <= cutoff:
            self._buckets.popleft()
        overall = Totals()
        by_provider: dict[str, Totals] = {}
        for _, slot in self._buckets:
            for provider, t in slot.items():
                overall.merge(t)
                by_provider.setdefault(provider, Totals()).merge(t)
        return overall, by_provider


# --- repeated lines --------------------------------------------------------------------
#
# Writers before record ids retried a batch whose write had failed part-way by writing
# the whole batch again: the lines that had made it appear twice, byte for byte, and
# the cut line runs into the retry's first line (that merged line does not parse and
# is counted as corrupt, like any torn line). Both copies of a line come from one
# batch -- what one pass of the event loop logged, plus any backlog held while the
# disk refused writes -- so they are never more than one batch apart: a few lines to
# a few thousand. Remembering the last DEDUPE_WINDOW lines therefore catches them, in
# bounded memory whatever the log's size; only a backlog held through a long outage
# could outgrow the window, and its repeats past it would be counted. Newer records
# carry a unique ``record_id``: a record whose id was seen in that window is the same
# call written twice, whatever its bytes.

DEDUPE_WINDOW = 100_000


class Dedupe:
    """Which of the recent lines and record ids were already seen.

    Keeps 64-bit hashes (Python's keyed SipHash of the bytes), not the lines: 100,000
    of them cost a few MB, and a false match among them is a 1-in-10^14 event. The
    hashes are keyed per process, so a Dedupe never leaves the process that made it.
    ``_select`` inlines both checks; a change here goes there too."""

    __slots__ = ("window", "duplicates", "_lines", "_line_order", "_ids", "_id_order")

    def __init__(self, window: int = DEDUPE_WINDOW) -> None:
        self.window = window
        self.duplicates = 0
        self._lines: set[int] = set()
        self._line_order: deque[int] = deque()
        self._ids: set[int] = set()
        self._id_order: deque[int] = deque()

    def seen_line(self, line: bytes) -> bool:
        """True for a repeat (counted in ``duplicates``); otherwise remembers the line."""
        return self._repeat(hash(line), self._lines, self._line_order)

    def seen_record(self, rec: Mapping[str, Any]) -> bool:
        """True when the record's ``record_id`` was seen; records without one never are."""
        rid = rec.get("record_id")
        if type(rid) is not str or not rid:
            return False
        return self._repeat(hash(rid), self._ids, self._id_order)

    def _repeat(self, h: int, seen: set[int], order: deque[int]) -> bool:
        if h in seen:
            self.duplicates += 1
            return True
        seen.add(h)
        order.append(h)
        if len(order) > self.window:
            seen.discard(order.popleft())  # entries are unique: a repeat is never added
        return False


def iter_jsonl(lines: Iterable[bytes], bad: list[int] | None = None,
               dedupe: Dedupe | None = None) -> Iterator[dict[str, Any]]:
    """Records from raw lines; a torn or corrupt line is counted in ``bad``, never raised.
    A repeated line or record id is skipped (see ``Dedupe``); pass one ``dedupe`` to
    carry what was seen from one file into the next."""
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
        if isinstance(rec, dict):
            if not dd.seen_line(line) and not dd.seen_record(rec):
                yield rec
        elif bad is not None:
            bad[0] += 1


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
# range first reads the lines just before it to recognise repeats (see _primed), so
# the answer is the same for any split. The one thing kept beside the log, the
# roll-up index, is checked against the log's bytes before use (see below).
# =====================================================================================

UTC = timezone.utc

# Cube row layout: counters, then token sums in _TOKEN_FIELDS order.
REQ, ERR, PRICED, UNPRICED, UNKNOWN, COST, IN_COST, OUT_COST = range(8)
_TOK0 = 8
ROW_LEN = _TOK0 + len(_TOKEN_FIELDS)
_T_IN, _T_OUT, _T_TOTAL, _T_CREAD, _T_CWRITE, _T_REASON = range(_TOK0, ROW_LEN)


def totals_from_row(row: Sequence[int]) -> Totals:
    t = Totals(row[REQ], row[ERR], row[PRICED], row[UNPRICED], row[COST], row[IN_COST], row[OUT_COST])
    t.tokens = {name: row[_TOK0 + i] for i, name in enumerate(_TOKEN_FIELDS)}
    t.unknown = row[UNKNOWN]
    return t


def add_row(into: list[int], row: Sequence[int]) -> None:
    for i, v in enumerate(row):
        into[i] += v


# --- time ------------------------------------------------------------------------------

def iso_ms(ts: float, *, ceil: bool = False) -> str:
    """Canonical record timestamp text for an instant; ``ceil`` rounds up to the next
    millisecond so that, records having millisecond precision, ``rec >= bound`` as
    text is exactly ``rec_time >= ts``."""
    ms = math.ceil(ts * 1000) if ceil else math.floor(ts * 1000)
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


# "2026-11-23T18:15:28.893Z": the only form our writer produces. Such strings sort
# as text in time order, which is what lets a line be skipped before it is parsed.
_CANON_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_CANON_TS_AT = re.compile(rb'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
_LINE_HEAD = b'{"schema_version":1,"timestamp":"'
_TS_AT = len(_LINE_HEAD)


def canonical_ts(value: Any) -> str | None:
    """A record's timestamp as canonical UTC text, whatever ISO form it was written in."""
    if not isinstance(value, str):
        return None
    if _CANON_TS.fullmatch(value):
        return value
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # the proxy only ever wrote UTC
    return iso_ms(dt.timestamp())


def ts_to_datetime(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


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
                    if _ROTATED.fullmatch(os.path.basename(sib)[len(base):]) and os.path.isfile(sib):
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
    if line.startswith(_LINE_HEAD):
        return line[_TS_AT : _TS_AT + 24]
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


def records_since(path: str | os.PathLike[str], since: float, slack: float = LATE_SLACK) -> Iterator[dict[str, Any]]:
    """Records of a log and its rotated siblings stamped at or after ``since``, oldest
    file first. Used at start-up (/health window, budgets): bisects to the window and
    skips older lines on their raw bytes, so a month-long log costs only its tail."""
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
                if not is_gzip(p):
                    _seek_since(f, os.fstat(f.fileno()).st_size, seek_to)
                fresh = (line for line in f if (ts := _line_ts(line)) is None or ts >= since_text)
                for rec in iter_jsonl(fresh, dedupe=dedupe):
                    canon = canonical_ts(rec.get("timestamp"))
                    if canon is not None and canon >= since_text.decode():
                        rec["timestamp"] = canon
                        yield rec
        except (OSError, EOFError, zlib.error) as e:
            logging.getLogger("proxy").warning("cannot read %s: %s", p, e)


# --- filters ---------------------------------------------------------------------------

class ModelMatcher:
    """``--model`` semantics: a name matches its own dated snapshots and whatever an alias
    points to, never a longer name (gpt-4o matches gpt-4o-2024-08-06, not gpt-4o-mini).
    A record matches on its requested ``model`` or its ``response_model``."""

    def __init__(self, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = {normalize_model(k): v for k, v in (aliases or {}).items()}
        wanted: set[str] = set()
        for name in names:
            current = normalize_model(name)
            for _ in range(4):  # alias chains, bounded against cycles
                wanted.add(current)
                target = self.aliases.get(current)
                if target is None:
                    break
                current = normalize_model(target)
        self.wanted = frozenset(wanted)
        self._memo: dict[str, bool] = {}

    def name_matches(self, name: Any) -> bool:
        if not isinstance(name, str) or not name:
            return False
        hit = self._memo.get(name)
        if hit is None:
            hit = self._memo[name] = any(c in self.wanted for c in name_candidates(name, self.aliases))
        return hit

    def __call__(self, rec: Mapping[str, Any]) -> bool:
        return self.name_matches(rec.get("model")) or self.name_matches(rec.get("response_model"))


def is_error(rec: Mapping[str, Any]) -> bool:
    status = rec.get("status")
    return bool(rec.get("error")) or (isinstance(status, int) and status >= 400)


def status_matcher(specs: Sequence[str]) -> Callable[[Mapping[str, Any]], bool]:
    """``200``, ``429``, ``4xx``, ``5xx``, ``ok`` or ``error``; several are alternatives."""
    exact: set[int] = set()
    classes: set[int] = set()
    want_ok = want_err = False
    for spec in specs:
        s = spec.strip().lower()
        if s in ("ok", "success"):
            want_ok = True
        elif s in ("error", "errors", "failed"):
            want_err = True
        elif re.fullmatch(r"[1-5]xx", s):
            classes.add(int(s[0]))
        elif re.fullmatch(r"\d{3}", s):
            exact.add(int(s))
        else:
            raise ValueError(f"bad status {spec!r}: use a code (429), a class (5xx), ok or error")

    def match(rec: Mapping[str, Any]) -> bool:
        status = rec.get("status")
        if isinstance(status, int) and (status in exact or status // 100 in classes):
            return True
        if want_ok or want_err:
            err = is_error(rec)
            return (want_err and err) or (want_ok and not err)
        return False

    return match


def tag_value(rec: Mapping[str, Any], key: str) -> Any:
    """A tag, or a top-level attribution field of that name (``team``, ``session_id``),
    which later records carry outside ``tags``."""
    tags = rec.get("tags")
    if isinstance(tags, dict) and key in tags:
        return tags[key]
    if key in _TOP_LEVEL_TAGS:
        return rec.get(key)
    return None


_TOP_LEVEL_TAGS = frozenset({"team", "session_id", "session"})


# --- dimensions --------------------------------------------------------------------------

NONE_LABEL = "(none)"


def _dim_getter(dim: str) -> Callable[[Mapping[str, Any]], Any]:
    if dim.startswith("tag:"):
        key = dim[4:]
        return lambda r: tag_value(r, key) or NONE_LABEL
    simple = {
        "provider": "provider", "provider_type": "provider_type", "family": "provider_type",
        "response_model": "response_model", "user": "user_id", "key": "key_id",
        "endpoint": "endpoint", "service_tier": "service_tier", "finish_reason": "finish_reason",
    }
    if dim in simple:
        field_name = simple[dim]
        return lambda r: r.get(field_name) or NONE_LABEL
    if dim == "model":
        return lambda r: r.get("model") or r.get("response_model") or NONE_LABEL
    if dim == "status":
        return lambda r: str(r.get("status"))
    if dim in ("team", "session"):
        key = "session_id" if dim == "session" else dim
        return lambda r: tag_value(r, key) or NONE_LABEL
    raise ValueError(dim)


TIME_DIMS = ("hour", "day", "week", "month")
RECORD_DIMS = ("provider", "model", "response_model", "provider_type", "user", "key", "endpoint",
               "status", "service_tier", "finish_reason", "team", "session")


def check_dim(dim: str) -> str:
    if dim in TIME_DIMS or dim in RECORD_DIMS or (dim.startswith("tag:") and len(dim) > 4):
        return dim
    raise ValueError(f"unknown group-by {dim!r}; use {', '.join(RECORD_DIMS + TIME_DIMS)} or tag:KEY")


# --- the query ---------------------------------------------------------------------------

@dataclass
class Query:
    """What to read and what to keep. Times are epoch seconds, ``end`` exclusive."""

    start: float | None = None
    end: float | None = None
    providers: Sequence[str] = ()
    models: Sequence[str] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    users: Sequence[str] = ()
    statuses: Sequence[str] = ()
    errors_only: bool = False
    tags: Sequence[tuple[str, str]] = ()
    # Cube dimensions: record dims and at most the time dims; time is kept per UTC
    # hour (or minute, for a --tz with a half-hour offset) and rolled up later.
    dims: Sequence[str] = ("provider", "model")
    tz: tzinfo = UTC
    latency: bool = False  # per (provider, model) latency histograms
    top: int = 0  # keep the N most expensive requests
    pricebook: Any = None  # for cache savings and suggestions; None: derive what we can
    savings: bool = False
    habits: bool = False  # per-model reply-length and cache-use counters, for suggestions

    def record_filter(self) -> Callable[[Mapping[str, Any]], bool] | None:
        tests: list[Callable[[Mapping[str, Any]], bool]] = []
        if self.providers:
            wanted = {p.lower() for p in self.providers}
            tests.append(lambda r: str(r.get("provider") or "").lower() in wanted)
        if self.models:
            tests.append(ModelMatcher(self.models, self.aliases))
        if self.users:
            users = set(self.users)
            tests.append(lambda r: r.get("user_id") in users)
        if self.statuses:
            tests.append(status_matcher(self.statuses))
        if self.errors_only:
            tests.append(is_error)
        if self.tags:
            by_key: dict[str, set[str]] = {}
            for k, v in self.tags:
                by_key.setdefault(k, set()).add(v)
            # Same key repeated: alternatives; different keys: all must hold.
            def has_tag(k: str, vs: set[str]) -> Callable[[Mapping[str, Any]], bool]:
                return lambda r: tag_value(r, k) in vs

            tests.extend(has_tag(k, vs) for k, vs in by_key.items())
        if not tests:
            return None
        if len(tests) == 1:
            return tests[0]
        return lambda r: all(t(r) for t in tests)


def _whole_hour_tz(tz: tzinfo, start: float | None, end: float | None) -> bool:
    probes = [t for t in (start, end) if t is not None] + [time.time()]
    year = datetime.now(UTC).year
    probes += [datetime(year, m, 1, tzinfo=UTC).timestamp() for m in (1, 7)]
    for t in probes:
        off = datetime.fromtimestamp(t, UTC).astimezone(tz).utcoffset()
        if off is not None and off.total_seconds() % 3600:
            return False
    return True


@dataclass(slots=True)
class _Plan:
    lo: str | None
    hi: str | None
    lo_b: bytes | None
    hi_b: bytes | None
    keep: Callable[[Mapping[str, Any]], bool] | None
    key: Callable[[Mapping[str, Any], str], tuple] | None  # None: (provider, model), inlined
    time_width: int  # 0: no time dim; 13: UTC hour; 16: UTC minute
    query: Query
    spans: bool = False  # keep each cell's first and last timestamp (index builds)


def _compile(q: Query) -> _Plan:
    rec_dims = [d for d in q.dims if d not in TIME_DIMS]
    getters = [_dim_getter(d) for d in rec_dims]
    width = 0
    if any(d in TIME_DIMS for d in q.dims):
        width = 13 if _whole_hour_tz(q.tz, q.start, q.end) else 16
    # The key function is the hot path: the common shapes get a closure without loops.
    key: Callable[[Mapping[str, Any], str], tuple] | None
    if rec_dims == ["provider", "model"] and not width:
        key = None  # inlined in _accumulate
    elif rec_dims == ["provider", "model"]:
        def key(r: Mapping[str, Any], ts: str) -> tuple:
            return (r.get("provider") or NONE_LABEL, r.get("model") or r.get("response_model") or NONE_LABEL,
                    ts[:width])
    elif width:
        def key(r: Mapping[str, Any], ts: str) -> tuple:
            return (*[g(r) for g in getters], ts[:width])
    else:
        def key(r: Mapping[str, Any], ts: str) -> tuple:
            return tuple([g(r) for g in getters])
    lo = iso_ms(q.start, ceil=True) if q.start is not None else None
    hi = iso_ms(q.end, ceil=True) if q.end is not None else None
    return _Plan(lo, hi, lo.encode() if lo else None, hi.encode() if hi else None,
                 q.record_filter(), key, width, q)


# --- scan results ------------------------------------------------------------------------

@dataclass
class ScanResult:
    """Everything a scan collected; partial results from workers merge by ``merge``."""

    dims: tuple[str, ...]  # the cube key: record dims, then "_time" if time is kept
    time_width: int = 0
    tz: tzinfo = UTC
    cells: dict[tuple, list[int]] = field(default_factory=dict)
    latency: dict[tuple, dict[int, int]] = field(default_factory=dict)
    top: list[tuple[int, int, dict]] = field(default_factory=list)
    top_n: int = 0
    # Cache savings: tokens read from cache, by the rate difference (USD per 1M) they saved.
    savings_by_rate: dict[Decimal, int] = field(default_factory=dict)
    savings_derived_units: int = 0  # from the record's own cost where the family fixes the cache rate
    savings_unpriced_tokens: int = 0  # cache reads we could not price
    habits: dict[tuple, list[int]] = field(default_factory=dict)
    spans: dict[tuple, list[str]] = field(default_factory=dict)  # cell -> [first ts, last ts]
    bad_lines: int = 0
    duplicate_lines: int = 0  # repeats of a recent line or record id, skipped (see Dedupe)
    broken_files: list[str] = field(default_factory=list)
    lines: int = 0  # lines read, in or out of the window
    first_ts: str | None = None
    last_ts: str | None = None
    files: list[Path] = field(default_factory=list)

    def merge(self, o: "ScanResult") -> None:
        for k, row in o.cells.items():
            mine = self.cells.get(k)
            if mine is None:
                self.cells[k] = row
            else:
                add_row(mine, row)
        for k, hist in o.latency.items():
            mine_h = self.latency.setdefault(k, {})
            for ms, n in hist.items():
                mine_h[ms] = mine_h.get(ms, 0) + n
        if o.top:
            self.top = heapq.nlargest(self.top_n, self.top + o.top)
        for rate, n in o.savings_by_rate.items():
            self.savings_by_rate[rate] = self.savings_by_rate.get(rate, 0) + n
        self.savings_derived_units += o.savings_derived_units
        self.savings_unpriced_tokens += o.savings_unpriced_tokens
        for k, row in o.habits.items():
            mine_r = self.habits.get(k)
            if mine_r is None:
                self.habits[k] = row
            else:
                add_row(mine_r, row)
        for k, (a, b) in o.spans.items():
            sp = self.spans.get(k)
            if sp is None:
                self.spans[k] = [a, b]
            else:
                sp[0], sp[1] = min(sp[0], a), max(sp[1], b)
        self.bad_lines += o.bad_lines
        self.duplicate_lines += o.duplicate_lines
        self.broken_files += o.broken_files
        self.lines += o.lines
        if o.first_ts and (self.first_ts is None or o.first_ts < self.first_ts):
            self.first_ts = o.first_ts
        if o.last_ts and (self.last_ts is None or o.last_ts > self.last_ts):
            self.last_ts = o.last_ts

    # -- views --

    def totals(self) -> Totals:
        row = [0] * ROW_LEN
        for r in self.cells.values():
            add_row(row, r)
        return totals_from_row(row)

    def time_label(self, key: str, dim: str) -> str:
        """The local-time bucket of a UTC hour ("2026-11-23T18") or minute key."""
        if len(key) == 13:
            dt = datetime(int(key[:4]), int(key[5:7]), int(key[8:10]), int(key[11:13]), tzinfo=UTC)
        else:
            dt = datetime(int(key[:4]), int(key[5:7]), int(key[8:10]), int(key[11:13]), int(key[14:16]), tzinfo=UTC)
        return time_bucket(dt.astimezone(self.tz), dim)

    def rollup(self, dims: Sequence[str]) -> dict[tuple, Totals]:
        """Totals per combination of ``dims`` (any of the cube's record dims and time dims)."""
        rows: dict[tuple, list[int]] = {}
        idx: list[tuple[str, Any]] = []  # ("r", position in the key) or ("t", time dim)
        for d in dims:
            if d in TIME_DIMS:
                if not self.time_width:
                    raise ValueError(f"scan kept no time dimension for {d!r}")
                idx.append(("t", d))
            else:
                idx.append(("r", self.dims.index(d)))
        t_pos = len(self.dims) - 1
        memo: dict[tuple[str, str], str] = {}
        for key, row in self.cells.items():
            parts = []
            for kind, what in idx:
                if kind == "r":
                    parts.append(key[what])
                else:
                    mk = (key[t_pos], what)
                    label = memo.get(mk)
                    if label is None:
                        label = memo[mk] = self.time_label(key[t_pos], what)
                    parts.append(label)
            k = tuple(parts)
            mine = rows.get(k)
            if mine is None:
                rows[k] = list(row)
            else:
                add_row(mine, row)
        return {k: totals_from_row(r) for k, r in rows.items()}

    def latency_for(self, by: str) -> dict[str, tuple[int, int, int, float | None, float | None]]:
        """Per provider or per model: (requests, errors, latency count, p50 ms, p95 ms)."""
        pos = 0 if by == "provider" else 1
        hists: dict[str, dict[int, int]] = {}
        for (provider, model), hist in self.latency.items():
            h = hists.setdefault((provider, model)[pos], {})
            for ms, n in hist.items():
                h[ms] = h.get(ms, 0) + n
        counts = self.rollup([by])
        out = {}
        for (name,), t in counts.items():
            h = hists.get(name, {})
            n = sum(h.values())
            out[name] = (t.requests, t.errors, n, percentile(h, 50), percentile(h, 95))
        return out

    def time_buckets(self) -> dict[datetime, int]:
        """Cost units per kept time bucket, keyed by the bucket's (UTC) start."""
        out: dict[datetime, int] = {}
        for key, row in self.cells.items():
            k = key[-1]
            dt = datetime(int(k[:4]), int(k[5:7]), int(k[8:10]), int(k[11:13]),
                          int(k[14:16]) if len(k) > 13 else 0, tzinfo=UTC)
            out[dt] = out.get(dt, 0) + row[COST]
        return out

    def top_requests(self) -> list[dict]:
        return [rec for _, _, rec in sorted(self.top, key=lambda x: (-x[0], x[1]))]


def time_bucket(dt: datetime, dim: str) -> str:
    if dim == "hour":
        return dt.strftime("%Y-%m-%d %H:00")
    if dim == "day":
        return dt.strftime("%Y-%m-%d")
    if dim == "week":
        monday = dt.date() - timedelta(days=dt.weekday())
        return f"{monday.isoformat()} (W{dt.isocalendar().week:02d})"
    if dim == "month":
        return dt.strftime("%Y-%m")
    raise ValueError(dim)


def percentile(hist: Mapping[int, int], p: float) -> float | None:
    """Nearest-rank percentile of a histogram of whole milliseconds (exact at that
    resolution; memory is one entry per distinct millisecond, not per request)."""
    n = sum(hist.values())
    if not n:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= rank:
            return float(ms)
    return None  # pragma: no cover


# --- savings and habits (per record, only when asked) --------------------------------------

SHORT_REPLY_TOKENS = 100
LONG_PROMPT_TOKENS = 1024


class _CacheRates:
    """Per record: how much each cache-read token saved (input rate minus cached rate).
    Resolved from the price book once per (provider, model, tier, hour) and memoized."""

    def __init__(self, book: Any) -> None:
        from . import pricing

        self.book = book
        self.pricing = pricing
        self.memo: dict[tuple, Any] = {}

    def diff(self, rec: Mapping[str, Any], ts: str) -> Decimal | None:
        input_tokens = rec.get("input_tokens") or 0
        key = (rec.get("provider"), rec.get("provider_type"), rec.get("response_model"), rec.get("model"),
               rec.get("service_tier"), rec.get("speed"), ts[:13])
        cached = self.memo.get(key, False)
        if cached is False:
            cached = self.memo[key] = self._resolve(key)
        if cached is None:
            return None
        for above, d in cached:  # highest tier first
            if input_tokens > above:
                return d
        return None

    def _resolve(self, key: tuple) -> list[tuple[int, Decimal]] | None:
        provider, family, response_model, model, tier, speed, hour = key
        if self.book is None or not provider:
            return None
        pr = self.pricing
        price = self.book.resolve(provider, response_model, model, family=family)
        if price is None:
            return None
        when = datetime.fromisoformat(hour + ":00:00+00:00")
        rules = pr.FAMILY_RULES.get(family or "", pr.FamilyRules())
        variants = pr.price_variants(tier, speed) if hasattr(pr, "price_variants") else tier
        out = []
        # Probe each long-context tier boundary: rates are a step function of input size.
        period = price.period_at(when)
        card = getattr(period, "card", period)
        aboves = sorted({-1, *(t.above for t in getattr(card, "tiers", ()))}, reverse=True)
        for above in aboves:
            usage = _usage_with_input(above + 1)
            got = pr.select_rates(price, usage, when, variants)
            rates = got[0] if isinstance(got, tuple) else got
            cached_rate = rates.cached_input
            if cached_rate is None:
                cached_rate = rates.input * rules.cached_input if rules.cached_input is not None else rates.input
            out.append((above, rates.input - cached_rate))
        return out


def _usage_with_input(n: int) -> Any:
    from .usage import Usage

    return Usage(input_tokens=n)


def _derived_savings_units(rec: Mapping[str, Any]) -> int | None:
    """Without a price: families whose cache rates are fixed multiples of the input rate
    (Anthropic) let the record's own input cost give its input rate, hence its savings."""
    from .pricing import FAMILY_RULES

    rules = FAMILY_RULES.get(rec.get("provider_type") or "")
    ic = rec.get("input_cost")
    if rules is None or rules.cached_input is None or not ic:
        return None
    read = rec.get("cache_read_tokens") or 0
    write = rec.get("cache_write_tokens") or 0
    w1h = min(rec.get("cache_write_1h_tokens") or 0, write)
    uncached = max(0, (rec.get("input_tokens") or 0) - read - write)
    weighted = (uncached + read * rules.cached_input + (write - w1h) * (rules.cache_write or 1)
                + w1h * (rules.cache_write_1h or 1))
    if not weighted:
        return None
    input_cost = Decimal(repr(ic)) if isinstance(ic, float) else Decimal(ic)
    saved = input_cost * read * (1 - rules.cached_input) / weighted
    return int(saved.scaleb(10).to_integral_value())


# Habit row: ok calls, short replies (n, input, output, cost units), long prompts (n, input, cached)
H_OK, H_SHORT, H_SHORT_IN, H_SHORT_OUT, H_SHORT_COST, H_LONG, H_LONG_IN, H_LONG_CACHED = range(8)


# --- the scan ------------------------------------------------------------------------------

def _select(lines: Iterable[bytes], plan: _Plan, res: ScanResult,
            dedupe: Dedupe | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Records in the window that pass the filters, with their canonical timestamps.
    Corrupt lines are counted in ``res.bad_lines``, repeats (``Dedupe``) in
    ``res.duplicate_lines``; lines outside the window are skipped unparsed (so a
    corrupt one there is not counted, and a repeat of one, having the same bytes and
    so the same time, is skipped with it)."""
    dd = Dedupe() if dedupe is None else dedupe
    # Dedupe.seen_line and seen_record, inlined: this loop is the hot path.
    line_seen, line_order, id_seen, id_order, window = dd._lines, dd._line_order, dd._ids, dd._id_order, dd.window
    dups = 0
    loads = orjson.loads
    DecodeError = orjson.JSONDecodeError
    head, at = _LINE_HEAD, _TS_AT
    canon_at = _CANON_TS_AT.match
    lo_b, hi_b, lo, hi, keep = plan.lo_b, plan.hi_b, plan.lo, plan.hi, plan.keep
    bounded = lo_b is not None or hi_b is not None
    n = bad = 0
    try:
        for line in lines:
            n += 1
            if bounded and line.startswith(head):
                ts_b = line[at:at + 24]
                # Skip on the raw bytes only for a canonical timestamp, whose text order
                # is time order; anything else is parsed and judged below.
                if ((lo_b is not None and ts_b < lo_b) or (hi_b is not None and ts_b >= hi_b)) \
                        and canon_at(line, at):
                    continue
            try:
                rec = loads(line)
            except DecodeError:
                if line.strip():
                    bad += 1
                continue
            if type(rec) is not dict:
                bad += 1
                continue
            h = hash(line)
            if h in line_seen:
                dups += 1
                continue
            line_seen.add(h)
            line_order.append(h)
            if len(line_order) > window:
                line_seen.discard(line_order.popleft())
            rid = rec.get("record_id")
            if type(rid) is str and rid:
                h = hash(rid)
                if h in id_seen:
                    dups += 1
                    continue
                id_seen.add(h)
                id_order.append(h)
                if len(id_order) > window:
                    id_seen.discard(id_order.popleft())
            ts = rec.get("timestamp")
            if not (type(ts) is str and len(ts) == 24 and ts[19] == "." and ts[23] == "Z" and ts[10] == "T"):
                ts = canonical_ts(ts)
                if ts is None:
                    bad += 1  # a record that cannot be placed in time cannot be reported
                    continue
            if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
                continue
            if keep is not None and not keep(rec):
                continue
            yield rec, ts
    finally:
        res.lines += n
        res.bad_lines += bad
        dd.duplicates += dups
        res.duplicate_lines += dups


_MEASURE_FIELDS = ("status", "error", "total_cost", "input_cost", "output_cost", *_TOKEN_FIELDS)
# One C call fetches every field a row needs from a complete record; older records
# missing a field take the .get() path.
_measures = operator.itemgetter(*_MEASURE_FIELDS)


def _accumulate(lines: Iterable[bytes], plan: _Plan, res: ScanResult, dedupe: Dedupe | None = None) -> None:
    q = plan.query
    cells = res.cells
    keyf = plan.key
    units = COST_UNITS_PER_USD
    want_lat, top_n, want_sav, want_habits = q.latency, q.top, q.savings, q.habits
    lat = res.latency
    top = res.top
    seq = 0
    rates = _CacheRates(q.pricebook) if want_sav else None
    first = last = None
    measures = _measures
    want_spans, spans = plan.spans, res.spans
    for rec, ts in _select(lines, plan, res, dedupe):
        if first is None or ts < first:
            first = ts
        if last is None or ts > last:
            last = ts
        if keyf is None:
            key = (rec.get("provider") or NONE_LABEL, rec.get("model") or rec.get("response_model") or NONE_LABEL)
        else:
            key = keyf(rec, ts)
        row = cells.get(key)
        if row is None:
            row = cells[key] = [0] * ROW_LEN
        try:
            status, error, cost, ic, oc, t_in, t_out, t_total, cread, cwrite, reason = measures(rec)
        except KeyError:
            status, error, cost, ic, oc, t_in, t_out, t_total, cread, cwrite, reason = [
                rec.get(f) for f in _MEASURE_FIELDS]
        row[REQ] += 1
        if error or (type(status) is int and status >= 400):
            row[ERR] += 1
        if cost is None:
            if t_total:
                row[UNPRICED] += 1
            elif t_total is None:
                row[UNKNOWN] += 1
            cu = 0
        else:
            row[PRICED] += 1
            cu = round(cost * units)
            row[COST] += cu
            if ic:
                row[IN_COST] += round(ic * units)
            if oc:
                row[OUT_COST] += round(oc * units)
        if t_in:
            row[_T_IN] += t_in
        if t_out:
            row[_T_OUT] += t_out
        if t_total:
            row[_T_TOTAL] += t_total
        if cread:
            row[_T_CREAD] += cread
        if cwrite:
            row[_T_CWRITE] += cwrite
        if reason:
            row[_T_REASON] += reason
        if want_lat:
            ms = rec.get("latency_ms")
            if ms is not None:
                lk = (rec.get("provider") or NONE_LABEL, rec.get("model") or rec.get("response_model") or NONE_LABEL)
                h = lat.get(lk)
                if h is None:
                    h = lat[lk] = {}
                ms = int(ms + 0.5)
                h[ms] = h.get(ms, 0) + 1
        if top_n and cu:
            seq += 1
            if len(top) < top_n:
                heapq.heappush(top, (cu, -seq, _top_fields(rec)))
            elif cu > top[0][0]:
                heapq.heapreplace(top, (cu, -seq, _top_fields(rec)))
        if want_sav and cread and rates is not None:
            d = rates.diff(rec, ts)
            if d is not None:
                res.savings_by_rate[d] = res.savings_by_rate.get(d, 0) + cread
            else:
                derived = _derived_savings_units(rec)
                if derived is None:
                    res.savings_unpriced_tokens += cread
                else:
                    res.savings_derived_units += derived
        if want_habits and cost is not None:
            _add_habit(res.habits, rec, cu)
        if want_spans:
            sp = spans.get(key)
            if sp is None:
                spans[key] = [ts, ts]
            elif ts < sp[0]:
                sp[0] = ts
            elif ts > sp[1]:
                sp[1] = ts
    if first is not None and (res.first_ts is None or first < res.first_ts):
        res.first_ts = first
    if last is not None and (res.last_ts is None or last > res.last_ts):
        res.last_ts = last


def _add_habit(habits: dict[tuple, list[int]], rec: Mapping[str, Any], cu: int) -> None:
    status = rec.get("status")
    if rec.get("error") or not isinstance(status, int) or status >= 400:
        return
    out = rec.get("output_tokens") or 0
    inp = rec.get("input_tokens") or 0
    key = (rec.get("provider") or NONE_LABEL, rec.get("provider_type") or "",
           rec.get("model") or rec.get("response_model") or NONE_LABEL)
    h = habits.get(key)
    if h is None:
        h = habits[key] = [0] * 8
    h[H_OK] += 1
    if 0 < out <= SHORT_REPLY_TOKENS:
        h[H_SHORT] += 1
        h[H_SHORT_IN] += inp
        h[H_SHORT_OUT] += out
        h[H_SHORT_COST] += cu
    if inp >= LONG_PROMPT_TOKENS:
        h[H_LONG] += 1
        h[H_LONG_IN] += inp
        h[H_LONG_CACHED] += rec.get("cache_read_tokens") or 0


_TOP_KEEP = ("timestamp", "request_id", "provider", "model", "response_model", "user_id", "endpoint",
             "input_tokens", "output_tokens", "cache_read_tokens", "total_cost", "status", "tags")


def _top_fields(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in _TOP_KEEP}


# --- reading files, in parallel when it pays -------------------------------------------------

_CHUNK = 32 << 20  # bytes per parallel task: small enough to balance two cores
_PARALLEL_MIN = 24 << 20  # below this, forking costs more than it saves

_WORKER_PLAN: _Plan | None = None  # set before forking; workers inherit it


def _lines_in_range(f: IO[bytes], start: int, end: int) -> Iterator[bytes]:
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
_DEDUPE_OVERLAP = 1 << 20


def _primed(f: IO[bytes], plan: _Plan, start: int) -> Dedupe:
    """A Dedupe that has seen the lines up to ``_DEDUPE_OVERLAP`` bytes before ``start``,
    judged as the range's own lines are, so any split gives the same answer."""
    dd = Dedupe()
    if start > 0:
        begin = max(0, start - _DEDUPE_OVERLAP)
        f.seek(begin)  # (_lines_in_range seeks itself only past byte 0)
        scratch = _new_result(plan)
        for _ in _select(_lines_in_range(f, begin, start), plan, scratch, dd):
            pass
    return dd


def _scan_task(task: tuple[str, int, int | None]) -> ScanResult:
    plan = _WORKER_PLAN
    assert plan is not None
    path, start, end = task
    res = _new_result(plan)
    try:
        with open_log(Path(path)) as f:
            if end is None:
                _accumulate(f, plan, res)
            else:
                dedupe = _primed(f, plan, start)
                _accumulate(_lines_in_range(f, start, end), plan, res, dedupe)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        # A truncated or damaged gzip: keep what was read, say so.
        res.broken_files.append(f"{path}: {type(e).__name__}: {e}")
    return res


def _new_result(plan: _Plan) -> ScanResult:
    q = plan.query
    dims = tuple(d for d in q.dims if d not in TIME_DIMS) + (("_time",) if plan.time_width else ())
    return ScanResult(dims=dims, time_width=plan.time_width, tz=q.tz, top_n=q.top)


def _tasks(paths: Sequence[Path], plan: _Plan, chunk: int) -> list[tuple[str, int, int | None]]:
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


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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

INDEX_VERSION = 2  # 2: repeated lines skipped (an index of version 1 counted them)
_SEGMENT = 16 << 20  # bytes per indexed segment
_MIN_SEGMENT = 4 << 20  # a shorter tail is read raw each run rather than indexed
_INDEX_DIMS = ("provider", "provider_type", "model", "response_model", "endpoint", "status")
_INDEX_FILTERABLE = frozenset(("provider", "model", "response_model", "provider_type", "endpoint", "status"))


def index_path(log: Path) -> Path:
    return log.with_name(f".{log.name}.rollup")


def _index_key(r: Mapping[str, Any], ts: str) -> tuple:
    status = r.get("status")
    return (r.get("provider"), r.get("provider_type"), r.get("model"), r.get("response_model"), r.get("endpoint"),
            status, 1 if (r.get("error") or (type(status) is int and status >= 400)) else 0, ts[:13])


def _index_plan() -> _Plan:
    return _Plan(None, None, None, None, None, _index_key, 13, Query(dims=()), spans=True)


def index_answers(q: Query, plan: _Plan) -> bool:
    """Whether the roll-ups hold everything this query needs."""
    dims_ok = all(d in TIME_DIMS or d in _INDEX_FILTERABLE for d in q.dims)
    return (dims_ok and plan.time_width in (0, 13) and not (q.users or q.tags or q.latency or q.top
                                                             or q.savings or q.habits))


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
    return ("raw", path, _scan_task((path, task[2], task[3])))


def _build_segment(path: str, a: int, b: int | None, gz: bool) -> dict[str, Any]:
    """Roll-ups of the lines starting in [a, b), or of a whole gzip file."""
    plan = _index_plan()
    res = _new_result(plan)
    digest = hashlib.sha1(usedforsecurity=False)
    start = end_byte = 0
    complete = True
    try:
        with open_log(Path(path)) as f:
            dedupe = _primed(f, plan, a) if not gz else Dedupe()
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

            _accumulate(owned(), plan, res, dedupe)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        res.broken_files.append(f"{path}: {type(e).__name__}: {e}")
        complete = False
    if gz and not res.broken_files:
        with open(path, "rb") as raw:  # a gzip file is verified by its compressed bytes
            for block in iter(lambda: raw.read(8 << 20), b""):
                digest.update(block)
        end_byte = os.path.getsize(path)
    cells = [[*k, *row, *res.spans[k]] for k, row in res.cells.items()]
    return {"a": start, "b": end_byte, "sha1": digest.hexdigest(), "lines": res.lines, "bad": res.bad_lines,
            "dup": res.duplicate_lines, "first": res.first_ts, "last": res.last_ts, "cells": cells,
            "complete": complete and not res.broken_files, "broken": res.broken_files}


def _use_segment(seg: Mapping[str, Any], plan: _Plan, res: ScanResult) -> None:
    """Add an indexed segment that lies wholly inside the window to ``res``."""
    keep, keyf = plan.keep, plan.key
    nd = len(_INDEX_DIMS)
    for cell in seg["cells"]:
        provider, family, model, response_model, endpoint, status, err, hour = cell[:nd + 2]
        rec = {"provider": provider, "provider_type": family, "model": model, "response_model": response_model,
               "endpoint": endpoint, "status": status, "error": "error" if err else None}
        if keep is not None and not keep(rec):
            continue
        if keyf is None:
            key: tuple = (provider or NONE_LABEL, model or response_model or NONE_LABEL)
        else:
            key = keyf(rec, hour)
        row = cell[nd + 2:nd + 2 + ROW_LEN]
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


def _scan_indexed(paths: Sequence[Path], plan: _Plan, jobs: int) -> ScanResult:
    q = plan.query
    res = _new_result(plan)
    res.files = list(paths)
    lo, hi = plan.lo, plan.hi
    files: dict[str, dict[str, Any]] = {}
    tasks: list[tuple] = []
    for p in paths:
        st = p.stat()
        if q.start is not None and st.st_mtime < q.start - 86400:
            continue  # see _tasks: a file last written before the window holds nothing in it
        key = str(p)
        gz = is_gzip(p)
        stat = _file_stat(st)
        data = _load_index(p)
        segs = list(data["segments"]) if data else []
        if data and data.get("stat", [None, None])[:2] != stat[:2]:
            segs = []  # another file now has this name (rotation): start over
        if segs and segs[-1]["b"] > st.st_size:
            segs = []  # the file shrank: it was rewritten
        info = {"path": p, "stat": stat, "gz": gz, "segs": segs, "new": [], "changed": data is None or
                data.get("stat") != stat, "verified": True}
        files[key] = info
        if segs and data and data.get("stat") != stat:  # segs come from data
            for seg in segs:
                tasks.append(("verify", key, seg["a"], seg["b"], seg["sha1"], gz))
        start = segs[-1]["b"] if segs else 0
        if gz:
            if not segs:
                tasks.append(("build", key, 0, None, True))
        else:
            for s in range(start, st.st_size, _SEGMENT):
                tasks.append(("build", key, s, min(s + _SEGMENT, st.st_size), False))
    results = _run_tasks(_index_task, tasks, jobs)
    rebuild: list[tuple] = []
    for kind, key, *rest in results:
        info = files[key]
        if kind == "verify" and not rest[1] and info["verified"]:
            info["verified"] = False  # some byte changed: distrust the whole index of this file
            info["segs"], info["new"], info["changed"] = [], [], True
            st_size = info["stat"][2]
            if info["gz"]:
                rebuild.append(("build", key, 0, None, True))
            else:
                rebuild += [("build", key, s, min(s + _SEGMENT, st_size), False) for s in range(0, st_size, _SEGMENT)]
        elif kind == "build" and info["verified"]:
            info["new"].append(rest[0])
    for kind, key, *rest in _run_tasks(_index_task, rebuild, jobs):
        files[key]["new"].append(rest[0])
    raw: list[tuple] = []
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
            elif (lo is None or first >= lo) and (hi is None or last < hi):
                _use_segment(seg, plan, res)
            else:
                raw.append(("raw", key, seg["a"], None if info["gz"] else seg["b"]))
        keep_segs: list[dict[str, Any]] = []
        if info["changed"] or info["new"]:
            for seg in segs:  # index only whole, complete segments, contiguous from byte 0
                if not seg.get("complete", True) or seg["a"] != (keep_segs[-1]["b"] if keep_segs else 0):
                    break
                if not info["gz"] and seg is segs[-1] and seg in info["new"] and seg["b"] - seg["a"] < _MIN_SEGMENT:
                    break
                keep_segs.append({k: v for k, v in seg.items() if k not in ("complete", "broken")})
            if info["changed"] or len(keep_segs) > len(info["segs"]):
                _save_index(info["path"], info["stat"], keep_segs)
    global _WORKER_PLAN
    _WORKER_PLAN = plan
    try:
        for _, _, part in _run_tasks(_index_task, raw, jobs):
            res.merge(part)
    finally:
        _WORKER_PLAN = None
    return res


def _run_tasks(fn: Callable[[Any], Any], tasks: list[Any], jobs: int) -> list[Any]:
    if jobs > 1 and len(tasks) > 1 and "fork" in _mp_methods():
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            return list(pool.imap_unordered(fn, tasks))
    return [fn(t) for t in tasks]


def scan(paths: Sequence[Path], query: Query, jobs: int | None = None, use_index: bool = True) -> ScanResult:
    """Aggregate the records of ``paths`` that ``query`` selects (from the roll-up
    index where it answers the query and ``use_index``; the answer is the same)."""
    global _WORKER_PLAN
    plan = _compile(query)
    jobs = default_jobs() if jobs is None else jobs
    if use_index and index_answers(query, plan):
        return _scan_indexed(paths, plan, jobs)
    total = sum(p.stat().st_size for p in paths)
    chunk = _CHUNK if jobs > 1 and total >= _PARALLEL_MIN else 1 << 62
    tasks = _tasks(paths, plan, chunk)
    res = _new_result(plan)
    res.files = list(paths)
    _WORKER_PLAN = plan
    try:
        if jobs > 1 and len(tasks) > 1 and "fork" in _mp_methods():
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
                for part in pool.imap_unordered(_scan_task, tasks):
                    res.merge(part)
        else:
            for task in tasks:
                res.merge(_scan_task(task))
    finally:
        _WORKER_PLAN = None
    return res


def _mp_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def iter_selected(paths: Sequence[Path], query: Query, res: ScanResult | None = None) -> Iterator[dict[str, Any]]:
    """The selected records themselves, file by file in the given order (for per-request
    output). Counts go to ``res`` when given."""
    plan = _compile(replace(query, dims=()))
    res = res if res is not None else _new_result(plan)
    lo = query.start
    dedupe = Dedupe()  # one pass over the files in order: a repeat across a rotation is caught too
    for p in paths:
        if lo is not None and p.stat().st_mtime < lo - 86400:
            continue
        try:
            with open_log(p) as f:
                for rec, ts in _select(f, plan, res, dedupe):
                    if res.first_ts is None or ts < res.first_ts:
                        res.first_ts = ts
                    if res.last_ts is None or ts > res.last_ts:
                        res.last_ts = ts
                    yield rec
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            res.broken_files.append(f"{p}: {type(e).__name__}: {e}")


# --- projections -----------------------------------------------------------------------------

@dataclass
class Projection:
    month: str  # "2026-11", in the report's time zone
    days_in_month: int
    month_to_date_units: int | None  # None: the data does not reach back to the month's start
    recent_units: int  # cost over the recent span the rate is taken from
    recent_seconds: float
    remaining_seconds: float
    projected_units: int

    @property
    def daily_rate_units(self) -> int:
        return round(self.recent_units * 86400 / self.recent_seconds) if self.recent_seconds else 0


def project_month(buckets: Mapping[datetime, int], window_start: datetime, window_end: datetime,
                  tz: tzinfo = UTC, bucket_seconds: int = 3600, recent_days: int = 7) -> Projection:
    """The month (in ``tz``) of ``window_end``: its cost so far plus the recent rate for the
    time left. ``buckets`` maps each time bucket's start (aware, UTC-aligned) to its cost
    units. The recent rate is the cost of the last ``recent_days`` of the window, taken
    from the start of the bucket holding that instant (or the window's start if later),
    over the exact time that spans, so it never mixes a partial bucket with a whole one."""
    end_local = window_end.astimezone(tz)
    month_start = end_local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ndays = monthrange(end_local.year, end_local.month)[1]
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    cut = (window_end - timedelta(days=recent_days)).timestamp()
    cut_bucket = datetime.fromtimestamp(cut - cut % bucket_seconds, UTC)
    span_start = max(window_start, cut_bucket)
    recent = sum(v for b, v in buckets.items() if b >= cut_bucket)
    span = max((window_end - span_start).total_seconds(), 1.0)
    remaining = max(0.0, (next_month - end_local).total_seconds())
    mtd: int | None
    if window_start <= month_start:
        mtd = sum(v for b, v in buckets.items() if b >= month_start)
        projected = mtd + round(recent * remaining / span)
    else:
        mtd = None
        projected = round(recent * ndays * 86400 / span)
    return Projection(month_start.strftime("%Y-%m"), ndays, mtd, recent, span, remaining, projected)
