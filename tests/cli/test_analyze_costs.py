"""scripts/analyze_costs.py run as a user runs it, on generated logs.

Every expected number is computed here from the generated records with Decimal,
never read back from the tool's own output.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import subprocess
import sys
import zlib
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
import pytest

from tests.support import ROOT
from tests.support.analyze_cli import CONFIG, NOW, as_json, check_totals, dt, expect, make_records, run
from tests.support.synthlog import CLI, UTC, dumps, write_log


def in_last(hours: float) -> Callable[[dict[str, Any]], bool]:
    return lambda r: dt(r) >= NOW - timedelta(hours=hours)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    d = tmp_path_factory.mktemp("logs")
    recs = make_records()
    write_log(d / "cost-tracking.jsonl", recs)
    (d / "config.yml").write_text(CONFIG)
    return d, recs


def money_ok(text: str, exp: Decimal) -> bool:
    """A printed amount ("$1,234.5678", "≥$0.00042") is ``exp`` rounded to the digits
    shown, with at least four decimals."""
    shown = Decimal(text.lstrip("≥").lstrip("$").replace(",", ""))
    exponent = shown.as_tuple().exponent
    assert isinstance(exponent, int), text  # a finite amount
    places = -exponent
    return places >= 4 and exp.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP) == shown


# --- formats ---------------------------------------------------------------------------


def test_summary_default_window_and_at_least(data: tuple[Path, list]) -> None:
    # The layout line by line is tests/cli/test_guide_summary.py; here, the numbers.
    d, recs = data
    p = run(cwd=d, env={"COST_TRACKING_FILE": str(d / "cost-tracking.jsonl")})
    exp = expect(recs, in_last(24))
    assert exp["requests"] > 20
    out = p.stdout
    assert "Window: last 24 hours, times in UTC" in out
    assert f"\nTotal Requests: {exp['requests']}\n" in out
    line = next(x for x in out.splitlines() if x.startswith("Total Cost: "))
    assert money_ok(line.split()[2], exp["cost"])
    assert ("(at least: " in line) == bool(exp["unpriced"] or exp["unknown"])
    assert "\nCOST BY PROVIDER:\n" in out and "\nTOP MODELS BY COST:\n" in out
    for prov in {r["provider"] for r in recs if in_last(24)(r)}:
        assert f"\n{prov} " in out


def test_summary_wording_without_unpriced(data: tuple[Path, list]) -> None:
    d, recs = data
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--provider", "openai", "--status", "4xx")
    exp = expect(recs, lambda r: r["provider"] == "openai" and 400 <= r["status"] < 500)
    assert "at least" not in p.stdout and "≥" not in p.stdout and "lower bound" not in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("Total Cost: "))
    assert len(line.split()) == 3 and money_ok(line.split()[2], exp["cost"])


def test_json_totals_by_provider_and_model(data: tuple[Path, list]) -> None:
    d, recs = data
    body = as_json(run("--file", str(d / "cost-tracking.jsonl"), "--since", "7d", "--format", "json"))
    pred = in_last(168)
    check_totals(body["totals"], expect(recs, pred))
    for row in body["by_provider"]:
        check_totals(row, expect(recs, lambda r: pred(r) and r["provider"] == row["provider"]))
    assert {row["provider"] for row in body["by_provider"]} == {r["provider"] for r in recs if pred(r)}
    for row in body["by_model"]:
        check_totals(row, expect(recs, lambda r: pred(r) and r["model"] == row["model"]))
    exp = expect(recs, pred)
    assert body["totals"]["avg_cost_per_request"] == (exp["cost"] / exp["requests"]).quantize(Decimal("1e-10")).normalize()


def test_csv_per_request_and_output_file(data: tuple[Path, list], tmp_path: Path) -> None:
    d, recs = data
    out = tmp_path / "costs.csv"
    run("--file", str(d / "cost-tracking.jsonl"), "--since", "72", "--format", "csv", "--output", str(out))
    raw = out.read_bytes()
    assert b"\r\n" in raw  # RFC 4180 line ends, which spreadsheets expect
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    sel = [r for r in recs if in_last(72)(r)]
    assert len(rows) == len(sel)
    assert sum(Decimal(r["total_cost"]) for r in rows if r["total_cost"]) == expect(recs, in_last(72))["cost"]
    assert {r["request_id"] for r in rows} == {r["request_id"] for r in sel}
    users = {r["user_id"] for r in rows}
    assert "=cmd()" not in users and ("'=cmd()" in users or not any(r["user_id"] == "=cmd()" for r in sel))
    first = rows[0]["time_utc"]
    assert len(first) == 23 and first[10] == " "  # "2026-11-20 18:00:00.123"
    # attribution and provenance columns a finance sheet filters on
    assert {"team", "session_id", "pricing_source", "usage_source"} <= set(rows[0])


def test_csv_group_by_user(data: tuple[Path, list]) -> None:
    d, recs = data
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--format", "csv", "--group-by", "user")
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    for row in rows:
        user = row["user"][1:] if row["user"].startswith("'") else row["user"]
        exp = expect(recs, lambda r: r["user_id"] == user)
        assert int(row["requests"]) == exp["requests"]
        assert Decimal(row["total_cost"]) == exp["cost"]
    assert sum(int(r["requests"]) for r in rows) == len(recs)


def test_detailed_rows(data: tuple[Path, list]) -> None:
    d, recs = data
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", "48", "--format", "detailed", "--user", "alice")
    exp = expect(recs, lambda r: in_last(48)(r) and r["user_id"] == "alice")
    lines = p.stdout.splitlines()
    assert lines[0].startswith("time")
    assert len(lines) == exp["requests"] + 2
    assert all("alice" in line for line in lines[1:-1])
    assert lines[-1].startswith(f"{exp['requests']:,} requests, {'at least ' if exp['unpriced'] or exp['unknown'] else ''}$")
    assert money_ok(lines[-1].split()[-1], exp["cost"])


@pytest.mark.parametrize(
    "fmt,bucket",
    [
        ("hourly", lambda t: t.strftime("%Y-%m-%d %H:00")),
        ("daily", lambda t: t.strftime("%Y-%m-%d")),
        ("weekly", lambda t: f"{(t.date() - timedelta(days=t.weekday())).isoformat()} (W{t.isocalendar().week:02d})"),
        ("monthly", lambda t: t.strftime("%Y-%m")),
    ],
)
def test_time_series(data: tuple[Path, list], fmt: str, bucket: Callable[[datetime], str]) -> None:
    d, recs = data
    since = "48" if fmt == "hourly" else "all"
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", since, "--format", fmt)
    pred = in_last(48) if fmt == "hourly" else (lambda r: True)
    exp: dict[str, list] = defaultdict(lambda: [0, Decimal(0)])
    for r in recs:
        if pred(r):
            e = exp[bucket(dt(r))]
            e[0] += 1
            e[1] += r["total_cost"] or 0
    got = {}
    for line in p.stdout.splitlines():
        for label in exp:
            if line.startswith("  " + label + " "):
                parts = line[len(label) + 2 :].split()
                got[label] = (int(parts[0].replace(",", "")), parts[3])
    assert set(got) == set(exp)
    for label, (n, cost) in exp.items():
        assert got[label][0] == n
        assert money_ok(got[label][1], cost)
    if fmt == "hourly":  # quiet hours are listed, so peaks show in context
        assert sum(1 for line in p.stdout.splitlines() if line.startswith("  2026-")) >= 47


# --- filters, groups and periods --------------------------------------------------------


def test_model_filter_snapshots_aliases_never_prefix(data: tuple[Path, list]) -> None:
    d, recs = data
    log = str(d / "cost-tracking.jsonl")
    body = as_json(run("--file", log, "--since", "all", "--model", "gpt-4o", "--format", "json"))
    check_totals(body["totals"], expect(recs, lambda r: r["model"] in ("gpt-4o", "gpt-4o-2024-08-06")))
    assert "gpt-4o-mini" not in {m["model"] for m in body["by_model"]}
    body = as_json(run("--file", log, "--since", "all", "--model", "sonnet", "--config", str(d / "config.yml"), "--format", "json"))
    check_totals(body["totals"], expect(recs, lambda r: r["provider"] == "anthropic"))
    # Without the config the alias is unknown: only records that say "sonnet" or resolve to it.
    body = as_json(run("--file", log, "--since", "all", "--model", "claude-sonnet-4-5", "--config", "/nonexistent", "--format", "json"))
    check_totals(
        body["totals"],
        expect(recs, lambda r: r["model"] == "claude-sonnet-4-5" or (r["response_model"] or "").startswith("claude-sonnet-4-5")),
    )


def test_combined_filters(data: tuple[Path, list]) -> None:
    d, recs = data
    body = as_json(
        run(
            "--file",
            str(d / "cost-tracking.jsonl"),
            "--since",
            "30d",
            "--provider",
            "openai",
            "--provider",
            "gemini",
            "--user",
            "bob",
            "--tag",
            "feature=search",
            "--format",
            "json",
        )
    )
    check_totals(
        body["totals"],
        expect(
            recs,
            lambda r: (
                in_last(720)(r) and r["provider"] in ("openai", "gemini") and r["user_id"] == "bob" and r["tags"]["feature"] == "search"
            ),
        ),
    )
    body = as_json(run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--errors-only", "--format", "json"))
    check_totals(body["totals"], expect(recs, lambda r: bool(r["error"]) or r["status"] >= 400))
    body = as_json(
        run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--status", "500", "--status", "429", "--format", "json")
    )
    check_totals(body["totals"], expect(recs, lambda r: r["status"] in (429, 500)))


@pytest.mark.parametrize(
    "dims,keyf",
    [
        (["provider"], lambda r: (r["provider"],)),
        (["model"], lambda r: (r["model"],)),
        (["user"], lambda r: (r["user_id"],)),
        (["endpoint"], lambda r: (r["endpoint"],)),
        (["day"], lambda r: (dt(r).strftime("%Y-%m-%d"),)),
        (["hour"], lambda r: (dt(r).strftime("%Y-%m-%d %H:00"),)),
        (["tag:team", "provider"], lambda r: (r["tags"]["team"], r["provider"])),
        (["user,model"], lambda r: (r["user_id"], r["model"])),
    ],
)
def test_group_by(data: tuple[Path, list], dims: list[str], keyf: Callable) -> None:
    d, recs = data
    args = [x for dim in dims for x in ("--group-by", dim)]
    body = as_json(run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", *args, "--format", "json"))
    names = [n for dim in dims for n in dim.split(",")]
    groups = {tuple(g[n] for n in names): g for g in body["groups"]}
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)  # each record's group, worked out once
    for r in recs:
        by_key[keyf(r)].append(r)
    assert set(groups) == set(by_key)
    for key, g in groups.items():
        check_totals(g, expect(by_key[key]))


def test_dates_and_periods(data: tuple[Path, list]) -> None:
    d, recs = data
    log = str(d / "cost-tracking.jsonl")
    body = as_json(run("--file", log, "--start-date", "2026-11-01", "--end-date", "2026-11-10", "--format", "json"))
    lo, hi = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 11, tzinfo=UTC)  # end date is inclusive
    check_totals(body["totals"], expect(recs, lambda r: lo <= dt(r) < hi))
    body = as_json(run("--file", log, "--start-date", "2026-11-05T12:00", "--format", "json"))
    check_totals(body["totals"], expect(recs, lambda r: dt(r) >= datetime(2026, 11, 5, 12, tzinfo=UTC)))
    periods = {
        "monthly": (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        "weekly": (datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC)),  # a Monday
        "daily": (datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC)),
        "last-month": (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)),
    }
    for name, (a, b) in periods.items():
        body = as_json(run("--file", log, "--period", name, "--format", "json"))
        check_totals(body["totals"], expect(recs, lambda r: a <= dt(r) < b))
    # --tz moves day boundaries: a Tokyo day is 15:00 to 15:00 UTC.
    body = as_json(run("--file", log, "--start-date", "2026-11-20", "--end-date", "2026-11-20", "--tz", "Asia/Tokyo", "--format", "json"))
    check_totals(
        body["totals"], expect(recs, lambda r: datetime(2026, 11, 19, 15, tzinfo=UTC) <= dt(r) < datetime(2026, 11, 20, 15, tzinfo=UTC))
    )
    bad = run("--file", log, "--since", "24", "--period", "daily", ok=False)
    assert bad.returncode == 2 and "either" in bad.stderr


# --- input of any shape -----------------------------------------------------------------


def test_corrupt_and_torn_lines_are_counted(tmp_path: Path) -> None:
    recs = make_records(300, seed=9, days=2)
    lines = [dumps(r) for r in recs]
    lines.insert(100, b"this is not json\n")
    lines.insert(200, b'{"schema_version":1,"timestamp":"2026-11-23T01:00:00.000Z","provider":"op\x00\x00\n')
    torn = dumps(make_records(1, seed=10, days=0.1)[0])[:-40]  # the writer died mid-line
    (tmp_path / "log.jsonl").write_bytes(b"".join(lines) + torn)
    for extra in ([], ["--no-index"]):
        p = run("--file", str(tmp_path / "log.jsonl"), "--since", "all", "--format", "json", *extra)
        check_totals(as_json(p)["totals"], expect(recs))
        assert p.stderr.strip() == "warning: skipped 3 corrupt or incomplete lines"


def test_gzip_rotated_files_in_time_order(tmp_path: Path) -> None:
    recs = make_records(600, seed=5, days=6)
    old, mid, new = recs[:200], recs[200:400], recs[400:]
    with gzip.open(tmp_path / "cost-tracking.jsonl.2.gz", "wb") as f:
        f.write(b"".join(dumps(r) for r in old))
    write_log(tmp_path / "cost-tracking.jsonl.1", mid)
    write_log(tmp_path / "cost-tracking.jsonl", new)
    log = str(tmp_path / "cost-tracking.jsonl")
    body = as_json(run("--file", log, "--since", "all", "--format", "json"))
    check_totals(body["totals"], expect(recs))
    assert len(body["files"]) == 3 and body["files"][0].endswith(".2.gz")  # oldest first
    p = run("--file", log, "--since", "all", "--format", "detailed")
    ids = [line.split()[1] for line in p.stdout.splitlines()[1:-1]]
    assert len(ids) == 600
    body = as_json(run("--file", log, "--since", "all", "--no-rotated", "--format", "json"))
    check_totals(body["totals"], expect(new))
    body = as_json(run("--file", str(tmp_path / "*.gz"), "--since", "all", "--format", "json"))
    check_totals(body["totals"], expect(old))
    # A gzip cut short (copy interrupted): what it holds is read, with a warning.
    data = (tmp_path / "cost-tracking.jsonl.2.gz").read_bytes()
    (tmp_path / "cost-tracking.jsonl.2.gz").write_bytes(data[: len(data) // 2])
    p = run("--file", log, "--since", "all", "--format", "json")
    assert "EOFError" in p.stderr or "corrupt" in p.stderr
    assert as_json(p)["totals"]["requests"] >= 400


def test_older_schema_lines_still_read(tmp_path: Path) -> None:
    old = [
        {
            "timestamp": "2026-11-23T10:00:00+00:00",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 5,
            "total_tokens": 15,
            "total_cost": 0.0001,
            "status": 200,
        },
        {
            "timestamp": "2026-11-23T11:30:00Z",
            "provider": "anthropic",
            "model": "claude-sonnet-4-5",
            "total_cost": 0.25,
            "input_cost": 0.2,
            "output_cost": 0.05,
        },
    ]
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in old) + dumps(make_records(1, days=0.2)[0]))
    body = as_json(run("--file", str(log), "--since", "24", "--format", "json"))
    assert body["totals"]["requests"] == 3
    assert body["totals"]["total_cost"] == Decimal("0.2501") + (make_records(1, days=0.2)[0]["total_cost"] or 0)


def test_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    p = run(cwd=tmp_path, ok=False)
    assert p.returncode == 2 and "no log found at logs/cost-tracking.jsonl" in p.stderr


# --- the roll-up index -------------------------------------------------------------------
# In process, with segments of 60 kB instead of 16 MB, so that a few thousand records
# fill dozens of indexed segments and every check the index makes really runs.

SEG = 60_000


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.storage import index as index_module

    monkeypatch.setattr(index_module, "_SEGMENT", SEG)
    monkeypatch.setattr(index_module, "_MIN_SEGMENT", SEG // 6)
    monkeypatch.setenv("ANALYZE_COSTS_NOW", NOW.isoformat())


def report_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    from proxy.cli import report

    assert report.main(list(args)) == 0
    return json.loads(capsys.readouterr().out, parse_float=Decimal)


def records_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in data.splitlines()]


def by_day(records: list[dict[str, Any]]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for r in records:
        out[r["timestamp"][:10]] += r["total_cost"] or 0
    return dict(out)


def check_scan(path: Path, records: list[dict[str, Any]], jobs: int = 1) -> Any:
    """The indexed scan of ``path`` equals the raw scan and the numbers of ``records``."""
    from proxy.engine.query import Query
    from proxy.storage.scan import scan

    q = Query(dims=("provider", "model", "day"))
    res = scan([path], q, jobs=jobs)
    raw = scan([path], q, jobs=1, use_index=False)
    assert res.cells == raw.cells and (res.first_ts, res.last_ts) == (raw.first_ts, raw.last_ts)
    exp = expect(records)
    t = res.totals()
    assert (t.requests, t.errors, t.total_cost, t.unpriced, t.unknown, t.tokens["total_tokens"]) == (
        exp["requests"],
        exp["errors"],
        exp["cost"],
        exp["unpriced"],
        exp["unknown"],
        exp["tokens"],
    )
    assert {k[0]: v.total_cost for k, v in res.rollup(["day"]).items()} == by_day(records)
    return res


def flip_digit(data: bytes, at: int) -> tuple[bytes, int]:
    """One digit of a cost near ``at`` changed: same size, other bytes, other total."""
    i = data.index(b'"total_cost":0.0', at) + len(b'"total_cost":0.0')
    new = b"9" if data[i : i + 1] != b"9" else b"8"
    return data[:i] + new + data[i + 1 :], i


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes through the same inode, its mtime put back: only ctime tells."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_index_never_disagrees_with_the_log(tmp_path: Path, small_segments: None, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.engine.cube import REQ
    from proxy.engine.query import Query
    from proxy.storage.index import INDEX_DIMS, index_path
    from proxy.storage.scan import scan

    recs = make_records(3000, seed=11, days=10)
    log = write_log(tmp_path / "cost-tracking.jsonl", recs)
    check_scan(log, recs, jobs=2)
    index = orjson.loads(index_path(log).read_bytes())
    segs = index["segments"]
    assert len(segs) > 10 and segs[0]["a"] == 0 and all(x["b"] == y["a"] for x, y in zip(segs, segs[1:]))
    # The index is what answers: with the file untouched, a forged roll-up is believed.
    forged = json.loads(json.dumps(index))
    forged["segments"][0]["cells"][0][len(INDEX_DIMS) + 2 + REQ] += 1000
    index_path(log).write_bytes(orjson.dumps(forged))
    assert scan([log], Query(dims=("provider",)), jobs=1).totals().requests == len(recs) + 1000
    index_path(log).write_bytes(orjson.dumps(index))

    # Appended lines are read raw and indexed for the next run.
    more = make_records(400, seed=12, days=0.5)
    with open(log, "ab") as f:
        f.write(b"".join(dumps(r) for r in more))
    check_scan(log, recs + more)
    grown = orjson.loads(index_path(log).read_bytes())["segments"]
    assert len(grown) > len(segs) and grown[: len(segs)] == segs

    # One digit changed in an indexed segment, size, inode and mtime kept: the CRC-32
    # check must catch it and rebuild the index from the log.
    data, at = flip_digit(log.read_bytes(), len(log.read_bytes()) // 3)
    rewrite_in_place(log, data)
    hit = next(s for s in grown if s["a"] <= at < s["b"])
    edited = records_of(data)
    assert sum(r["total_cost"] or 0 for r in edited) != sum(r["total_cost"] or 0 for r in recs + more)
    check_scan(log, edited)
    rebuilt = orjson.loads(index_path(log).read_bytes())["segments"]
    new_hit = next(s for s in rebuilt if s["a"] <= at < s["b"])
    assert new_hit["crc32"] != hit["crc32"]
    assert new_hit["crc32"] == f"{zlib.crc32(data[new_hit['a'] : new_hit['b']]):08x}"
    # The report itself, with the rebuilt index and without any.
    args = ["--file", str(log), "--since", "all", "--format", "json", "--group-by", "day"]
    for extra in ([], ["--no-index"]):
        body = report_in_process(capsys, *args, *extra)
        check_totals(body["totals"], expect(edited))
        assert {g["day"]: g["total_cost"] for g in body["groups"]} == by_day(edited)


def test_index_of_a_gzip_file_follows_its_bytes(tmp_path: Path, small_segments: None) -> None:
    from proxy.storage.index import index_path

    recs = make_records(1500, seed=13, days=6)
    plain = b"".join(dumps(r) for r in recs)
    gz = tmp_path / "cost-tracking.jsonl.1.gz"
    gz.write_bytes(gzip.compress(plain, mtime=0))
    check_scan(gz, recs)
    [seg] = orjson.loads(index_path(gz).read_bytes())["segments"]
    assert seg["crc32"] == f"{zlib.crc32(gz.read_bytes()):08x}"  # the compressed bytes
    # The same compressed size with one digit changed inside.
    for at in range(len(plain) // 2, len(plain), 997):
        edited, _ = flip_digit(plain, at)
        packed = gzip.compress(edited, mtime=0)
        if len(packed) == gz.stat().st_size:
            break
    else:
        pytest.fail("no same-size edit found")
    rewrite_in_place(gz, packed)
    check_scan(gz, records_of(edited))
    [new] = orjson.loads(index_path(gz).read_bytes())["segments"]
    assert new["crc32"] == f"{zlib.crc32(packed):08x}" != seg["crc32"]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterable[Path]:
    """A tmpfs of our own, so the test can make its directory truly read-only (root
    ignores permission bits, not a read-only mount)."""
    where = tmp_path / "mnt"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, mode: str) -> None:
    p = subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot remount the tmpfs {mode}: {p.stderr.strip()}")


def test_read_only_log_directory_answers_without_writing_an_index(
    tmpfs: Path, small_segments: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.storage.index import index_path

    recs = make_records(2000, seed=14, days=5)
    log = write_log(tmpfs / "cost-tracking.jsonl", recs)
    fresh = write_log(tmpfs / "other.jsonl", recs[:700])  # never indexed
    check_scan(log, recs)
    old_index = index_path(log).read_bytes()
    # Changed (a digit flipped, lines appended) and then the directory made read-only:
    # the stale index is detected, rebuilt in memory, and cannot be saved.
    data, _ = flip_digit(log.read_bytes(), len(log.read_bytes()) // 2)
    more = make_records(300, seed=15, days=0.3)
    data += b"".join(dumps(r) for r in more)
    log.write_bytes(data)
    remount(tmpfs, "ro")
    try:
        with pytest.raises(OSError):
            (tmpfs / "probe").write_bytes(b"")
        for _ in range(2):  # the second run cannot rely on a saved rebuild either
            check_scan(log, records_of(data), jobs=2)
            assert index_path(log).read_bytes() == old_index
        check_scan(fresh, recs[:700])
        assert not index_path(fresh).exists()
        body = report_in_process(capsys, "--file", str(log), "--since", "all", "--format", "json")
        check_totals(body["totals"], expect(records_of(data)))
        assert sorted(p.name for p in tmpfs.iterdir()) == sorted([log.name, fresh.name, index_path(log).name])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True)


# --- what a person sees ----------------------------------------------------------------------

HOSTILE_MODEL = "evil\x1b[2J\x1b[Hmodel\u202egnp.exe\u2028next\x9b31m"
_C0_BUT_NEWLINE = {chr(c) for c in range(0x20)} - {"\n"}
UNSAFE = (
    _C0_BUT_NEWLINE
    | {"\x7f"}
    | {chr(c) for c in range(0x80, 0xA0)}
    | {"\u2028", "\u2029", "\u200e", "\u200f", "\u061c"}
    | {chr(c) for c in range(0x202A, 0x202F)}
    | {chr(c) for c in range(0x2066, 0x206A)}
)


def hostile_log(path: Path) -> list[dict[str, Any]]:
    recs = make_records(60, seed=21, days=1)
    for i, r in enumerate(recs[:20]):
        r["model"] = r["response_model"] = HOSTILE_MODEL
        r["provider"] = "prov\x1b]0;owned\x07"
        r["user_id"] = "\u2066mallory\u2069\u200f"
        r["endpoint"] = "/v1/x\r\nInjected: line"
        r["tags"] = {"feature": "t\u2029ag\x7f", "team": "x" * 5000}
        r["request_id"] = f"id-\x1b[31m{i}"
    write_log(path, recs)
    return recs


def test_printable_replaces_controls_separators_and_bidi() -> None:
    from proxy.core.text import printable

    assert printable(HOSTILE_MODEL) == "evil?[2J?[Hmodel?gnp.exe?next?31m"
    assert printable("ユーザー café 🙂") == "ユーザー café 🙂"  # other scripts kept
    assert printable(None) == "" and printable("\t\n\r\x00\u061c\u200e\u2066") == "???????"
    assert printable("\ud800x") == "?x"  # a lone surrogate cannot even be printed
    long = printable("a" * 1000)
    assert len(long) == 200 and long.endswith("…") and len(printable("a" * 1000, 40)) == 40
    assert not set(printable("".join(chr(c) for c in range(0x3000)))) & UNSAFE


@pytest.mark.parametrize(
    "fmt,extra",
    [
        ("summary", ["--all"]),
        ("summary", ["--group-by", "user,tag:feature,tag:team,endpoint", "--top", "5"]),
        ("detailed", []),
        ("daily", ["--latency", "--top", "3"]),
    ],
    ids=["summary-all", "summary-groups", "detailed", "daily"],
)
def test_text_reports_neutralise_control_and_bidi_characters(tmp_path: Path, fmt: str, extra: list[str]) -> None:
    log = tmp_path / "cost.jsonl"
    recs = hostile_log(log)
    (tmp_path / "config.yml").write_text(CONFIG)
    p = run("--file", str(log), "--since", "all", "--config", str(tmp_path / "config.yml"), "--format", fmt, *extra)
    bad = sorted({hex(ord(c)) for c in p.stdout + p.stderr if c in UNSAFE})
    assert bad == [], bad
    assert "evil?[2J?[Hmodel?gnp.exe?next?31m"[:20] in p.stdout  # shown, neutralised, not dropped
    if fmt != "detailed":
        assert "?mallory?" in p.stdout or "--group-by" not in extra
        assert max(len(line) for line in p.stdout.splitlines()) < 1200  # a 5,000-character tag is cut
    assert len(recs) == 60


def test_machine_outputs_keep_the_values_as_logged(tmp_path: Path) -> None:
    log = tmp_path / "cost.jsonl"
    hostile_log(log)
    body = as_json(run("--file", str(log), "--since", "all", "--format", "json", "--group-by", "user"))
    assert HOSTILE_MODEL in {m["model"] for m in body["by_model"]}
    assert "\u2066mallory\u2069\u200f" in {g["user"] for g in body["groups"]}
    rows = list(csv.reader(io.StringIO(run("--file", str(log), "--since", "all", "--format", "csv").stdout)))
    assert sum(1 for row in rows if HOSTILE_MODEL in row) == 20


# --- sections ---------------------------------------------------------------------------


def nearest_rank(values: list[float], p: int) -> float:
    v = sorted(int(x + 0.5) for x in values)
    return float(v[max(1, math.ceil(p / 100 * len(v))) - 1])


def test_latency_top_savings_projection(data: tuple[Path, list]) -> None:
    d, recs = data
    body = as_json(
        run(
            "--file",
            str(d / "cost-tracking.jsonl"),
            "--since",
            "all",
            "--config",
            str(d / "config.yml"),
            "--format",
            "json",
            "--latency",
            "--top",
            "3",
            "--savings",
            "--projection",
        )
    )
    for row in body["latency"]["provider"]:
        sel = [r for r in recs if r["provider"] == row["provider"]]
        assert row["requests"] == len(sel)
        assert row["p50_ms"] == nearest_rank([r["latency_ms"] for r in sel], 50)
        assert row["p95_ms"] == nearest_rank([r["latency_ms"] for r in sel], 95)
    top = sorted((r for r in recs if r["total_cost"]), key=lambda r: -r["total_cost"])[:3]
    assert [t["request_id"] for t in body["top_requests"]] == [r["request_id"] for r in top]
    rates = {m.response_model: (Decimal(m.input) - Decimal(m.cached)) for m in CLI.models if m.input is not None and m.cached is not None}
    saved = sum(
        (
            r["cache_read_tokens"] * rates[r["response_model"]] / 1_000_000
            for r in recs
            if r["cache_read_tokens"] and r["total_cost"] is not None
        ),
        Decimal(0),
    )
    assert body["cache_savings"]["saved"] == saved.quantize(Decimal("1e-10")).normalize()
    # Projection: November so far, plus the last 7 days' rate for the rest of the month.
    cost = lambda a, b: sum((r["total_cost"] or 0 for r in recs if a <= dt(r) < b), Decimal(0))  # noqa: E731
    month_start = datetime(2026, 11, 1, tzinfo=UTC)
    mtd = cost(month_start, NOW)
    recent = cost(NOW - timedelta(days=7), NOW)  # NOW is on the hour, so no partial bucket
    remaining = Decimal((datetime(2026, 12, 1, tzinfo=UTC) - NOW).total_seconds())
    proj = body["projection"]
    assert proj["month"] == "2026-11" and proj["month_to_date"] == mtd
    assert abs(proj["projected"] - (mtd + recent * remaining / (7 * 86400))) <= Decimal("1e-10")


def test_savings_without_config_and_suggestions(data: tuple[Path, list]) -> None:
    d, recs = data
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--config", "/nonexistent", "--savings")
    assert "Cache savings" in p.stdout and "pass --config" in p.stdout  # OpenAI/Gemini need a price
    p = run("--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--config", str(d / "config.yml"), "--all")
    assert "Suggestions" in p.stdout
    assert "openai/gpt-4o: " in p.stdout and "gpt-4o-mini's list price" in p.stdout
    assert "Most expensive requests (top 10)" in p.stdout and "p95" in p.stdout


def test_python_m_proxy_report(data: tuple[Path, list]) -> None:
    d, recs = data
    e = {**os.environ, "ANALYZE_COSTS_NOW": NOW.isoformat()}
    p = subprocess.run(
        [sys.executable, "-m", "proxy", "report", "--file", str(d / "cost-tracking.jsonl"), "--since", "all", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=e,
    )
    assert p.returncode == 0, p.stderr
    check_totals(json.loads(p.stdout, parse_float=Decimal)["totals"], expect(recs))
