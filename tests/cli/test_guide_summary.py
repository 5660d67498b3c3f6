"""The default summary, line by line against the user guide's example ("Quick Summary
Report" in the cost tracking guide), which people parse in cron jobs.

The per-line patterns are made from the guide's text below (its values become groups,
everything else must be there as written, column positions included); the numbers
they capture are checked against totals this test computes with Decimal from the
records it wrote."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.analyze_cli import NOW, dt, make_records, run
from tests.support.records import gpt4o_call
from tests.support.synthlog import write_log

# The guide's example output, verbatim.
GUIDE = """\
============================================================
LLM PROXY COST ANALYSIS SUMMARY
============================================================
Time Period: 2024-12-19T10:30:00 to 2024-12-19T18:30:00
Total Cost: $12.345678
Total Requests: 147
Total Tokens: 45,230
Average Cost per Request: $0.084010
Average Cost per 1K Tokens: $0.273005

COST BY PROVIDER:
----------------------------------------
openai       | $8.234567 |    89 req |   28,150 tokens
anthropic    | $3.456789 |    42 req |   12,890 tokens
gemini       | $0.654322 |    16 req |    4,190 tokens

TOP MODELS BY COST:
--------------------------------------------------
openai/gpt-4o            | $5.123456 |    34 req |   15,230 tokens
anthropic/claude-3-opus  | $2.876543 |    18 req |    7,450 tokens
openai/gpt-4o-mini       | $1.456789 |    55 req |   12,920 tokens
"""
GUIDE_LINES = GUIDE.splitlines()
HEAD = GUIDE_LINES[: GUIDE_LINES.index("COST BY PROVIDER:") + 2]  # through the provider rule
PROVIDER_ROW = GUIDE_LINES[len(HEAD)]
MODEL_HEAD = GUIDE_LINES[GUIDE_LINES.index("TOP MODELS BY COST:") : GUIDE_LINES.index("TOP MODELS BY COST:") + 2]
MODEL_ROW = GUIDE_LINES[GUIDE_LINES.index("TOP MODELS BY COST:") + 2]
# What may follow an amount that is a lower bound (our addition after the guide's text).
LOWER_BOUND = r"(?P<extra> \(at least(?:: [^)]*)?\))?"

_VALUE = re.compile(r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)|\$(?P<money>\d+\.(?P<places>\d+))|(?P<count>\d[\d,]*)(?![\w])")


def pattern(guide_line: str) -> re.Pattern[str]:
    """The guide's line with each value made a group of the same form (ISO seconds,
    $ with as many decimals, a count with or without thousands commas)."""
    out, at = ["^"], 0
    for m in _VALUE.finditer(guide_line):
        out.append(re.escape(guide_line[at : m.start()]))
        if m["time"]:
            out.append(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")
        elif m["money"]:
            out.append(rf"\$(\d+\.\d{{{len(m['places'])}}})")
        else:
            out.append(r"(\d[\d,]*)" if "," in m["count"] else r"(\d+)")
        at = m.end()
    out.append(re.escape(guide_line[at:]))
    return re.compile("".join(out) + (LOWER_BOUND if "$" in guide_line else "") + "$")


def row_pattern(guide_row: str) -> re.Pattern[str]:
    """A table row: the guide's cells between `` | ``, each value a group; the padding
    may grow (widths are checked apart)."""
    name, cost, req, tokens = guide_row.split(" | ")
    assert name.rstrip() and cost.startswith("$") and req.strip().endswith(" req") and tokens.strip().endswith(" tokens")
    places = len(cost.split(".")[1])
    return re.compile(rf"^(\S.*?) *\| +\$(\d+\.\d{{{places}}}) \| +(\d+) req \| +(\d[\d,]*) tokens" + LOWER_BOUND + "$")


def bars(line: str) -> list[int]:
    return [i for i, c in enumerate(line) if c == "|"]


def usd6(d: Decimal) -> str:
    return str(d.quantize(Decimal("0.000001"), ROUND_HALF_UP))


def totals(recs: list[dict[str, Any]]) -> dict[str, Any]:
    # str of a float is the shortest text that round-trips: the digits the log holds.
    cost = sum((Decimal(str(r["total_cost"])) for r in recs if r.get("total_cost") is not None), Decimal(0))
    return {
        "requests": len(recs),
        "cost": cost,
        "tokens": sum(r.get("total_tokens") or 0 for r in recs),
        "unpriced": sum(1 for r in recs if r.get("total_cost") is None and r.get("total_tokens")),
        "unknown": sum(1 for r in recs if r.get("total_cost") is None and r.get("total_tokens") is None),
    }


def expected_rows(recs: list[dict[str, Any]], key: Any) -> list[tuple[str, dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(key(r), []).append(r)
    rows = [(k, totals(v)) for k, v in groups.items()]
    rows.sort(key=lambda kv: (-kv[1]["cost"], kv[0]))
    return [("/".join(k), t) for k, t in rows]


def by_provider(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["provider"],)


def by_model(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["provider"], str(r.get("model") or r.get("response_model")))


def check_summary(out: str, recs: list[dict[str, Any]], start: datetime, end: datetime, limit: int = 10) -> list[str]:
    """Match ``out`` line by line against the guide; returns the lines after the block."""
    lines = out.splitlines()
    exp = totals(recs)
    lower = bool(exp["unpriced"] or exp["unknown"])
    got = {}
    for i, guide_line in enumerate(HEAD):
        m = pattern(guide_line).match(lines[i])
        assert m, f"line {i + 1}: {lines[i]!r} does not have the guide's form {guide_line!r}"
        got[guide_line.split(":")[0]] = m
        if "$" in guide_line:
            assert bool(m["extra"]) == lower, lines[i]
    assert got["Time Period"].groups() == (start.isoformat(timespec="seconds"), end.isoformat(timespec="seconds"))
    assert got["Total Cost"][1] == usd6(exp["cost"])
    assert int(got["Total Requests"][1]) == exp["requests"]
    assert got["Total Tokens"][1] == f"{exp['tokens']:,}"
    n, tokens = exp["requests"], exp["tokens"]
    assert got["Average Cost per Request"][1] == usd6(exp["cost"] / n if n else Decimal(0))
    assert got["Average Cost per 1K Tokens"][1] == usd6(exp["cost"] * 1000 / tokens if tokens else Decimal(0))
    if lower:
        missing = got["Total Cost"]["extra"]
        assert (f"{exp['unpriced']} request" in missing) == bool(exp["unpriced"]), missing
        assert (f"{exp['unknown']} with unknown usage" in missing) == bool(exp["unknown"]), missing

    at = len(HEAD)
    for rows, guide_row, name_width, head in (
        (expected_rows(recs, by_provider), PROVIDER_ROW, 12, MODEL_HEAD),
        (expected_rows(recs, by_model)[:limit], MODEL_ROW, 24, None),
    ):
        shown = lines[at : at + len(rows)]
        assert len(shown) == len(rows)
        for line, (name, t) in zip(shown, rows):
            m = row_pattern(guide_row).match(line)
            assert m, f"{line!r} does not have the guide's form {guide_row!r}"
            assert (m[1], m[2], int(m[3]), m[4]) == (name, usd6(t["cost"]), t["requests"], f"{t['tokens']:,}")
            assert bool(m["extra"]) == bool(t["unpriced"] or t["unknown"]), line
        # Columns line up in every row; at the guide's places when the names fit its width.
        assert len({tuple(bars(x)) for x in shown}) <= 1, shown
        cells = guide_row.split(" | ")  # each as wide as the guide prints it
        fits = all(
            len(name) <= len(cells[0]) == name_width
            and len(usd6(t["cost"])) + 1 <= len(cells[1])
            and len(f"{t['requests']} req") <= len(cells[2])
            and len(f"{t['tokens']:,} tokens") <= len(cells[3])
            for name, t in rows
        )
        if shown and fits:
            assert bars(shown[0]) == bars(guide_row), (shown[0], guide_row)
        at += len(rows)
        assert lines[at] == "" if at < len(lines) else True
        if head is not None:
            assert lines[at + 1 : at + 1 + len(head)] == head
            at += 1 + len(head)
    return lines[at:]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    recs = make_records(1200, seed=11, days=4)
    return write_log(tmp_path_factory.mktemp("guide") / "cost-tracking.jsonl", recs), recs


def in_window(recs: list[dict[str, Any]], start: datetime, end: datetime) -> list[dict[str, Any]]:
    return [r for r in recs if start <= dt(r) < end]


def naive(t: datetime, tz: Any) -> datetime:
    return t.astimezone(tz).replace(tzinfo=None)


def test_the_default_summary_is_the_guides_layout(data: tuple[Path, list[dict[str, Any]]]) -> None:
    log, recs = data
    p = run("--log-file", str(log))
    sel = in_window(recs, NOW - timedelta(hours=24), NOW)
    assert len({r["provider"] for r in sel}) >= 3 and any(r["total_cost"] is None for r in sel)
    rest = check_summary(p.stdout, sel, naive(NOW - timedelta(hours=24), ZoneInfo("UTC")), naive(NOW, ZoneInfo("UTC")))
    # After the block: what it has no room for.
    assert "Window: last 24 hours, times in UTC" in rest
    assert f"Log: {log}" in rest
    assert any(x.startswith("Costs are lower bounds: ") for x in rest)


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_time_period_is_naive_iso_in_the_report_zone(data: tuple[Path, list[dict[str, Any]]], tz: str) -> None:
    log, recs = data
    p = run("--log-file", str(log), "--since", "2d", "--tz", tz, "--limit", "3")
    start = NOW - timedelta(days=2)
    rest = check_summary(p.stdout, in_window(recs, start, NOW), naive(start, ZoneInfo(tz)), naive(NOW, ZoneInfo(tz)), limit=3)
    assert f"Window: last 2 days, times in {tz}" in rest


def test_limit_filters_and_group_by_keep_the_block_first(data: tuple[Path, list[dict[str, Any]]]) -> None:
    log, recs = data
    p = run("--log-file", str(log), "--since", "all", "--provider", "openai", "--group-by", "user", "--limit", "2")
    sel = [r for r in recs if r["provider"] == "openai"]
    first = min(dt(r) for r in sel)  # an open window starts at the first record selected
    rest = check_summary(p.stdout, sel, naive(first, ZoneInfo("UTC")).replace(microsecond=0), naive(NOW, ZoneInfo("UTC")), limit=2)
    assert "Filters: provider=openai" in rest
    users = {r["user_id"] for r in sel}
    heading = next(x for x in rest if x.startswith("By user"))
    assert heading == "By user" + (f" (top 2 of {len(users)})" if len(users) > 2 else "")


def test_an_empty_period_still_has_every_label(tmp_path: Path) -> None:
    log = write_log(tmp_path / "cost.jsonl", [gpt4o_call((NOW - timedelta(days=3)).timestamp())])
    p = run("--log-file", str(log), "--since", "24")
    rest = check_summary(p.stdout, [], naive(NOW - timedelta(hours=24), ZoneInfo("UTC")), naive(NOW, ZoneInfo("UTC")))
    assert "No requests in this period." in rest
    assert "Total Cost: $0.000000" in p.stdout and "Total Requests: 0" in p.stdout


def test_wide_names_and_costs_grow_their_column_for_every_row(tmp_path: Path) -> None:
    t0 = (NOW - timedelta(hours=1)).timestamp()
    recs = [
        gpt4o_call(t0, total_cost=Decimal("1234.5678915"), input_tokens=10**7, output_tokens=0, total_tokens=10**7),
        gpt4o_call(t0 + 1, provider="a-provider-with-a-long-name", model="a-model-name-longer-than-the-guide-allows"),
        gpt4o_call(t0 + 2, model="gpt-4o-mini", total_cost=Decimal("0.0000004")),
    ]
    log = write_log(tmp_path / "cost.jsonl", recs)
    p = run("--log-file", str(log))
    check_summary(p.stdout, recs, naive(NOW - timedelta(hours=24), ZoneInfo("UTC")), naive(NOW, ZoneInfo("UTC")))
    assert "| $1234.567892 |" in p.stdout  # six places, half-up, no thousands separator
    assert "|    $0.000000 |" in p.stdout  # right-aligned under the widest
