"""``python -m proxy stats`` (the period's quick numbers) and ``export`` (one row per
request as CSV, JSON or JSONL) on small logs built here."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from proxy.cli.app import cli
from tests.support.records import gpt4o_call

UTC = timezone.utc


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def write_log(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def calls(now: datetime) -> list[dict[str, Any]]:
    """Today, earlier this month (when the month has an earlier day), and last month."""
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    earlier = max(month_start, now - timedelta(days=40)) + timedelta(minutes=1)
    return [
        gpt4o_call((now - timedelta(minutes=5)).timestamp(), tags={"category": "planning"}, request_id="a"),
        gpt4o_call(
            (now - timedelta(minutes=4)).timestamp(),
            model="claude-haiku-4-5",
            response_model="claude-haiku-4-5",
            provider="anthropic",
            provider_type="anthropic",
            total_cost=0.0021,
            request_id="b",
            tags={"category": "technical"},
        ),
        gpt4o_call(earlier.timestamp(), request_id="c", total_cost=0.0105, input_tokens=3000, output_tokens=300, total_tokens=3300),
        gpt4o_call((month_start - timedelta(hours=1)).timestamp(), request_id="d", total_cost=7.0),  # last month
    ]


def in_period(recs: list[dict[str, Any]], start: datetime) -> list[dict[str, Any]]:
    return [r for r in recs if datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) >= start]


def test_stats_this_month_and_today_agree_with_the_records(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    recs = calls(now)
    log = tmp_path / "cost.jsonl"
    write_log(log, recs)
    month = in_period(recs, now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    today = in_period(recs, now.replace(hour=0, minute=0, second=0, microsecond=0))
    for period, want in (("monthly", month), ("daily", today)):
        res = invoke("stats", "--period", period, "--log-file", str(log), "--json", "--top=5")
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout, parse_float=Decimal)
        totals = doc["totals"]
        assert totals["requests"] == len(want)
        assert totals["total_cost"] == sum(Decimal(str(r["total_cost"])) for r in want)
        assert totals["tokens"]["total_tokens"] == sum(r["total_tokens"] for r in want)
        assert totals["avg_cost_per_request"] == (totals["total_cost"] / len(want)).quantize(Decimal("1e-10")).normalize()
        models = [m["model"] for m in doc["top_models"]]
        by_cost: dict[str, Decimal] = {}
        for r in want:
            by_cost[r["model"]] = by_cost.get(r["model"], Decimal(0)) + Decimal(str(r["total_cost"]))
        assert models == sorted(by_cost, key=lambda m: -by_cost[m])
    # Text: the same numbers, and --category selects by the tag.
    text = invoke("stats", "--log-file", str(log), "--category", "technical").stdout
    assert "this month" in text and "Requests           1" in text and "$0.0021" in text and "claude-haiku-4-5" in text


def test_stats_mistakes(tmp_path: Path) -> None:
    res = invoke("stats", "--period", "yearly", "--log-file", str(tmp_path / "x.jsonl"))
    assert res.exit_code == 2 and res.stderr.startswith("error:")
    res = invoke("stats", "--log-file", str(tmp_path / "missing.jsonl"))
    assert res.exit_code == 2 and "no log found" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_export_rows_are_the_selected_records(tmp_path: Path, fmt: str) -> None:
    now = datetime.now(UTC)
    recs = calls(now)
    log = tmp_path / "cost.jsonl"
    write_log(log, recs)
    out = tmp_path / f"out.{fmt}"
    start = (now - timedelta(days=1)).date().isoformat()
    res = invoke("export", "--format", fmt, "--log-file", str(log), "--start-date", start, "--model", "gpt-4o", "--output", str(out))
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    want = [r for r in in_period(recs, datetime.fromisoformat(start).replace(tzinfo=UTC)) if r["model"] == "gpt-4o"]
    text = out.read_text()
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["request_id"] for r in rows] == [r["request_id"] for r in want]
        assert [Decimal(r["total_cost"]) for r in rows] == [Decimal(str(r["total_cost"])) for r in want]
        # The same columns as the report's per-request CSV.
        report = invoke("report", "--format", "csv", "--log-file", str(log), "--since", "all").stdout
        assert next(csv.reader(io.StringIO(report))) == list(rows[0].keys())
    elif fmt == "json":
        assert text.startswith("[\n") and text.endswith("\n]\n")
        got = json.loads(text, parse_float=Decimal)
        assert [r["request_id"] for r in got] == [r["request_id"] for r in want]
        assert got[0]["tags"] == want[0]["tags"]
    else:
        got = [json.loads(line) for line in text.splitlines()]
        assert got == [json.loads(json.dumps(r)) for r in want]  # the records as the log holds them


def test_export_category_and_stdout_and_empty(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    recs = calls(now)
    log = tmp_path / "cost.jsonl"
    write_log(log, recs)
    res = invoke("export", "--format", "jsonl", "--log-file", str(log), "--category", "planning", "--output", "-")
    assert [json.loads(line)["request_id"] for line in res.stdout.splitlines()] == ["a"]
    res = invoke("export", "--format", "json", "--log-file", str(log), "--category", "nothing")
    assert json.loads(res.stdout) == []
    res = invoke("export", "--log-file", str(log))  # csv, every record of the log
    assert len(list(csv.reader(io.StringIO(res.stdout)))) == len(recs) + 1


@pytest.mark.parametrize(
    "args",
    [
        ["--format", "xml"],
        ["--start-date", "yesterday"],
        ["--start-date", "2026-11-10", "--end-date", "2026-11-01"],
        ["--tz", "Mars/Olympus"],
        ["--tag", "novalue"],
    ],
)
def test_export_mistake_never_truncates_the_output(tmp_path: Path, args: list[str]) -> None:
    log = tmp_path / "cost.jsonl"
    write_log(log, calls(datetime.now(UTC)))
    out = tmp_path / "keep.csv"
    out.write_text("precious\n")
    res = invoke("export", "--log-file", str(log), "--output", str(out), *args)
    assert res.exit_code == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1
    assert out.read_text() == "precious\n"
    missing = invoke("export", "--log-file", str(tmp_path / "none.jsonl"), "--output", str(out))
    assert missing.exit_code == 2 and out.read_text() == "precious\n"


def test_export_over_the_log_it_reads_is_refused_and_the_log_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "logs" / "cost-tracking.jsonl"
    log.parent.mkdir()
    write_log(log, calls(datetime.now(UTC)))
    before = log.read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COST_TRACKING_FILE", raising=False)
    # By its own name, by another spelling of it, and as the default log.
    for args in (
        ["--log-file", str(log), "--output", str(log)],
        ["--log-file", str(log), "--output", "logs/../logs/cost-tracking.jsonl"],
        ["--output", "logs/cost-tracking.jsonl"],
    ):
        res = invoke("export", "--format", "jsonl", *args)
        assert res.exit_code == 2 and "erase" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert log.read_bytes() == before
