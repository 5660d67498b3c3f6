"""``python -m proxy budgets``: each budget's limit, spend, remaining and reset time."""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime

import click
import orjson

from proxy.budgets import Limit, ledger_for
from proxy.cli.base import CONTEXT, Command, text_table
from proxy.cli.options import config_option, json_option, log_file_option
from proxy.config import load_sections
from proxy.core.money import format_usd
from proxy.core.records import json_default
from proxy.storage.keyfile import KeyStore
from proxy.storage.replay import replay_log

_INF = math.inf


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="the config file whose budgets: and auth: sections apply")
@log_file_option(help="the JSONL cost log the spend is read from")
@json_option(help="one JSON object per budget")
def budgets(config: str, log_file: str, as_json: bool) -> int:
    """Each budget's limit, spend, remaining and reset time, from the log."""
    auth, section = load_sections(config)
    key_limits: list[Limit] = []
    if auth is not None:
        key_limits = KeyStore(auth.keys_file, auth.admin_hashes).budget_limits()
    if section is None and not key_limits:
        click.echo(f"{config} has no budgets (add a budgets: section; see docs/budgets.md)", err=True)
        return 1
    ledger = ledger_for(section, per_key=auth is not None)
    t0 = time.perf_counter()
    read, _ = replay_log(ledger, log_file)
    took = time.perf_counter() - t0
    states = ledger.states(key_limits)
    if as_json:
        out = sys.stdout.buffer
        for s in states:
            percent = round(s.fraction * 100, 1) if s.fraction != _INF else None
            out.write(orjson.dumps({**s.as_dict(), "percent": percent}, default=json_default, option=orjson.OPT_APPEND_NEWLINE))
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
    click.echo(text_table(rows, ["BUDGET", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS", ""]))
    each = [lim for lim in (section.limits if section else ()) if lim.match is None and lim.scope != "global"]
    if each:
        scopes = "/".join(sorted({lim.scope for lim in each}))
        click.echo(f"\n{len(each)} limit(s) apply to each {scopes} separately; only values with spend this period are listed.")
    click.echo(f"(from {read} log records in {took:.2f}s; periods in {section.timezone if section else 'UTC'})", err=True)
    return 0
