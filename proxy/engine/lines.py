"""The per-line loop of a scan, over lines already read: repeated lines (``Dedupe``),
selection (``select``) and accumulation into the cube (``accumulate``). No file I/O."""

from __future__ import annotations

import heapq
import operator
import re
from collections import deque
from typing import Any, Iterable, Iterator, Mapping, Sequence

import orjson

from proxy.core.money import COST_UNITS_PER_USD
from proxy.core.records import upgrade_record
from proxy.core.timestamps import CANON_TS_AT, LINE_HEAD, TS_AT, canonical_ts
from proxy.engine.cube import (
    COST,
    ERR,
    IN_COST,
    OUT_COST,
    PRICED,
    REQ,
    ROW_LEN,
    T_CREAD,
    T_CWRITE,
    T_IN,
    T_OUT,
    T_REASON,
    T_TOTAL,
    UNKNOWN,
    UNPRICED,
    ScanResult,
)
from proxy.engine.insights import CacheRates, add_habit, derived_savings_units
from proxy.engine.query import NONE_LABEL, Plan
from proxy.engine.totals import MAX_USD, NUMBER_TYPES, NUMERIC_FIELDS

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
    ``select`` inlines both checks; a change here goes there too."""

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

    def room(self) -> int:
        """How many more lines (or ids) it can remember before it forgets its oldest."""
        return self.window - max(len(self._line_order), len(self._id_order))

    def knows_any(self, line_hashes: set[int], id_hashes: set[int]) -> bool:
        """Whether any of these line or id hashes was already seen."""
        return not (self._lines.isdisjoint(line_hashes) and self._ids.isdisjoint(id_hashes))

    def remember_new(self, line_hashes: Sequence[int], id_hashes: Sequence[int]) -> None:
        """Remember hashes, in order, known to be new (``knows_any`` false, no repeat among
        them) and fewer than ``room``: what ``select`` would do line by line, in bulk."""
        self._lines.update(line_hashes)
        self._line_order.extend(line_hashes)
        self._ids.update(id_hashes)
        self._id_order.extend(id_hashes)

    def copy(self) -> Dedupe:
        other = Dedupe(self.window)
        other.duplicates = self.duplicates
        other._lines, other._line_order = set(self._lines), deque(self._line_order)
        other._ids, other._id_order = set(self._ids), deque(self._id_order)
        return other

    def take(self, other: Dedupe) -> None:
        """Become ``other`` (a ``copy`` of this one, fed since)."""
        self.duplicates = other.duplicates
        self._lines, self._line_order, self._ids, self._id_order = other._lines, other._line_order, other._ids, other._id_order

    def feed(self, line_hash: int, rid: object) -> bool:
        """What ``select`` does for a line that parsed as an object, given the hash of its
        bytes and its ``record_id``: True for a repeat (counted in ``duplicates``)."""
        if self._repeat(line_hash, self._lines, self._line_order):
            return True
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


# --- numbers too large for a double ----------------------------------------------------
#
# orjson refuses a whole line for one number too large for a double (1e400, or 400
# digits), where JSON itself sets no limit. Such a number is read as its text instead
# (a string), so a line is lost only if the number is in a field we add up or key on
# (a string there is corrupt, as before). It is also what lets the roll-up's fast path
# (engine/rollup_msgspec.py) skip the fields it does not read without checking every
# number in them: either way the line counts the same.

_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def lenient_loads(line: bytes, err: orjson.JSONDecodeError) -> Any:
    """The line ``orjson.loads`` refused with ``err``, with its too-large numbers as
    strings; None when it is not JSON for another reason."""
    if not err.msg.startswith("number is infinity"):
        return None
    try:
        text = line.decode()  # (orjson checks the UTF-8 before any number)
    except UnicodeDecodeError:
        return None
    while True:
        m = _NUMBER.match(text, err.pos)  # pos: the number's first character
        if m is None:
            return None
        text = f'{text[: m.start()]}"{m.group()}"{text[m.end() :]}'
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as e:
            if not e.msg.startswith("number is infinity"):
                return None
            err = e


# --- the scan ------------------------------------------------------------------------------


def select(lines: Iterable[bytes], plan: Plan, res: ScanResult, dedupe: Dedupe | None = None) -> Iterator[tuple[dict[str, Any], str]]:
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
    head, at = LINE_HEAD, TS_AT
    upgrade = upgrade_record
    canon_at = CANON_TS_AT.match
    lo_b, hi_b, lo, hi, keep = plan.lo_b, plan.hi_b, plan.lo, plan.hi, plan.keep
    bounded = lo_b is not None or hi_b is not None
    n = bad = 0
    try:
        for line in lines:
            n += 1
            if bounded and line.startswith(head):
                ts_b = line[at : at + 24]
                # Skip on the raw bytes only for a canonical timestamp, whose text order
                # is time order; anything else is parsed and judged below.
                if ((lo_b is not None and ts_b < lo_b) or (hi_b is not None and ts_b >= hi_b)) and canon_at(line, at):
                    continue
            try:
                rec = loads(line)
            except DecodeError as e:
                rec = lenient_loads(line, e)
                if rec is None:
                    if line.strip():
                        bad += 1
                    continue
            if type(rec) is not dict:
                bad += 1
                continue
            if rec.get("schema_version") == 1:
                upgrade(rec)  # before the filters and keys, which read today's meanings
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


_MEASURE_FIELDS = ("status", "error", *NUMERIC_FIELDS)  # NUMERIC_FIELDS: money, then TOKEN_FIELDS
# One C call fetches every field a row needs from a complete record; older records
# missing a field take the .get() path.
_measures = operator.itemgetter(*_MEASURE_FIELDS)


def accumulate(lines: Iterable[bytes], plan: Plan, res: ScanResult, dedupe: Dedupe | None = None) -> None:
    q = plan.query
    cells = res.cells
    keyf = plan.key
    units = COST_UNITS_PER_USD
    want_lat, top_n, want_sav, want_habits = q.latency, q.top, q.savings, q.habits
    lat, ttft = res.latency, res.ttft
    top = res.top
    seq = 0
    rates = CacheRates(q.pricebook) if want_sav else None
    first = last = None
    measures = _measures
    num, max_usd = NUMBER_TYPES, MAX_USD
    want_spans, spans = plan.spans, res.spans
    for rec, ts in select(lines, plan, res, dedupe):
        try:
            status, error, cost, ic, oc, t_in, t_out, t_total, cread, cwrite, reason = measures(rec)
        except KeyError:
            status, error, cost, ic, oc, t_in, t_out, t_total, cread, cwrite, reason = [rec.get(f) for f in _MEASURE_FIELDS]
        # totals.well_typed, on the values in hand: a non-number where we add is a corrupt line.
        if not (
            type(cost) in num
            and type(ic) in num
            and type(oc) in num
            and type(t_in) in num
            and type(t_out) in num
            and type(t_total) in num
            and type(cread) in num
            and type(cwrite) in num
            and type(reason) in num
            and (cost is None or -max_usd < cost < max_usd)
            and (ic is None or -max_usd < ic < max_usd)
            and (oc is None or -max_usd < oc < max_usd)
        ):
            res.bad_lines += 1
            continue
        if keyf is None:
            key = (rec.get("provider") or NONE_LABEL, rec.get("model") or rec.get("response_model") or NONE_LABEL)
        else:
            key = keyf(rec, ts)
        try:
            row = cells.get(key)
        except TypeError:  # an object or a list where a report groups by a name: corrupt
            res.bad_lines += 1
            continue
        if row is None:
            row = cells[key] = [0] * ROW_LEN
        if first is None or ts < first:
            first = ts
        if last is None or ts > last:
            last = ts
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
            row[T_IN] += t_in
        if t_out:
            row[T_OUT] += t_out
        if t_total:
            row[T_TOTAL] += t_total
        if cread:
            row[T_CREAD] += cread
        if cwrite:
            row[T_CWRITE] += cwrite
        if reason:
            row[T_REASON] += reason
        if want_lat:
            lk = (rec.get("provider") or NONE_LABEL, rec.get("model") or rec.get("response_model") or NONE_LABEL)
            for hists, ms in ((lat, rec.get("latency_ms")), (ttft, rec.get("ttft_ms"))):
                if type(ms) is float or type(ms) is int:
                    h = hists.get(lk)
                    if h is None:
                        h = hists[lk] = {}
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
                derived = derived_savings_units(rec)
                if derived is None:
                    res.savings_unpriced_tokens += cread
                else:
                    res.savings_derived_units += derived
        if want_habits and cost is not None:
            add_habit(res.habits, rec, cu)
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


_TOP_KEEP = (
    "timestamp",
    "request_id",
    "provider",
    "model",
    "response_model",
    "user_id",
    "endpoint",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "total_cost",
    "status",
    "tags",
)


def _top_fields(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in _TOP_KEEP}
