"""``python -m proxy budgets``: each budget's limit, spend, remaining and reset time."""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime

import orjson

from proxy.budgets import Limit, ledger_for
from proxy.cli import command
from proxy.config import load_sections
from proxy.core.money import format_usd
from proxy.core.records import json_default
from proxy.defaults import default_log_path
from proxy.errors import ConfigError
from proxy.storage.keyfile import KeyStore
from proxy.storage.replay import replay_log

_INF = math.inf


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


@command("budgets", "each budget's limit, spend, remaining and reset time")
def budgets_main(argv: list[str]) -> int:

    ap = argparse.ArgumentParser(
        prog="python -m proxy budgets", description="Each budget's limit, spend, remaining and reset time, from the log."
    )
    ap.add_argument("--config", default="config.yml")
    ap.add_argument("--log-file", default=None, help="JSONL log (default: $COST_TRACKING_FILE or logs/cost-tracking.jsonl)")
    ap.add_argument("--json", action="store_true", help="one JSON object per budget")
    args = ap.parse_args(argv)
    try:
        auth, budgets = load_sections(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key_limits: list[Limit] = []
    if auth is not None:
        try:
            key_limits = KeyStore(auth.keys_file, auth.admin_hashes).budget_limits()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if budgets is None and not key_limits:
        print(f"{args.config} has no budgets (add a budgets: section; see docs/budgets.md)", file=sys.stderr)
        return 1
    ledger = ledger_for(budgets, auth)
    log_path = args.log_file or default_log_path()
    t0 = time.perf_counter()
    read, _ = replay_log(ledger, log_path)
    took = time.perf_counter() - t0
    states = ledger.states(key_limits)
    if args.json:
        for s in states:
            sys.stdout.buffer.write(
                orjson.dumps(
                    {**s.as_dict(), "percent": round(s.fraction * 100, 1) if s.fraction != _INF else None},
                    default=json_default,
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
        return 0
    tz = ledger.tz
    rows = []
    for s in states:
        resets = datetime.fromtimestamp(s.end, tz).strftime("%Y-%m-%d %H:%M %Z") if s.end != _INF else "never (session)"
        pct = "-" if s.fraction == _INF else f"{s.fraction * 100:.0f}%"
        flag = "EXHAUSTED" if s.fraction >= 1 else ("warning" if s.fraction >= ledger.warn_at else "")
        rows.append(
            [
                s.name,
                format_usd(s.limit.units, exact=True),
                format_usd(s.spent, exact=True),
                format_usd(s.remaining, exact=True),
                pct,
                resets,
                flag,
            ]
        )
    print(_table(rows, ["BUDGET", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS", ""]))
    each = [lim for lim in (budgets.limits if budgets else ()) if lim.match is None and lim.scope != "global"]
    if each:
        scopes = "/".join(sorted({lim.scope for lim in each}))
        print(f"\n{len(each)} limit(s) apply to each {scopes} separately; only values with spend this period are listed.")
    print(f"(from {read} log records in {took:.2f}s; periods in {budgets.timezone if budgets else 'UTC'})", file=sys.stderr)
    return 0
