"""The aggregation engine (proxy/engine/) and log storage (proxy/storage/), in process."""

from __future__ import annotations

import gzip
import os
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from proxy.core.timestamps import canonical_ts, iso_ms
from proxy.engine.cube import percentile
from proxy.engine.insights import project_month
from proxy.engine.query import ModelMatcher, Query, compile_query, status_matcher
from proxy.engine.totals import Totals
from proxy.storage import index as index_module
from proxy.storage import scan as scan_module
from proxy.storage.index import index_answers, index_path
from proxy.storage.logfiles import log_files, order_files
from proxy.storage.scan import scan
from proxy.storage.tasks import lines_in_range
from tests.support.analyze_cli import NOW, expect, make_records
from tests.support.synthlog import dumps, write_log

UTC = timezone.utc


def test_totals_counts_unknown_usage_apart_from_unpriced() -> None:
    t = Totals()
    t.add({"total_cost": None, "total_tokens": 30, "status": 200})
    t.add({"total_cost": None, "total_tokens": None, "status": 200, "error": "client disconnected"})
    t.add({"total_cost": 0.0000123, "input_cost": 0.00001, "output_cost": 0.0000023, "total_tokens": 5, "status": 200})
    assert (t.requests, t.unpriced, t.unknown, t.priced, t.errors) == (3, 1, 1, 1, 1)
    assert t.total_cost == Decimal("0.0000123") and t.incomplete
    u = Totals()
    u.merge(t)
    assert u.unknown == 1 and u.cost_units == t.cost_units


def test_model_matcher_snapshots_aliases_no_prefix() -> None:
    m = ModelMatcher(["gpt-4o"])
    assert m({"model": "gpt-4o"}) and m({"model": "gpt-4o-2024-08-06"})
    assert m({"model": "x", "response_model": "gpt-4o-2024-11-20"})
    assert not m({"model": "gpt-4o-mini"}) and not m({"model": "gpt-4o-mini-2024-07-18"})
    snap = ModelMatcher(["gpt-4o-2024-08-06"])
    assert snap({"model": "gpt-4o-2024-08-06"}) and not snap({"model": "gpt-4o", "response_model": "gpt-4o-2024-11-20"})
    alias = ModelMatcher(["sonnet"], {"sonnet": "claude-sonnet-4-5"})
    assert alias({"model": "claude-sonnet-4-5-20250929"}) and alias({"model": "sonnet"})
    assert not alias({"model": "claude-sonnet-4"})
    assert ModelMatcher(["claude-sonnet-4-5"], {"sonnet": "claude-sonnet-4-5"})({"model": "SONNET"})


def test_status_matcher() -> None:
    m = status_matcher(["4xx", "500"])
    assert m({"status": 429}) and m({"status": 500}) and not m({"status": 503}) and not m({"status": 200})
    ok = status_matcher(["ok"])
    assert ok({"status": 200}) and not ok({"status": 200, "error": "cut"}) and not ok({"status": 404})
    with pytest.raises(ValueError):
        status_matcher(["teapot"])


def test_time_bounds_are_exact_to_the_millisecond() -> None:
    t = datetime(2026, 11, 23, 18, 0, 0, 500, tzinfo=UTC).timestamp()  # 0.5 ms past the second
    assert iso_ms(t, ceil=True) == "2026-11-23T18:00:00.001Z"
    assert iso_ms(t) == "2026-11-23T18:00:00.000Z"
    assert canonical_ts("2026-11-23T19:00:00+01:00") == "2026-11-23T18:00:00.000Z"
    assert canonical_ts("2026-11-23T18:00:00") == "2026-11-23T18:00:00.000Z"
    assert canonical_ts("yesterday") is None and canonical_ts(None) is None


def test_percentile_nearest_rank() -> None:
    hist = {100: 50, 200: 45, 900: 5}
    assert percentile(hist, 50) == 100.0
    assert percentile(hist, 95) == 200.0
    assert percentile(hist, 96) == 900.0
    assert percentile({}, 50) is None


def test_log_files_rotation_and_order(tmp_path: Path) -> None:
    recs = make_records(30, days=3)
    write_log(tmp_path / "c.jsonl", recs[20:])
    write_log(tmp_path / "c.jsonl.1", recs[10:20])
    with gzip.open(tmp_path / "c.jsonl-20261120.gz", "wb") as f:
        f.write(b"".join(dumps(r) for r in recs[:10]))
    (tmp_path / ".c.jsonl.rollup").write_text("{}")
    (tmp_path / "c.jsonl.bak-notes.txt").write_text("not a log")
    files = order_files(log_files([str(tmp_path / "c.jsonl")]))
    assert [p.name for p in files] == ["c.jsonl-20261120.gz", "c.jsonl.1", "c.jsonl"]
    assert log_files([str(tmp_path / "c.jsonl")], rotated=False) == [tmp_path / "c.jsonl"]
    with pytest.raises(FileNotFoundError):
        log_files([str(tmp_path / "missing.jsonl")])


def test_line_ranges_give_each_line_to_exactly_one_task(tmp_path: Path) -> None:
    lines = [b"x" * n + b"\n" for n in (0, 1, 5, 17, 3, 40, 2, 9)]
    p = tmp_path / "f"
    p.write_bytes(b"".join(lines))
    size = p.stat().st_size
    for chunk in (1, 2, 3, 7, 16, size):
        got = []
        for s in range(0, size, chunk):
            with open(p, "rb") as f:
                got += list(lines_in_range(f, s, min(s + chunk, size)))
        assert got == lines, chunk


def test_parallel_scan_equals_sequential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = make_records(2000, seed=21, days=5)
    log = write_log(tmp_path / "log.jsonl", recs)
    monkeypatch.setattr(scan_module, "_CHUNK", 20_000)  # many small byte ranges
    monkeypatch.setattr(scan_module, "_PARALLEL_MIN", 0)
    q = Query(dims=("provider", "model", "user", "hour"), latency=True, top=5)
    par = scan([log], q, jobs=2, use_index=False)
    seq = scan([log], q, jobs=1, use_index=False)
    assert par.cells == seq.cells and par.latency == seq.latency and par.top_requests() == seq.top_requests()
    exp = expect(recs)
    t = par.totals()
    assert (t.requests, t.total_cost, t.unpriced, t.unknown) == (exp["requests"], exp["cost"], exp["unpriced"], exp["unknown"])
    assert par.first_ts == min(r["timestamp"] for r in recs) and par.last_ts == max(r["timestamp"] for r in recs)


def test_index_segments_match_raw_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = make_records(2500, seed=31, days=8)
    log = write_log(tmp_path / "log.jsonl", recs)
    monkeypatch.setattr(index_module, "_SEGMENT", 60_000)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", 10_000)
    start = (NOW - timedelta(days=3, minutes=17)).timestamp()  # a window edge inside a segment
    q = Query(start=start, dims=("provider", "model", "status", "day"), statuses=("ok",), providers=("openai", "gemini"))
    raw = scan([log], q, jobs=1, use_index=False)
    built = scan([log], q, jobs=1)  # builds the index
    data = orjson.loads(index_path(log).read_bytes())
    assert len(data["segments"]) > 5 and data["segments"][0]["a"] == 0
    used = scan([log], q, jobs=2)  # trusts the unchanged file
    for res in (built, used):
        assert res.rollup(["provider", "day"]) == raw.rollup(["provider", "day"])
        assert (res.first_ts, res.last_ts) == (raw.first_ts, raw.last_ts)
    # An index from another file under this name (rotation) is not used.
    data["stat"][1] += 1
    index_path(log).write_bytes(orjson.dumps(data))
    assert scan([log], q, jobs=1).rollup(["provider"]) == raw.rollup(["provider"])
    # Queries the roll-ups cannot answer go to the lines.
    assert not index_answers(Query(users=("bob",)), compile_query(Query(users=("bob",))))
    assert not index_answers(Query(dims=("user",)), compile_query(Query(dims=("user",))))


def test_project_month() -> None:
    end = datetime(2026, 11, 23, 18, tzinfo=UTC)
    buckets = {end - timedelta(hours=h): 10**10 for h in range(1, 24 * 30)}  # $1 an hour for 30 days
    p = project_month(buckets, end - timedelta(days=30), end)
    mtd = sum(v for b, v in buckets.items() if b >= datetime(2026, 11, 1, tzinfo=UTC))
    assert p.month == "2026-11" and p.month_to_date_units == mtd
    assert p.daily_rate_units == 24 * 10**10
    assert p.projected_units == mtd + round(7 * 24 * 10**10 * p.remaining_seconds / (7 * 86400))
    short = project_month({end - timedelta(hours=1): 10**10}, end - timedelta(hours=24), end)
    assert short.month_to_date_units is None and short.projected_units == round(10**10 * 30 * 86400 / 86400)


def test_old_rotated_file_skipped_by_mtime_only_when_safe(tmp_path: Path) -> None:
    recs = make_records(100, seed=41, days=2)
    log = write_log(tmp_path / "log.jsonl", recs)
    old = NOW.timestamp() - 10 * 86400
    os.utime(log, (old, old))  # "written 10 days ago": nothing in a 2-day window
    start = NOW.timestamp() - 2 * 86400
    q = Query(start=start)
    assert scan([log], q, use_index=False).totals().requests == 0
    os.utime(log, (NOW.timestamp(), NOW.timestamp()))
    assert scan([log], q, use_index=False).totals().requests == sum(1 for r in recs if r["timestamp"] >= iso_ms(start, ceil=True))


@pytest.mark.parametrize("mode,umask", [(0o600, 0o022), (0o644, 0o077), (0o640, 0o000)], ids=["600", "644", "640"])
def test_index_takes_the_log_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, umask: int) -> None:
    """Whatever the umask: the roll-ups tell what the log tells."""
    monkeypatch.setattr(index_module, "_SEGMENT", 60_000)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", 10_000)
    recs = make_records(800, seed=51, days=2)
    log = write_log(tmp_path / "log.jsonl", recs)
    os.chmod(log, mode)
    old = os.umask(umask)
    try:
        assert scan([log], Query(), jobs=1).totals().requests == len(recs)
        index = index_path(log)
        assert index.stat().st_mode & 0o777 == mode
        # A later change of the log's mode is followed when the index is next rewritten.
        os.chmod(log, 0o600 if mode != 0o600 else 0o640)
        with open(log, "ab") as f:
            f.write(dumps(make_records(1, seed=52, days=0.1)[0]))
        assert scan([log], Query(), jobs=1).totals().requests == len(recs) + 1
        assert index.stat().st_mode & 0o777 == log.stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [index.name, log.name]  # no temporary file left
