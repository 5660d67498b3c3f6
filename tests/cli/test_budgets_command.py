"""``python -m proxy budgets``: every budget under a name of its own, money as numbers."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner

from proxy.cli.app import cli
from tests.support.records import gpt4o_call

CONFIG = """
catalog: {enabled: false}
providers:
  openai: {base_url: "http://127.0.0.1:1", models: {gpt-4o: {pricing: {input: 2.5, output: 10}}}}
budgets:
  limits:
    - {scope: user, match: alice, period: daily, usd: 5}    # alice alone
    - {scope: user, period: daily, usd: 10}                 # each user, alice too
    - {scope: tag, tag: feature, period: weekly, usd: 3}    # each feature
"""


def test_two_limits_on_one_user_have_two_names(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(CONFIG)
    log = tmp_path / "cost.jsonl"
    calls = [gpt4o_call(time.time() - 60 + i, tags={"feature": "search"}) for i in range(3)]
    log.write_text("".join(json.dumps(c) + "\n" for c in calls))
    run = CliRunner().invoke
    args = ["budgets", "--config", str(tmp_path / "config.yml"), "--log-file", str(log)]
    res = run(cli, [*args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line, parse_float=Decimal) for line in res.stdout.splitlines()]
    by_name = {r["budget"]: r for r in rows}
    assert len(by_name) == len(rows) == 3  # no name twice
    spent = sum(Decimal(str(c["total_cost"])) for c in calls)
    assert by_name["user:alice daily"]["limit_usd"] == 5
    assert by_name["user:alice daily (each user)"]["limit_usd"] == 10
    assert by_name["tag:feature=search weekly (each feature)"]["limit_usd"] == 3
    for r in rows:  # money as JSON numbers, never "$5.00"
        assert all(isinstance(r[k], (int, Decimal)) for k in ("limit_usd", "spent_usd", "remaining_usd"))
        assert r["spent_usd"] == spent
    table = run(cli, args, catch_exceptions=False).stdout.splitlines()
    names = [line.split("  ")[0] for line in table[1:] if line.startswith(("user:", "tag:"))]
    assert sorted(names) == sorted(by_name)


def test_a_limit_set_twice_or_absurdly_high_stops_with_its_key(tmp_path: Path) -> None:
    base = 'providers:\n  openai: {base_url: "http://127.0.0.1:1"}\nbudgets:\n  limits:\n'
    cases = {
        "    - {scope: user, match: alice, period: daily, usd: 5}\n    - {scope: user, match: alice, period: daily, usd: 3}\n": (
            "budgets.limits[1]",
            "same budget as budgets.limits[0]",
        ),
        "    - {scope: global, period: monthly, usd: 1e308}\n": ("budgets.limits[0].usd", "at most"),
    }
    for limits, (key, reason) in cases.items():
        (tmp_path / "config.yml").write_text(base + limits)
        res = CliRunner().invoke(cli, ["budgets", "--config", str(tmp_path / "config.yml"), "--log-file", str(tmp_path / "none.jsonl")])
        assert res.exit_code == 2 and key in res.stderr and reason in res.stderr and res.stderr.count("\n") == 1, res.stderr
