"""``--latency`` with ``--group-by``: success rate and p50/p95 per group (a user, a tag,
several dimensions), as well as per provider and model; checked against nearest-rank
percentiles computed here from the records written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.analyze_cli import as_json, make_records, run
from tests.support.synthlog import write_log


def nearest_rank(values: list[float], p: int) -> float | None:
    if not values:
        return None
    v = sorted(int(x + 0.5) for x in values)  # whole milliseconds, as the report keeps them
    return float(v[max(1, math.ceil(p / 100 * len(v))) - 1])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    recs = make_records(900, seed=21, days=5)
    # Some calls without a latency: counted as requests, left out of the percentiles.
    for r in recs[::37]:
        r["latency_ms"] = None
    return write_log(tmp_path_factory.mktemp("lat") / "cost.jsonl", recs), recs


@pytest.mark.parametrize(
    "dims, key",
    [
        (["user"], lambda r: (r["user_id"],)),
        (["tag:feature"], lambda r: (r["tags"]["feature"],)),
        (["user", "provider"], lambda r: (r["user_id"], r["provider"])),
    ],
)
def test_latency_per_group(data: tuple[Path, list[dict[str, Any]]], dims: list[str], key: Callable[[dict[str, Any]], tuple]) -> None:
    log, recs = data
    body = as_json(run("--log-file", str(log), "--since", "all", "--format", "json", "--latency", "--group-by", ",".join(dims)))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(key(r), []).append(r)
    got = {tuple(row[d] for d in dims): row for row in body["latency"]["groups"]}
    assert set(got) == set(groups)
    for k, sel in groups.items():
        row = got[k]
        errors = sum(1 for r in sel if r["error"] or r["status"] >= 400)
        timed = [r["latency_ms"] for r in sel if r["latency_ms"] is not None]
        assert (row["requests"], row["errors"]) == (len(sel), errors)
        assert row["p50_ms"] == nearest_rank(timed, 50) and row["p95_ms"] == nearest_rank(timed, 95)
    assert {row["provider"] for row in body["latency"]["provider"]} == {r["provider"] for r in recs}  # still there


def test_the_text_shows_a_table_per_group_under_the_limit(data: tuple[Path, list[dict[str, Any]]]) -> None:
    log, recs = data
    p = run("--log-file", str(log), "--since", "all", "--latency", "--group-by", "user", "--limit", "2")
    text = p.stdout[p.stdout.index("Success rate and latency (ms)") :]
    users = {r["user_id"] for r in recs}
    assert f"  by user (top 2 of {len(users)})" in text
    lines = text.splitlines()
    head = lines.index(next(x for x in lines if x.split()[:3] == ["user", "requests", "success"]))
    busiest = sorted(users, key=lambda u: (-sum(1 for r in recs if r["user_id"] == u), u))[:2]
    assert [x.split()[0] for x in lines[head + 1 : head + 3]] == busiest
