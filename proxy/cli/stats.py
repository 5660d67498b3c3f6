"""``python -m proxy stats``: the quick numbers for the current calendar period (the cost
tracker's ``stats``): total cost, requests, tokens, the average per request and the top
models. Every number is the report's: the same window (``reports.window``), files,
engine ``Query`` and scan (``storage.scan``), summed by ``engine.totals.Totals``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import click
import orjson

from proxy.cli.base import CONTEXT, Command, text_table
from proxy.cli.export import model_aliases
from proxy.cli.options import category_option, config_option, json_option, log_file_option, log_from_default, with_category
from proxy.core.money import format_usd
from proxy.core.text import printable
from proxy.engine.cube import ScanResult
from proxy.engine.totals import Totals
from proxy.reports.build import request_query, resolve_files, scan_warnings
from proxy.reports.jsondoc import totals_json
from proxy.reports.numbers import ratio
from proxy.reports.request import ReportRequest
from proxy.reports.window import Window, get_tz, resolve_window
from proxy.storage.scan import scan

PERIODS = ("daily", "weekly", "monthly")

EXAMPLES = """Examples:

\b
  {prog}                          this month
  {prog} --period daily           today
  {prog} --period weekly --tz Europe/Berlin
  {prog} --model gpt-4o --json    for scripts; money as JSON numbers

\b
daily is today, weekly this week from Monday, monthly this month, in --tz. For other
windows and breakdowns: `python -m proxy report`."""


class StatsCommand(Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = EXAMPLES.format(prog=ctx.command_path)
        super().format_epilog(ctx, formatter)


def top_models(res: ScanResult, n: int) -> list[tuple[str, str, Totals]]:
    """(model, provider, totals), most expensive first, then most requests."""
    rows = [(str(k[0]), str(k[1]), t) for k, t in res.rollup(["model", "provider"]).items()]
    rows.sort(key=lambda r: (-r[2].cost_units, -r[2].requests, r[0], r[1]))
    return rows[:n]


def _cost(t: Totals) -> str:
    if not t.priced and t.incomplete:
        return "unpriced"
    return format_usd(t.total_cost, at_least=t.incomplete)


def stats_json(window: Window, res: ScanResult, top: int) -> dict[str, Any]:
    return {
        "period": {
            "label": window.label,
            "start": window.start.isoformat() if window.start else None,
            "end": window.end.isoformat() if window.end else None,
        },
        "totals": totals_json(res.totals()),
        "top_models": [{"model": m, "provider": p, **totals_json(t)} for m, p, t in top_models(res, top)],
    }


def stats_text(window: Window, res: ScanResult, top: int) -> str:
    t = res.totals()

    def money(amount: Decimal) -> str:
        return format_usd(amount, at_least=t.incomplete)

    assert window.start is not None and window.end is not None  # a calendar period has both
    last = window.end - timedelta(microseconds=1)
    span = f"{window.start:%Y-%m-%d}" + (f" to {last:%Y-%m-%d}" if last.date() != window.start.date() else "")
    lines = [
        f"Stats: {window.label} ({span}, {window.start.tzname() or 'UTC'})",
        "",
        f"Total cost         {money(t.total_cost)}",
        f"Requests           {t.requests:,}  ({t.errors:,} error{'s' if t.errors != 1 else ''})",
        f"Tokens             {t.tokens['total_tokens']:,}  (input {t.tokens['input_tokens']:,}, output {t.tokens['output_tokens']:,})",
        f"Avg per request    {money(ratio(t.total_cost, t.requests))}",
    ]
    if t.incomplete:
        n = t.unpriced + t.unknown
        lines.append(f"                   (≥: {n:,} request{'s' if n != 1 else ''} without a known cost)")
    models = top_models(res, top)
    if models:
        rows = [[printable(m, 60), printable(p, 30), f"{x.requests:,}", f"{x.tokens['total_tokens']:,}", _cost(x)] for m, p, x in models]
        lines += ["", "Top models", text_table(rows, ["model", "provider", "requests", "tokens", "cost"])]
    return "\n".join(lines) + "\n"


@click.command(cls=StatsCommand, context_settings=CONTEXT)
@click.option("--period", type=click.Choice(PERIODS), default="monthly", show_default=True, help="today, this week or this month")
@click.option("--tz", default="UTC", show_default=True, help="time zone of the period ('local' or e.g. Europe/Berlin)")
@click.option("--model", multiple=True, metavar="MODEL", help="only this model (alias or snapshot); repeatable")
@category_option()
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True, metavar="N", help="how many models to list")
@log_file_option(multiple=True, help="log file, glob or directory; repeatable; rotated and .gz siblings included")
@config_option(help="config for model aliases (optional)")
@json_option(help="one JSON document, money as numbers")
@click.pass_context
def stats(
    ctx: click.Context,
    period: str,
    tz: str,
    model: tuple[str, ...],
    category: tuple[str, ...],
    top: int,
    log_file: tuple[str, ...],
    config: str,
    as_json: bool,
) -> int:
    """The quick numbers: spend, requests and tokens today, this week or this month."""
    req = ReportRequest(
        file=() if log_from_default(ctx) else log_file, config=config, period=period, tz=tz, model=model, tag=with_category((), category)
    )
    zone = get_tz(tz)
    window = resolve_window(req, zone, datetime.now(timezone.utc))
    files = resolve_files(req)
    warnings: list[str] = []
    aliases = model_aliases(config, model, warnings)
    query = request_query(req, window, zone, aliases, dims=("provider", "model"))
    res = scan(files, query)
    if as_json:
        click.echo(orjson.dumps(stats_json(window, res, top), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(stats_text(window, res, top), nl=False)
    for warning in warnings + scan_warnings(res):
        click.echo(f"warning: {warning}", err=True)
    return 0
