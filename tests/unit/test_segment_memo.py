"""The segment memo (storage/memo.py): a long-lived reader's results of whole indexed
segments give, for any query shape and window, exactly what a full read of the log gives,
also after the log grows or an indexed byte changes; and a repeated shape reads only what
the window cuts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, pricebook_for
from proxy.engine.cube import ScanResult
from proxy.engine.query import Query
from proxy.storage import index as index_module
from proxy.storage.memo import SegmentMemo
from proxy.storage.scan import scan
from tests.support.analyze_cli import NOW, make_records
from tests.support.synthlog import dumps, write_log

BOOK = pricebook_for(Config(path="none", providers={}))

SHAPES = [
    Query(dims=("provider", "model", "user", "hour")),
    Query(dims=("session", "hour")),
    Query(dims=("provider", "model"), latency=True),
    Query(dims=("provider", "model"), top=7),
    Query(dims=("provider", "model", "day"), savings=True, habits=True, pricebook=BOOK),
    Query(dims=("provider", "model", "day"), users=("alice", "=cmd()")),
    Query(dims=("provider", "model"), tags=(("feature", "chat"),)),
]


def records(n: int, seed: int, days: float, **kw: object) -> list[dict]:
    """The CLI tests' records, with sessions and times to first byte as the proxy writes them."""
    out = make_records(n, seed=seed, days=days, **kw)  # type: ignore[arg-type]
    for i, r in enumerate(out):
        r["session_id"] = f"s{(i * 7 + seed) % 41}" if i % 3 else None
        if r.get("latency_ms") is not None and i % 2:
            r["ttft_ms"] = round(r["latency_ms"] / 3, 1)
    return out


def same(a: ScanResult, b: ScanResult) -> None:
    assert a.cells == b.cells
    assert a.latency == b.latency and a.ttft == b.ttft
    assert a.top_requests() == b.top_requests()
    assert a.savings_by_rate == b.savings_by_rate and a.savings_derived_units == b.savings_derived_units
    assert a.savings_unpriced_tokens == b.savings_unpriced_tokens
    assert a.habits == b.habits
    assert (a.first_ts, a.last_ts) == (b.first_ts, b.last_ts)
    assert (a.bad_lines, a.duplicate_lines) == (b.bad_lines, b.duplicate_lines)


@pytest.fixture()
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_SEGMENT", 50_000)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", 8_000)


@pytest.fixture()
def smaller_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the small segments, for a log of half the records: as many segments to cut."""
    monkeypatch.setattr(index_module, "_SEGMENT", 25_000)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", 4_000)


def _window(q: Query, start_h: float | None, span_h: float | None) -> Query:
    start = (NOW - timedelta(hours=start_h)).timestamp() if start_h is not None else None
    end = start + span_h * 3600 if (start is not None and span_h is not None) else None
    return replace(q, start=start, end=end)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.sampled_from(range(len(SHAPES))),
    windows=st.lists(
        st.tuples(st.one_of(st.none(), st.floats(1, 200)), st.one_of(st.none(), st.floats(0.5, 100))),
        min_size=2,
        max_size=4,
    ),
)
def test_memo_scans_equal_full_reads(tmp_path_factory: pytest.TempPathFactory, smaller_segments: None, shape: int, windows: list) -> None:
    # ~20 segments of ~30 records over the 8 days (each example indexes a log of its own).
    log = write_log(tmp_path_factory.mktemp("memo") / "log.jsonl", records(600, seed=shape + 5, days=8))
    memo = SegmentMemo()
    for start_h, span_h in windows:
        q = _window(SHAPES[shape], start_h, span_h)
        same(scan([log], q, jobs=1, memo=memo), scan([log], q, jobs=1, use_index=False))


def test_a_repeated_shape_reads_only_what_the_window_cuts(tmp_path: Path, small_segments: None) -> None:
    recs = records(2000, seed=9, days=8)
    log = write_log(tmp_path / "log.jsonl", recs)
    memo = SegmentMemo()
    q = Query(dims=("user", "session"), start=(NOW - timedelta(days=6)).timestamp())
    same(scan([log], q, jobs=1, memo=memo), scan([log], q, jobs=1, use_index=False))
    first = memo.misses
    assert first > 3  # every whole segment of the window was read once
    later = replace(q, start=(q.start or 0) + 3600 * 5)  # the window moved on
    same(scan([log], later, jobs=1, memo=memo), scan([log], later, jobs=1, use_index=False))
    assert memo.misses == first  # nothing whole was read again

    # The log grows: new segments are read once, and the answer still equals a full read.
    with open(log, "ab") as f:
        for rec in records(600, seed=10, days=0.2, end=NOW + timedelta(hours=6)):
            f.write(dumps(rec))
    same(scan([log], q, jobs=1, memo=memo), scan([log], q, jobs=1, use_index=False))

    # A byte changed in an indexed segment: the index is rebuilt, the memo's old results
    # (keyed by the segment's CRC-32) are not used.
    data = bytearray(log.read_bytes())
    i = data.index(b'"user_id":"alice"', 1000) + len(b'"user_id":"')
    data[i : i + 5] = b"carol"  # the same length: only the hash can tell
    log.write_bytes(bytes(data))
    same(scan([log], q, jobs=1, memo=memo), scan([log], q, jobs=1, use_index=False))


def test_the_memo_keeps_only_its_newest_shapes(tmp_path: Path, small_segments: None) -> None:
    log = write_log(tmp_path / "log.jsonl", records(800, seed=4, days=3))
    memo = SegmentMemo(max_shapes=2)
    for top in (3, 4, 5):
        scan([log], Query(top=top), jobs=1, memo=memo)
    assert len(memo) == 2
    misses = memo.misses
    scan([log], Query(top=5), jobs=1, memo=memo)
    assert memo.misses == misses  # the newest shape is still there
    scan([log], Query(top=3), jobs=1, memo=memo)
    assert memo.misses > misses  # the oldest was dropped


def test_a_trusted_index_is_not_saved_as_checked(tmp_path: Path, small_segments: None) -> None:
    """The memo trusts a grown log between audits; the index it saves must still make the
    CLI (no memo) check every segment. Once it was saved with the new stat, so a byte
    changed in place before the append went unseen by the CLI too."""
    log = write_log(tmp_path / "log.jsonl", records(2000, seed=12, days=8))
    memo = SegmentMemo()
    q = Query(dims=("provider", "model", "status"))
    scan([log], q, jobs=1, memo=memo)
    data = bytearray(log.read_bytes())
    i = data.index(b'"status":200', len(data) // 3) + len(b'"status":')
    data[i : i + 3] = b"500"  # in place: same inode, same size
    with open(log, "r+b") as f:
        f.write(data)
    with open(log, "ab") as f:
        f.write(dumps(records(1, seed=13, days=0.01)[0]))
    scan([log], q, jobs=1, memo=memo)  # trusted: one segment audited, maybe not this one
    same(scan([log], q, jobs=1), scan([log], q, jobs=1, use_index=False))
