"""Every reader of the log counts a call once, however an old writer's retries left it.

Writers before record ids retried a batch whose write failed part-way by writing the
whole batch again: the lines that had made it appear twice, byte for byte, and the
cut line runs into the retry's first line (one unparseable, "merged" line). The logs
here are built that way, and every expected number is computed from the unique
records the test generated, never read back from the code under test.
"""

from __future__ import annotations

import csv
import io
import random
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.budgets import BudgetLedger, Limit
from proxy.config import parse_config, pricebook_for
from proxy.core.money import cost_units
from proxy.core.timestamps import iso_ms
from proxy.engine.query import Query
from proxy.engine.reprice import RepriceStats, reprice_lines
from proxy.engine.totals import NUMERIC_FIELDS, RollingWindow
from proxy.storage import index as index_module
from proxy.storage import scan as scan_module
from proxy.storage.index import index_path
from proxy.storage.logfiles import iter_jsonl, records_since
from proxy.storage.replay import replay_log
from proxy.storage.scan import scan
from proxy.web.app import load_window
from tests.support.analyze_cli import CONFIG, NOW, as_json, check_totals, dt, expect, make_records, run
from tests.support.synthlog import dumps

USD = 10**10


@dataclass
class OldLog:
    data: bytes
    records: list[dict[str, Any]]  # each call once
    merged: int  # unparseable lines the retries left
    duplicates: int  # lines that repeat an earlier one (bytes or record id)
    spans: list[tuple[int, int]]  # (first copy's offset, repeat's offset) per duplicate


def with_record_id(rec: dict[str, Any], rid: str) -> dict[str, Any]:
    """The record as newer writers lay it out: ``record_id`` right after the timestamp."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        out[k] = v
        if k == "timestamp":
            out["record_id"] = rid
    return out


def old_writer_log(recs: list[dict[str, Any]], seed: int = 1, retry_every: int = 4) -> OldLog:
    """Lines written in batches; every ``retry_every``-th batch was cut part-way and then
    written again whole. Some records with an id are written a second time re-serialized
    (other bytes, same id), as a writer that re-encodes on retry would."""
    rng = random.Random(seed)
    lines = [dumps(r) for r in recs]
    out = bytearray()
    merged = dups = 0
    spans: list[tuple[int, int]] = []
    i = batch_no = 0
    while i < len(lines):
        k = rng.randrange(3, 12)
        batch = lines[i : i + k]
        batch_no += 1
        if batch_no % retry_every == 0 and len(batch) >= 3:
            j = rng.randrange(2, len(batch))  # b0..b(j-1) made it, then part of b_j
            cut = rng.randrange(1, len(batch[j]) - 1)
            starts = []
            for line in batch[:j]:
                starts.append(len(out))
                out += line
            out += batch[j][:cut]
            out += batch[0]  # runs into the cut line: the merged line; this b0 copy is lost
            merged += 1
            for n, line in enumerate(batch[1:], 1):
                if n < j:
                    spans.append((starts[n], len(out)))
                    dups += 1
                out += line
        else:
            for n, line in enumerate(batch):
                out += line
                rec = recs[i + n]
                if "record_id" in rec and rng.random() < 0.1:
                    # Same call, other bytes: only the id says it is a repeat.
                    first = len(out) - len(line)
                    spans.append((first, len(out)))
                    out += orjson.dumps({k: rec[k] for k in reversed(rec)}, default=_dec) + b"\n"
                    dups += 1
        i += k
    return OldLog(bytes(out), recs, merged, dups, spans)


def _dec(o: Any) -> Any:
    if isinstance(o, Decimal):
        return orjson.Fragment(format(o.normalize(), "f"))
    raise TypeError


def sample(n: int = 1200, seed: int = 7, days: float = 3.0) -> list[dict[str, Any]]:
    """Older records without an id, the newer half with one."""
    recs = make_records(n, seed=seed, days=days)
    return [with_record_id(r, f"r{seed}-{i:06x}") if i >= n // 2 else r for i, r in enumerate(recs)]


@pytest.fixture
def old_log(tmp_path: Path) -> tuple[Path, OldLog]:
    log = old_writer_log(sample())
    assert log.merged > 10 and log.duplicates > 50
    path = tmp_path / "cost-tracking.jsonl"
    path.write_bytes(log.data)
    return path, log


def test_the_built_log_really_holds_duplicates_and_merged_lines(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    data = path.read_bytes()
    parsed, bad = [], 0
    for line in data.splitlines():
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            bad += 1
    assert bad == log.merged and len(parsed) == len(log.records) + log.duplicates
    same_bytes = 0
    for a, b in log.spans:
        first, repeat = data[a : data.index(b"\n", a) + 1], data[b : data.index(b"\n", b) + 1]
        same_bytes += first == repeat
        assert first == repeat or orjson.loads(first)["record_id"] == orjson.loads(repeat)["record_id"]
    assert 0 < same_bytes < log.duplicates  # both kinds of repeat are there


def test_iter_jsonl_skips_repeats_and_counts_the_merged_line_as_bad(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    bad = [0]
    with open(path, "rb") as f:
        got = list(iter_jsonl(f, bad))
    assert bad[0] == log.merged
    assert [r["request_id"] for r in got] == [r["request_id"] for r in log.records]


def test_report_counts_each_call_once(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    for extra in ([], ["--no-index"]):
        p = run("--file", str(path), "--since", "all", "--format", "json", *extra)
        body = as_json(p)
        check_totals(body["totals"], expect(log.records))
        assert body["corrupt_lines"] == log.merged
        assert body["duplicate_lines"] == log.duplicates
        by_provider = {row["provider"]: row["requests"] for row in body["by_provider"]}
        assert by_provider == {p: sum(1 for r in log.records if r["provider"] == p) for p in by_provider}
        assert f"skipped {log.merged:,} corrupt" in p.stderr and f"{log.duplicates:,} duplicate" in p.stderr
    # The 24-hour default window and per-request output read the same way.
    body = as_json(run("--file", str(path), "--format", "json"))
    check_totals(body["totals"], expect(log.records, lambda r: dt(r) >= NOW - timedelta(hours=24)))
    p = run("--file", str(path), "--since", "all", "--format", "detailed")
    assert len(p.stdout.splitlines()) == len(log.records) + 2  # header and total
    p = run("--file", str(path), "--since", "all", "--format", "csv")
    ids = [row[1] for row in list(csv.reader(io.StringIO(p.stdout)))[1:]]
    assert ids == [r["request_id"] for r in log.records]


def test_a_repeat_across_a_task_or_segment_boundary_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = old_writer_log(sample(2500, seed=8, days=6), seed=3, retry_every=3)
    path = tmp_path / "log.jsonl"
    path.write_bytes(log.data)
    chunk = 40_000
    monkeypatch.setattr(scan_module, "_CHUNK", chunk)
    monkeypatch.setattr(scan_module, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(index_module, "_SEGMENT", chunk)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", 10_000)
    # Some first copy lies before a boundary and its repeat after it.
    bounds = range(chunk, len(log.data), chunk)
    assert sum(1 for a, b in log.spans for s in bounds if a < s <= b) >= 3
    exp = expect(log.records)
    q = Query(dims=("provider", "model", "day"))
    runs = {
        "raw, one task": scan([path], q, jobs=1, use_index=False),
        "raw, byte ranges": scan([path], q, jobs=2, use_index=False),
        "index build": scan([path], q, jobs=2),
        "index reuse": scan([path], q, jobs=1),
    }
    assert len(orjson.loads(index_path(path).read_bytes())["segments"]) > 10
    for name, res in runs.items():
        t = res.totals()
        assert (t.requests, t.total_cost, t.unpriced, t.unknown) == (exp["requests"], exp["cost"], exp["unpriced"], exp["unknown"]), name
        assert (res.bad_lines, res.duplicate_lines) == (log.merged, log.duplicates), name
        assert res.cells == runs["raw, one task"].cells, name
    # A window edge inside a segment: that segment is read line by line, still once each.
    start = (NOW - timedelta(days=2, minutes=11)).timestamp()
    edge = scan([path], Query(start=start, dims=("provider", "model", "day")), jobs=2)
    in_window = expect(log.records, lambda r: r["timestamp"] >= iso_ms(start, ceil=True))
    assert (edge.totals().requests, edge.totals().total_cost) == (in_window["requests"], in_window["cost"])


def test_records_since_and_the_health_window_count_each_call_once(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    since = (NOW - timedelta(days=2)).timestamp()
    got = list(records_since(path, since))
    want = [r for r in log.records if dt(r).timestamp() >= since]
    assert [r["request_id"] for r in got] == [r["request_id"] for r in want]
    window = RollingWindow(clock=lambda: NOW.timestamp())
    n = load_window(path, window, NOW.timestamp())
    day = expect(log.records, lambda r: dt(r) >= NOW - timedelta(days=1))
    assert n == day["requests"]
    # The window keeps whole minutes: the minute that began exactly a day ago has left it.
    kept = expect(log.records, lambda r: dt(r) >= NOW - timedelta(days=1) + timedelta(minutes=1))
    overall, _ = window.totals()
    assert (overall.requests, overall.total_cost) == (kept["requests"], kept["cost"])


def test_budget_replay_counts_each_call_once(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    now = NOW.timestamp()
    ledger = BudgetLedger([Limit("global", "monthly", 10**6 * USD), Limit("user", "daily", 10**6 * USD)], clock=lambda: now)
    read, counted = replay_log(ledger, path)
    november = [r for r in log.records if r["timestamp"] >= "2026-11-01"]
    today = [r for r in november if r["timestamp"] >= "2026-11-23"]
    assert (read, counted) == (len(november), len(november))
    spent = {s.name: s.spent for s in ledger.states()}
    assert spent["global monthly"] == sum(cost_units(r["total_cost"]) or 0 for r in november)
    for user in {r["user_id"] for r in today}:
        assert spent[f"user:{user} daily (each user)"] == sum(cost_units(r["total_cost"]) or 0 for r in today if r["user_id"] == user)


def test_a_retry_that_landed_in_the_new_file_after_rotation(tmp_path: Path) -> None:
    """The cut batch ends the rotated file; its retry starts the new one."""
    recs = sample(200, seed=9, days=1)
    lines = [dumps(r) for r in recs]
    (tmp_path / "cost.jsonl.1").write_bytes(b"".join(lines[:100]) + lines[100][:50])
    (tmp_path / "cost.jsonl").write_bytes(b"".join(lines[95:]))
    since = (NOW - timedelta(days=2)).timestamp()
    got = list(records_since(tmp_path / "cost.jsonl", since))
    assert [r["request_id"] for r in got] == [r["request_id"] for r in recs]
    ledger = BudgetLedger([Limit("global", "monthly", 10**6 * USD)], clock=lambda: NOW.timestamp())
    assert replay_log(ledger, tmp_path / "cost.jsonl") == (200, 200)
    assert ledger.states()[0].spent == sum(cost_units(r["total_cost"]) or 0 for r in recs)


def test_reprice_counts_each_call_once_and_keeps_repeats_identical(old_log: tuple[Path, OldLog]) -> None:
    path, log = old_log
    book = pricebook_for(parse_config({**yaml.safe_load(CONFIG), "catalog": {"enabled": False}}))
    stats = RepriceStats()
    with open(path, "rb") as f:
        out = list(reprice_lines(iter(f), book, stats, NOW.timestamp()))
    assert stats.records == len(log.records) and stats.corrupt == log.merged
    assert stats.duplicates == log.duplicates
    assert stats.old_units == sum(cost_units(r["total_cost"]) or 0 for r in log.records)
    # The re-priced log still reads as each call once.
    again = list(iter_jsonl(out))
    assert [r["request_id"] for r in again] == [r["request_id"] for r in log.records]
    assert stats.new_units == sum(cost_units(r["total_cost"]) or 0 for r in again)


async def test_waiting_for_records_fails_on_timeout_never_returns_short(proxy) -> None:
    """The test helper reads the log too: a short read must fail the test, not pass it."""
    with pytest.raises(AssertionError, match="timed out after 0.3s waiting for 1 log records"):
        await proxy.wait_records(1, timeout=0.3)
    with pytest.raises(AssertionError, match="it holds 0"):
        await proxy.wait_raw_log(2, timeout=0.1)


# A field readers add up, given as something other than a number: "1" (a string cost
# used to become "1" * 10**10, a 10 GB string, in the report's scan and the budget
# replay), a list, an object, a boolean.
_HOSTILE = st.one_of(
    st.text(max_size=8),
    st.lists(st.integers(-1000, 1000), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-1000, 1000), max_size=1),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(NUMERIC_FIELDS), value=_HOSTILE, at=st.integers(0, 19))
def test_a_record_with_a_non_number_where_readers_add_is_corrupt_for_every_reader(field: str, value: Any, at: int) -> None:
    """One rule (engine.totals.well_typed) for every reader: such a line is skipped and
    counted as corrupt, and the other records are counted exactly as without it."""
    recs = sample(20, seed=11, days=1)
    bad = {**recs[at], field: value, "request_id": "req_hostile", "record_id": "rec_hostile"}
    data = b"".join(dumps(r) for r in recs[:at]) + dumps(bad) + b"".join(dumps(r) for r in recs[at:])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cost.jsonl"
        path.write_bytes(data)
        res = scan([path], Query(dims=("provider", "model")), jobs=1, use_index=False)
        want = expect(recs, lambda r: True)
        assert (res.totals().requests, res.totals().total_cost, res.bad_lines) == (want["requests"], want["cost"], 1)
        since = (NOW - timedelta(days=2)).timestamp()
        assert [r["request_id"] for r in records_since(path, since)] == [r["request_id"] for r in recs]
        ledger = BudgetLedger([Limit("global", "monthly", 10**6 * USD)], clock=lambda: NOW.timestamp())
        replay_log(ledger, path)
        assert ledger.states()[0].spent == sum(cost_units(r["total_cost"]) or 0 for r in recs if r["timestamp"] >= "2026-11-01")
        book = pricebook_for(parse_config({**yaml.safe_load(CONFIG), "catalog": {"enabled": False}}))
        stats = RepriceStats()
        out = b"".join(reprice_lines(iter(data.splitlines(keepends=True)), book, stats, NOW.timestamp()))
        assert (stats.records, stats.corrupt) == (len(recs), 1)
        assert dumps(bad) in out  # an unreadable line is copied as it is


@pytest.mark.parametrize("cost", ["1", 1e300, -1e300])
def test_a_string_or_absurd_cost_in_the_log_is_a_warning_not_a_crash(tmp_path: Path, cost: Any) -> None:
    # 1e300 is a number, but as 1e-10 units it overflows to infinity (OverflowError).
    recs = sample(5, seed=12, days=1)
    bad = {**recs[0], "total_cost": cost, "input_cost": cost, "request_id": "req_hostile", "record_id": "rec_hostile"}
    (tmp_path / "cost.jsonl").write_bytes(b"".join(dumps(r) for r in recs) + dumps(bad))
    since = (NOW - timedelta(days=2)).timestamp()
    assert len(list(records_since(tmp_path / "cost.jsonl", since))) == len(recs)
    for fmt in ("summary", "detailed", "csv", "json"):
        p = run("--log-file", str(tmp_path / "cost.jsonl"), "--since", "all", "--format", fmt)
        assert "warning: skipped 1 corrupt or incomplete line" in p.stderr, fmt
        assert "req_hostile" not in p.stdout and "Traceback" not in p.stderr, fmt
