"""``scripts/analyze_costs.py`` run as a user runs it, on a synthetic log, and the totals
a report must show computed here from the generated records with Decimal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from tests.support import ROOT, synthlog

SCRIPT = ROOT / "scripts" / "analyze_costs.py"
NOW = datetime(2026, 11, 23, 18, 0, 0, tzinfo=timezone.utc)  # the reports' "now" (ANALYZE_COSTS_NOW)
# The prices of synthlog.CLI's models, as a config.yml says them, and an alias.
CONFIG = """
aliases:
  sonnet: claude-sonnet-4-5
providers:
  openai:
    base_url: https://api.openai.com
    models:
      "gpt-4o":      {pricing: {input: 2.50, output: 10.00, cached_input: 1.25}}
      "gpt-4o-mini": {pricing: {input: 0.15, output: 0.60, cached_input: 0.075}}
  anthropic:
    base_url: https://api.anthropic.com
    models:
      "claude-sonnet-4-5": {pricing: {input: 3.00, output: 15.00, cached_input: 0.30}}
      "claude-haiku-4-5":  {pricing: {input: 1.00, output: 5.00, cached_input: 0.10}}
  gemini:
    base_url: https://generativelanguage.googleapis.com
    models:
      "gemini-2.5-flash": {pricing: {input: 0.30, output: 2.50, cached_input: 0.03}}
"""


def make_records(n: int = 1500, seed: int = 3, days: float = 40.0, end: datetime = NOW) -> list[dict[str, Any]]:
    """Records like the proxy's (synthlog's CLI mix), costs exact decimals (as Decimal in the dicts)."""
    return list(synthlog.records(n, mix=synthlog.CLI, seed=seed, days=days, end=end))


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "ANALYZE_COSTS_NOW": NOW.isoformat(), **(env or {})}
    e.pop("COST_TRACKING_FILE", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd or ROOT, env=e)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def as_json(p: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(p.stdout, parse_float=Decimal)


def dt(rec: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))


def expect(records: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, Any]:
    sel = [r for r in records if pred(r)]
    return {
        "requests": len(sel),
        "errors": sum(1 for r in sel if r["error"] or r["status"] >= 400),
        "cost": sum((r["total_cost"] for r in sel if r["total_cost"] is not None), Decimal(0)),
        "unpriced": sum(1 for r in sel if r["total_cost"] is None and r["total_tokens"]),
        "unknown": sum(1 for r in sel if r["total_cost"] is None and r["total_tokens"] is None),
        "tokens": sum(r["total_tokens"] or 0 for r in sel),
    }


def check_totals(got: dict[str, Any], exp: dict[str, Any]) -> None:
    assert got["requests"] == exp["requests"]
    assert got["errors"] == exp["errors"]
    assert got["total_cost"] == exp["cost"]
    assert got["unpriced_requests"] == exp["unpriced"]
    assert got["unknown_usage_requests"] == exp["unknown"]
    assert got["tokens"]["total_tokens"] == exp["tokens"]
    assert got["cost_is_lower_bound"] == bool(exp["unpriced"] or exp["unknown"])
