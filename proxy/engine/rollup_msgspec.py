"""The roll-up of an index segment with msgspec (the optional "reports" extra): what
``engine.lines.accumulate`` gives for ``rollup.index_plan``, at well under half the cost.

orjson builds every field of a ~1 KB record as Python objects (raw usage, tags, ids),
most of a pure scan's time. Here msgspec decodes only the fields a roll-up reads into
a slotted struct, checking the rest without building it, and one loop adds them up.

Whatever this path is not sure to count exactly as the pure loop does makes it give up
on the whole segment (``roll_up`` returns None, having changed nothing) and the caller
runs the pure loop: a line msgspec refuses or that is not an object (a torn or blank
line), a value of a type the struct does not take (a float token count, a string
status, an integer beyond 64 bits), a timestamp not in the canonical form, an amount
out of range, a schema 1 record, a line not valid UTF-8 (msgspec does not check the
strings it skips), a Dedupe near its window. Repeats are found here as ``select``
finds them. What msgspec skips without checking is a number too large for a double;
the pure path reads that as text (``engine.lines.lenient_loads``), so the line counts
the same either way.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from operator import attrgetter
from typing import Annotated, Any, Iterable, Iterator, Sequence

import msgspec

from proxy.core.money import COST_UNITS_PER_USD
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
    add_row,
)
from proxy.engine.lines import Dedupe
from proxy.engine.totals import MAX_USD

# orjson reads integers up to 64 bits as int (beyond, as float): anything wider is left
# to it. (msgspec's bounds must fit in an int64.)
_Int = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class _Record(msgspec.Struct, gc=False):
    """The fields a roll-up reads; msgspec skips the others."""

    schema_version: Any = None
    timestamp: str | None = None
    record_id: str | None = None
    provider: str | None = None
    provider_type: str | None = None
    model: str | None = None
    response_model: str | None = None
    endpoint: str | None = None
    status: _Int | None = None
    error: Any = None
    total_cost: _Int | float | None = None
    input_cost: _Int | float | None = None
    output_cost: _Int | float | None = None
    input_tokens: _Int | None = None
    output_tokens: _Int | None = None
    total_tokens: _Int | None = None
    cache_read_tokens: _Int | None = None
    cache_write_tokens: _Int | None = None
    reasoning_tokens: _Int | None = None


class _Id(msgspec.Struct, gc=False):
    record_id: str | None = None


_decode = msgspec.json.Decoder(_Record).decode
_decode_id = msgspec.json.Decoder(_Id).decode
_REFUSED = (msgspec.MsgspecError, RecursionError, UnicodeDecodeError)
# orjson refuses JSON nested 1024 deep; msgspec goes as deep as Python's recursion limit,
# which a program may have raised: decoding under this one, msgspec refuses first.
_DEPTH = 1000


@contextmanager
def _orjson_depth() -> Iterator[None]:
    limit = sys.getrecursionlimit()
    if limit > _DEPTH:
        sys.setrecursionlimit(_DEPTH)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


_rid = attrgetter("record_id")
_UNITS = COST_UNITS_PER_USD


def _utf8(lines: Sequence[bytes]) -> bool:
    if all(map(bytes.isascii, lines)):
        return True
    try:
        for line in lines:
            line.decode()
    except UnicodeDecodeError:
        return False
    return True


def record_ids(lines: Sequence[bytes]) -> list[Any] | None:
    """Each line's ``record_id`` if every line is one JSON object, as select would parse
    it (for a Dedupe primed with them); None where the pure path must look."""
    if not _utf8(lines):
        return None
    try:
        with _orjson_depth():
            return list(map(_rid, map(_decode_id, lines)))
    except _REFUSED:
        return None


def roll_up(lines: Sequence[bytes], res: ScanResult, dedupe: Dedupe) -> tuple[list[int], list[Any]] | None:
    """Add ``lines`` to ``res`` and ``dedupe`` as ``accumulate`` with ``index_plan``
    would. Returns each line's hash and record id, or None, having changed nothing,
    where it cannot be sure to count as ``accumulate`` does."""
    n = len(lines)
    if n > dedupe.room():
        return None
    trial: Dedupe | None = None
    line_hashes: list[int] = []
    rids: list[Any] = []
    try:
        with _orjson_depth():
            # The usual case, no line seen before: each line is hashed, decoded and added
            # up in one go, while it is in the cache; then repeats are looked for, as
            # select finds them: a line's bytes, then its record id.
            summed = _sum(lines, line_hashes, rids)
            if summed is None:
                return None
            new_lines = set(line_hashes)
            id_hashes = list(map(hash, filter(None, rids)))
            new_ids = set(id_hashes)
            if len(new_lines) < n or len(new_ids) < len(id_hashes) or dedupe.knows_any(new_lines, new_ids):
                # Again, without the repeats, skipped in select's order.
                trial = dedupe.copy()
                kept = [line for line, h, rid in zip(lines, line_hashes, rids) if not trial.feed(h, rid)]
                summed = _sum(kept, None, None)
    except _REFUSED:
        return None
    if summed is None:
        return None
    cells, spans = summed
    # Every line counted as accumulate counts it: now it is kept.
    if trial is None:
        dedupe.remember_new(line_hashes, id_hashes)
        dups = 0
    else:
        dups = trial.duplicates - dedupe.duplicates
        dedupe.take(trial)
    res.lines += n
    res.duplicate_lines += dups
    for key, row in cells.items():
        mine = res.cells.get(key)
        first, last = spans[key]
        if mine is None:
            res.cells[key] = row
            res.spans[key] = [first, last]
        else:
            add_row(mine, row)
            had = res.spans.get(key)
            res.spans[key] = [first, last] if had is None else [min(had[0], first), max(had[1], last)]
    if spans:
        first = min(sp[0] for sp in spans.values())
        last = max(sp[1] for sp in spans.values())
        if res.first_ts is None or first < res.first_ts:
            res.first_ts = first
        if res.last_ts is None or last > res.last_ts:
            res.last_ts = last
    return line_hashes, rids


Cells = dict[tuple[Any, ...], list[int]]


def _sum(lines: Iterable[bytes], hashes: list[int] | None, rids: list[Any] | None) -> tuple[Cells, dict[tuple[Any, ...], list[str]]] | None:
    """The cells and spans of ``lines`` (appending each line's hash to ``hashes`` and its
    record id to ``rids``), or None for a line ``accumulate`` would judge otherwise than by
    adding it up. Raises what msgspec raises for a line it refuses."""
    cells: Cells = {}
    spans: dict[tuple[Any, ...], list[str]] = {}
    units, max_usd = _UNITS, MAX_USD
    decode = _decode
    keep_hash = hashes.append if hashes is not None else None
    keep_id = rids.append if rids is not None else None
    for line in lines:
        if keep_hash is not None:
            keep_hash(hash(line))
        if not line.isascii():
            line.decode()  # msgspec does not check the strings it skips; orjson does
        r = decode(line)
        if r.schema_version == 1:  # as select tests it: upgrade_record's job
            return None
        if keep_id is not None:
            keep_id(r.record_id)
        ts = r.timestamp
        # select's test for a canonical timestamp (anything else it converts: not here)
        if ts is None or len(ts) != 24 or ts[19] != "." or ts[23] != "Z" or ts[10] != "T":
            return None
        status = r.status
        key = (
            r.provider,
            r.provider_type,
            r.model,
            r.response_model,
            r.endpoint,
            status,
            1 if (r.error or (status is not None and status >= 400)) else 0,
            ts[:13],
        )
        row = cells.get(key)
        if row is None:
            row = cells[key] = [0] * ROW_LEN
            spans[key] = [ts, ts]
        else:
            sp = spans[key]
            if ts < sp[0]:
                sp[0] = ts
            elif ts > sp[1]:
                sp[1] = ts
        row[REQ] += 1
        if key[6]:
            row[ERR] += 1
        cost = r.total_cost
        if cost is None:
            t = r.total_tokens
            if t:
                row[UNPRICED] += 1
            elif t is None:
                row[UNKNOWN] += 1
        elif -max_usd < cost < max_usd:
            row[PRICED] += 1
            row[COST] += round(cost * units)
        else:
            return None
        ic, oc = r.input_cost, r.output_cost
        if ic is not None:
            if not -max_usd < ic < max_usd:
                return None
            if ic and cost is not None:
                row[IN_COST] += round(ic * units)
        if oc is not None:
            if not -max_usd < oc < max_usd:
                return None
            if oc and cost is not None:
                row[OUT_COST] += round(oc * units)
        v = r.input_tokens
        if v:
            row[T_IN] += v
        v = r.output_tokens
        if v:
            row[T_OUT] += v
        v = r.total_tokens
        if v:
            row[T_TOTAL] += v
        v = r.cache_read_tokens
        if v:
            row[T_CREAD] += v
        v = r.cache_write_tokens
        if v:
            row[T_CWRITE] += v
        v = r.reasoning_tokens
        if v:
            row[T_REASON] += v
    return cells, spans
