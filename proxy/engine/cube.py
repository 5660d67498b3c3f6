"""The cube a scan fills (``ScanResult``: rows of integer counters per key) and its views:
roll-ups, time buckets, latency percentiles."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

from proxy.core.timestamps import UTC
from proxy.engine.insights import HabitKey
from proxy.engine.query import LATENCY_DIM, NONE_LABEL, TIME_DIMS, CellKey, Plan
from proxy.engine.totals import TOKEN_FIELDS, Totals

# Cube row layout: counters, then token sums in TOKEN_FIELDS order.
REQ, ERR, PRICED, UNPRICED, UNKNOWN, COST, IN_COST, OUT_COST = range(8)
_TOK0 = 8
ROW_LEN = _TOK0 + len(TOKEN_FIELDS)
T_IN, T_OUT, T_TOTAL, T_CREAD, T_CWRITE, T_REASON = range(_TOK0, ROW_LEN)


def totals_from_row(row: Sequence[int]) -> Totals:
    t = Totals(row[REQ], row[ERR], row[PRICED], row[UNPRICED], row[COST], row[IN_COST], row[OUT_COST])
    t.tokens = {name: row[_TOK0 + i] for i, name in enumerate(TOKEN_FIELDS)}
    t.unknown = row[UNKNOWN]
    return t


def add_row(into: list[int], row: Sequence[int]) -> None:
    for i, v in enumerate(row):
        into[i] += v


# --- scan results ------------------------------------------------------------------------

# Latency histograms are kept per (provider, model), as the records name them (JSON
# values; NONE_LABEL for a missing one).
LatencyKey = tuple[Any, Any]
# One of the most expensive requests: (cost units, -sequence, the record's kept fields).
TopEntry = tuple[int, int, dict[str, Any]]


@dataclass
class ScanResult:
    """Everything a scan collected; partial results from workers merge by ``merge``."""

    dims: tuple[str, ...]  # the cube key: record dims, then "_time" if time is kept
    time_width: int = 0
    tz: tzinfo = UTC
    cells: dict[CellKey, list[int]] = field(default_factory=dict)
    latency: dict[LatencyKey, dict[int, int]] = field(default_factory=dict)
    ttft: dict[LatencyKey, dict[int, int]] = field(default_factory=dict)  # time to first byte, kept with latency
    top: list[TopEntry] = field(default_factory=list)
    top_n: int = 0
    # Cache savings: tokens read from cache, by the rate difference (USD per 1M) they saved.
    savings_by_rate: dict[Decimal, int] = field(default_factory=dict)
    savings_derived_units: int = 0  # from the record's own cost where the family fixes the cache rate
    savings_unpriced_tokens: int = 0  # cache reads we could not price
    habits: dict[HabitKey, list[int]] = field(default_factory=dict)
    spans: dict[CellKey, list[str]] = field(default_factory=dict)  # cell -> [first ts, last ts]
    bad_lines: int = 0
    duplicate_lines: int = 0  # repeats of a recent line or record id, skipped (see Dedupe)
    broken_files: list[str] = field(default_factory=list)
    lines: int = 0  # lines read, in or out of the window
    first_ts: str | None = None
    last_ts: str | None = None
    files: list[Path] = field(default_factory=list)

    def merge(self, o: "ScanResult") -> None:
        # Rows are copied, never shared: ``o`` may be kept and merged again (storage/memo.py).
        for k, row in o.cells.items():
            mine = self.cells.get(k)
            if mine is None:
                self.cells[k] = list(row)
            else:
                add_row(mine, row)
        for mine_hists, theirs in ((self.latency, o.latency), (self.ttft, o.ttft)):
            for k, hist in theirs.items():
                mine_h = mine_hists.setdefault(k, {})
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
                self.habits[k] = list(row)
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

    def rollup(self, dims: Sequence[str]) -> dict[CellKey, Totals]:
        """Totals per combination of ``dims`` (any of the cube's record dims and time dims)."""
        rows: dict[CellKey, list[int]] = {}
        idx: list[int | str] = []  # a record dim's position in the key, or a time dim
        for d in dims:
            if d in TIME_DIMS:
                if not self.time_width:
                    raise ValueError(f"scan kept no time dimension for {d!r}")
                idx.append(d)
            else:
                idx.append(self.dims.index(d))
        t_pos = len(self.dims) - 1
        memo: dict[tuple[str, str], str] = {}
        for key, row in self.cells.items():
            parts = []
            for what in idx:
                if isinstance(what, int):
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

    def latency_for(self, by: str, *, ttft: bool = False) -> dict[str, tuple[int, int, int, float | None, float | None]]:
        """Per provider or per model: (requests, errors, latency count, p50 ms, p95 ms);
        ``ttft``: of the time to the first byte instead."""
        pos = 0 if by == "provider" else 1
        hists: dict[str, dict[int, int]] = {}
        for (provider, model), hist in (self.ttft if ttft else self.latency).items():
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

    def latency_by(
        self, dims: Sequence[str], hist_dim: str = LATENCY_DIM
    ) -> dict[CellKey, tuple[int, int, int, float | None, float | None]]:
        """Per group of ``dims`` (a cube that kept them and ``hist_dim``, LATENCY_DIM or
        TTFT_DIM): (requests, errors, calls with a time, p50 ms, p95 ms), as
        ``latency_for`` gives them per provider or model."""
        hists: dict[CellKey, dict[int, int]] = {}
        for key, t in self.rollup([*dims, hist_dim]).items():
            if key[-1] != NONE_LABEL:
                h = hists.setdefault(key[:-1], {})
                h[key[-1]] = h.get(key[-1], 0) + t.requests
        out = {}
        for key, t in self.rollup(dims).items():
            h = hists.get(key, {})
            out[key] = (t.requests, t.errors, sum(h.values()), percentile(h, 50), percentile(h, 95))
        return out

    def holds(self, lo: float | None, hi: float | None, start: float, end: float) -> bool:
        """Whether a scan of window [lo, hi) that kept UTC hours holds every record of
        [start, end), whole hours: then ``totals_between`` is that period's scan."""
        whole = start % 3600 == 0 and end % 3600 == 0
        return self.time_width == 13 and whole and (lo is None or lo <= start) and (hi is None or end <= hi)

    def totals_between(self, start: float, end: float) -> Totals:
        """Totals of the cells whose UTC hour lies in [start, end) (``holds`` says when
        that is exact)."""
        lo = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H")
        hi = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%dT%H")
        row = [0] * ROW_LEN
        for key, r in self.cells.items():
            if lo <= key[-1] < hi:
                add_row(row, r)
        return totals_from_row(row)

    def time_buckets(self) -> dict[datetime, int]:
        """Cost units per kept time bucket, keyed by the bucket's (UTC) start."""
        out: dict[datetime, int] = {}
        for key, row in self.cells.items():
            k = key[-1]
            dt = datetime(int(k[:4]), int(k[5:7]), int(k[8:10]), int(k[11:13]), int(k[14:16]) if len(k) > 13 else 0, tzinfo=UTC)
            out[dt] = out.get(dt, 0) + row[COST]
        return out

    def top_requests(self) -> list[dict[str, Any]]:
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


def new_result(plan: Plan) -> ScanResult:
    q = plan.query
    dims = tuple(d for d in q.dims if d not in TIME_DIMS) + (("_time",) if plan.time_width else ())
    return ScanResult(dims=dims, time_width=plan.time_width, tz=q.tz, top_n=q.top)
