"""The roll-up's two paths give one answer: msgspec's fast path (engine/rollup_msgspec.py)
and the scan's own loop (engine.lines.accumulate), line for line, over logs with every
oddity a log can hold: unknown usage, unpriced calls, errors, unicode, huge numbers,
values of the wrong type, repeated lines and record ids, torn, blank and non-UTF-8
lines, duplicate keys, schema 1 records, other timestamp forms. And the index built with
it answers as a scan of every line does, with any segment size."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, accumulate, select
from proxy.engine.query import Query
from proxy.engine.rollup import fast_path, index_plan, primed_from, roll_up
from proxy.storage import index as index_module
from proxy.storage.scan import scan
from tests.support.synthlog import CLI, REALISTIC, dumps, records, write_log

pytestmark = pytest.mark.skipif(not fast_path(), reason="msgspec (the fast extra) is not installed")

BASE = [dumps(r) for r in records(60, mix=REALISTIC, seed=3, end=1_790_000_000, days=2)]
BASE += [dumps(r) for r in records(20, mix=CLI, seed=4, end=1_790_000_000, days=2)]

FIELDS = [
    "status",
    "error",
    "total_cost",
    "input_cost",
    "output_cost",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "timestamp",
    "provider",
    "provider_type",
    "model",
    "response_model",
    "endpoint",
    "record_id",
    "schema_version",
]
ODD_VALUES = [
    None,
    True,
    False,
    "text",
    "",
    "ünïcødé\u2028\u202e 🙂",
    1.5,
    0,
    -0.0,
    1e-12,
    1e300,
    -1e300,
    2**63,
    2**63 - 1,
    -(2**63) - 1,
    2**70,
    999_999_999_999.5,
    {"a": 1},
    [1, 2],
    "2026-11-23T18:00:00Z",
    "2026-11-23T18:00:00.123+00:00",
    "2026-11-23T18:00:00.123Z",
    "xxxx-xx-xxTxx:xx:xx.xxxZ",
    1,
    200,
    503,
    "rid-1",
]


def _set(line: bytes, field: str, value: Any) -> bytes:
    rec = orjson.loads(line)
    rec[field] = value
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"  # (any int)


# The oddities the fast path counts itself (the others make it leave a segment to the loop).
COUNTED = [0, 5, 6, 7, 14, 16]


@st.composite
def odd_line(draw: st.DrawFn, before: list[bytes], kinds: list[int] | None = None) -> list[bytes]:
    """A log line (or a few), as the proxy writes it or damaged in one of many ways."""
    line = draw(st.sampled_from(BASE))
    how = draw(st.integers(0, 16) if kinds is None else st.sampled_from(kinds))
    if how <= 3:
        return [line]
    if how == 4:
        return [_set(line, draw(st.sampled_from(FIELDS)), draw(st.sampled_from(ODD_VALUES)))]
    if how == 5 and before:  # a repeat of a recent line, byte for byte
        return [draw(st.sampled_from(before[-5:]))]
    if how == 6:  # the same record id as another line, other bytes
        rid = draw(st.sampled_from(["r-1", "r-2", "r-3"]))
        return [_set(line, "record_id", rid)]
    if how == 7:  # a number too large for a double, where a report does not look, or does
        where = draw(st.sampled_from([b'"raw_usage":{', b'"tags":{', b"{"]))
        big = draw(st.sampled_from([b"1e400", b"-1.5E+309", b"1" + b"0" * 400]))
        if where not in line:
            return [line]
        return [line.replace(where, where + b'"big":' + big + b",", 1)]  # (every line has a "{")
    if how == 8:
        return [line.replace(b'"total_cost":', b'"total_cost":1e400,"x":', 1)]
    if how == 9:  # a duplicate key: the last one counts
        key = draw(st.sampled_from([b"total_cost", b"provider", b"status", b"input_tokens"]))
        value = draw(st.sampled_from([b"0.5", b'"other"', b"404", b"7", b"null", b'"7"']))
        return [line[:-2] + b',"' + key + b'":' + value + b"}\n"]
    if how == 10:  # not UTF-8, or a surrogate
        bad = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc3"]))
        return [line.replace(b'"user_id":"', b'"user_id":"' + bad, 1)]
    if how == 11:  # a torn line, run into the next
        cut = draw(st.integers(1, len(line) - 2))
        return [line[:cut] + draw(st.sampled_from(BASE))]
    if how == 12:
        return [draw(st.sampled_from([b"\n", b"   \n", b"\t\r\n", b"null\n", b"[1]\n", b'"x"\n', b"{}\n"]))]
    if how == 13:  # schema 1: the endpoint is the path after the provider's name
        rec = orjson.loads(line)
        rec["schema_version"] = 1
        rec["endpoint"] = "/v1/chat/completions"
        return [orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)]
    if how == 14:  # another writer's spacing, and escapes
        return [json.dumps(json.loads(line), ensure_ascii=True, indent=None, separators=(", ", ": ")).encode() + b"\n"]
    if how == 15:  # deeply nested somewhere
        depth = draw(st.sampled_from([10, 500, 1023, 1100]))
        return [line.replace(b"{", b'{"deep":' + b"[" * depth + b"]" * depth + b",", 1)]
    return [line.replace(b'"model":"', b'"model":"\\u00e9\\n', 1)]


@st.composite
def logs(draw: st.DrawFn, kinds: list[int] | None = None) -> list[bytes]:
    lines: list[bytes] = []
    for _ in range(draw(st.integers(1, 40))):
        lines += draw(odd_line(lines, kinds))
    if kinds is None and draw(st.booleans()):
        lines[-1] = lines[-1].rstrip(b"\n")  # the last line torn (or just not ended)
    return lines


def outcome(res: ScanResult) -> tuple[Any, ...]:
    return (res.cells, res.spans, res.lines, res.bad_lines, res.duplicate_lines, res.first_ts, res.last_ts)


def both(lines: list[bytes], prime: list[bytes]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    plan = index_plan()
    fast, pure = new_result(plan), new_result(plan)
    dd_fast, dd_pure = primed_from(prime, plan), Dedupe()
    for _ in select(prime, plan, new_result(plan), dd_pure):
        pass
    roll_up(lines, plan, fast, dd_fast)
    accumulate(lines, plan, pure, dd_pure)
    # The Dedupes are left alike too: the same next line is a repeat for both or neither.
    for line in BASE[:3] + lines[-3:]:
        a, b = new_result(plan), new_result(plan)
        accumulate([line], plan, a, dd_fast)
        accumulate([line], plan, b, dd_pure)
        assert outcome(a) == outcome(b)
    return outcome(fast), outcome(pure)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.integers(0, 6))
def test_fast_and_pure_roll_ups_agree(lines: list[bytes], primed: int) -> None:
    fast, pure = both(lines[primed:], lines[:primed])
    assert fast == pure


@settings(max_examples=100, deadline=None)
@given(logs(COUNTED), st.integers(0, 6))
def test_the_fast_path_counts_what_it_can(lines: list[bytes], primed: int) -> None:
    plan = index_plan()
    res = new_result(plan)
    assert roll_up(lines[primed:], plan, res, primed_from(lines[:primed], plan)) is not None
    fast, pure = both(lines[primed:], lines[:primed])
    assert fast == pure


def test_the_fast_path_takes_a_plain_log() -> None:
    """On the proxy's own lines the fast path does the work (it returns what primes the
    next segment), and repeats are skipped by it as by the loop."""
    plan = index_plan()
    lines = BASE + BASE[5:9]
    res = new_result(plan)
    assert roll_up(lines, plan, res, Dedupe()) is not None
    pure = new_result(plan)
    accumulate(lines, plan, pure, Dedupe())
    assert outcome(res) == outcome(pure) and res.duplicate_lines == 4


def test_a_huge_number_where_a_report_does_not_look_loses_no_record() -> None:
    plan = index_plan()
    lines = [BASE[0].replace(b'"raw_usage":{', b'"raw_usage":{"big":1e400,', 1), BASE[1]]
    for fast in (True, False):
        res = new_result(plan)
        roll_up(lines, plan, res, Dedupe(), fast=fast)
        assert (res.totals().requests, res.bad_lines) == (2, 0)
    bad = [BASE[0].replace(b'"total_cost":', b'"total_cost":1e400,"x":', 1)]
    res = new_result(plan)
    roll_up(bad, plan, res, Dedupe())
    assert (res.totals().requests, res.bad_lines) == (0, 1)


@pytest.mark.parametrize("segment", [2_000, 9_000, 50_000])
def test_the_index_answers_as_a_full_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segment: int) -> None:
    # Segments of a few lines each, built in runs of several: the repeats check of each
    # is primed from the lines before it, read in the same pass.
    monkeypatch.setattr(index_module, "_SEGMENT", segment)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", segment // 4)
    recs = list(records(1500, mix=REALISTIC, seed=segment, end=time.time() - 3600, days=5))
    log = write_log(tmp_path / "cost.jsonl", recs)
    lines = log.read_bytes().splitlines(keepends=True)
    # Repeats close by (a retried batch) and across segment edges, a torn line, a bad one.
    extra = list(itertools.chain(lines[:700], lines[690:705], [lines[705][:50]], lines[705:1200], lines[1190:1200], lines[1200:]))
    log.write_bytes(b"".join(extra) + b'{"not": "a record"\n')
    q = Query(dims=("provider", "model", "day"))
    for jobs in (1, 2):
        index_module.index_path(log).unlink(missing_ok=True)
        built = scan([log], q, jobs=jobs)
        again = scan([log], q, jobs=jobs)  # from the index
        raw = scan([log], q, jobs=1, use_index=False)
        assert outcome(built) == outcome(raw) == outcome(again)
        assert raw.duplicate_lines == 20 and raw.bad_lines == 2  # (lines 700-704 were new)


def test_a_name_that_is_an_object_is_a_corrupt_line(tmp_path: Path) -> None:
    """A provider (or model) that is a JSON object cannot be grouped by: the line is
    counted corrupt, where the scan used to stop with a TypeError."""
    odd = _set(BASE[0], "provider", {"a": 1})
    log = tmp_path / "cost.jsonl"
    log.write_bytes(BASE[1] + odd + BASE[2])
    for use_index in (False, True):
        for dims in (("provider", "model"), ("provider", "day")):
            res = scan([log], Query(dims=dims), jobs=1, use_index=use_index)
            assert (res.totals().requests, res.bad_lines) == (2, 1)
