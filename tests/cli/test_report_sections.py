"""The report's smaller options and the sections that scan on their own (--compare,
--sessions, --users), each checked against totals recomputed here from the records."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from tests.support.analyze_cli import NOW, as_json, run
from tests.support.synthlog import write_log


def records(n: int, seed: int, hours: float = 24 * 16) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = NOW - timedelta(hours=rnd.uniform(0, hours))
        priced = i % 11 != 0
        out.append(
            {
                "schema_version": 1,
                "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
                "record_id": f"r-{seed}-{i}",
                "provider": rnd.choice(["openai", "anthropic"]),
                "model": rnd.choice(["m-a", "m-b"]),
                "status": 200,
                "input_tokens": 100,
                "output_tokens": 10,
                "total_tokens": 110,
                "total_cost": Decimal(rnd.randint(1, 10**8)) / 10**10 if priced else None,
                "user_id": rnd.choice(["ann", "bob", "cy", None]),
                "session_id": rnd.choice([None, *(f"s{k}" for k in range(12))]),
                "tags": {"category": rnd.choice(["search", "chat"])},
            }
        )
    return out


def cost(sel: list[dict[str, Any]]) -> Decimal:
    return sum((r["total_cost"] or Decimal(0) for r in sel), Decimal(0))


def when(r: dict[str, Any]) -> str:
    return r["timestamp"][:10]


def test_category_is_the_category_tag_and_the_window_label_reads_plainly(tmp_path: Path) -> None:
    recs = records(300, seed=1)
    log = write_log(tmp_path / "c.jsonl", recs)
    by_cat = as_json(run("--log-file", str(log), "--since", "all", "--format", "json", "--category", "search"))
    by_tag = as_json(run("--log-file", str(log), "--since", "all", "--format", "json", "--tag", "category=search"))
    sel = [r for r in recs if r["tags"]["category"] == "search"]
    assert by_cat["totals"] == by_tag["totals"]
    assert by_cat["totals"]["requests"] == len(sel) and by_cat["totals"]["total_cost"] == cost(sel)
    p = run("--log-file", str(log), "--start-date", "2026-11-10", "--end-date", "2026-11-12")
    assert "Window: 2026-11-10 through 2026-11-12, times in UTC" in p.stdout.splitlines()


def test_json_money_is_numbers_everywhere(tmp_path: Path) -> None:
    log = write_log(tmp_path / "c.jsonl", records(200, seed=2))
    doc = as_json(run("--log-file", str(log), "--since", "all", "--format", "json", "--all", "-g", "user"))
    seen: list[Any] = []

    def walk(v: Any, key: str = "") -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif key != "suggestions":
            assert not (isinstance(v, str) and re.search(r"\$\d", v)), (key, v)
            if "cost" in key and not key.startswith("cost_is"):
                seen.append(v)

    walk(doc)
    assert seen and all(isinstance(v, (Decimal, int)) and not isinstance(v, bool) for v in seen)


def test_compare_sessions_and_active_users(tmp_path: Path) -> None:
    recs = records(600, seed=3)
    log = write_log(tmp_path / "c.jsonl", recs)
    doc = as_json(
        run(
            "--log-file",
            str(log),
            "--since",
            "24",
            "--format",
            "json",
            "--compare",
            "--sessions",
            "--users",
            "--sessions-sort",
            "cost",
            "--min-cost",
            "0.00001",
        )
    )
    # NOW is Monday 2026-11-23 18:00 UTC: this week is today so far; last week the 16th-22nd.
    today = [r for r in recs if when(r) == "2026-11-23"]
    periods = {
        "today": today,
        "yesterday": [r for r in recs if when(r) == "2026-11-22"],
        "this week": today,
        "last week": [r for r in recs if "2026-11-16" <= when(r) <= "2026-11-22"],
    }
    got = {x["period"]: (x["requests"], x["total_cost"]) for x in doc["compare"]}
    assert got == {k: (len(v), cost(v)) for k, v in periods.items()}

    window = [r for r in recs if r["timestamp"] >= (NOW - timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%S")]
    per: dict[str, list[dict[str, Any]]] = {}
    for r in window:
        if r["session_id"]:
            per.setdefault(r["session_id"], []).append(r)
    kept = {s: rs for s, rs in per.items() if cost(rs) >= Decimal("0.00001")}
    s = doc["sessions"]
    assert s["count"] == len(kept)
    assert s["requests_without_session_id"] == sum(1 for r in window if not r["session_id"])
    assert [x["total_cost"] for x in s["sessions"]] == sorted((cost(v) for v in kept.values()), reverse=True)
    avg = sum((cost(v) for v in kept.values()), Decimal(0)) / len(kept)
    assert s["avg_cost_per_session"] == avg.quantize(Decimal("1e-10"), ROUND_HALF_UP).normalize()

    users = {r["user_id"] for r in window if r["user_id"]}
    u = doc["active_users"]
    spent = cost([r for r in window if r["user_id"]])
    assert u["count"] == len(users) and u["total_cost"] == spent
    assert u["cost_per_active_user"] == (spent / len(users)).quantize(Decimal("1e-10"), ROUND_HALF_UP).normalize()

    text = run("--log-file", str(log), "--since", "24", "--sessions", "--users", "--compare", "--limit", "3").stdout
    assert f"Active users: {len(users)} (with at least one call)" in text
    assert f"Sessions: {len(per)} (average " in text and "by recent (top 3 of" in text
    assert re.search(r"^  today +≥?\$[\d.]+ +" + str(len(today)) + " ", text, re.M)


def test_a_bad_cost_bound_is_a_usage_error(tmp_path: Path) -> None:
    log = write_log(tmp_path / "c.jsonl", records(5, seed=4))
    p = run("--log-file", str(log), "--sessions", "--min-cost", "lots", ok=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --min-cost:")
