"""``python -m proxy report`` and ``scripts/analyze_costs.py``: cost reports from the JSONL log.

Only the options live here: they become a ``ReportRequest``, and ``reports.build``
runs it (every number comes from ``proxy.engine`` and ``proxy.storage``).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import category_option, config_option, log_file_option, log_from_default, with_category
from proxy.cli.output import open_output
from proxy.cli.progress import ProgressLine
from proxy.core.periods import NAMED_PERIODS
from proxy.reports.build import write_report
from proxy.reports.extra import SESSION_SORTS
from proxy.reports.request import FORMATS, ReportRequest
from proxy.reports.window import Window, get_tz, resolve_window

UTC = timezone.utc

# Help in sections, as the options are many; an option not named here goes under "Options".
SECTIONS: dict[str, tuple[str, ...]] = {
    "Input": ("log_file", "no_rotated", "config", "jobs", "no_index"),
    "Time": ("since", "start_date", "end_date", "period", "tz"),
    "Output": (
        "fmt",
        "output",
        "group_by",
        "limit",
        "latency",
        "top",
        "savings",
        "projection",
        "suggest",
        "shares",
        "compare",
        "sessions",
        "sessions_sort",
        "min_cost",
        "max_cost",
        "users",
        "all_sections",
    ),
    "Filters (repeat a filter for alternatives; different filters combine)": (
        "provider",
        "model",
        "user",
        "status",
        "errors_only",
        "tag",
        "category",
    ),
}

EXAMPLES = """Examples:

\b
  {prog}                              last 24 hours, summary
  {prog} --period monthly --all       this month, with every section
  {prog} --since 7d --format daily    cost per day for a week
  {prog} --group-by user --group-by model --since 30d
  {prog} --model sonnet --errors-only --format detailed
  {prog} --format csv --output costs.csv --start-date 2026-11-01"""


class ReportCommand(Command):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: r for p in self.get_params(ctx) if (r := p.get_help_record(ctx)) is not None}
        for title, names in [*SECTIONS.items(), ("Options", tuple(n for n in records if not any(n in s for s in SECTIONS.values())))]:
            rows = [records[n] for n in names if n in records]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = EXAMPLES.format(prog=ctx.command_path)
        super().format_epilog(ctx, formatter)


def _many(*decls: str, metavar: str | None = None, help: str) -> Any:
    return click.option(*decls, multiple=True, metavar=metavar, help=help)


@click.command(cls=ReportCommand, context_settings=CONTEXT)
# input
@log_file_option(
    multiple=True,
    aliases=("--file", "-f"),
    help="log file, glob or directory; repeatable; rotated and .gz siblings of a file are included",
)
@click.option("--no-rotated", is_flag=True, help="read only the named files, not their rotated siblings")
@config_option(help="config for model aliases and prices (optional)")
@click.option("--jobs", "-j", type=int, default=None, metavar="N", help="processes for big logs  [default: CPUs]")
@click.option(
    "--no-index", is_flag=True, help="neither use nor write the roll-up index beside the log (.NAME.rollup); results are the same"
)
# time
@click.option("--since", metavar="HOURS", help="the last HOURS (24, 36h, 7d, 2w, all; default 24)")
@click.option("--start-date", metavar="DATE", help="from this date or ISO time (inclusive)")
@click.option("--end-date", metavar="DATE", help="to this date (the whole day) or ISO time (exclusive)")
@click.option(
    "--period",
    type=click.Choice(NAMED_PERIODS),
    help="a calendar period: today, this week (from Monday), this month, or the previous one",
)
@click.option("--tz", default="UTC", show_default=True, help="time zone for dates, periods and buckets ('local' or e.g. Europe/Berlin)")
# output
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="summary", show_default=True, help="what to write")
@click.option("--output", "-o", metavar="FILE", help="write here instead of stdout")
@_many(
    "--group-by",
    "-g",
    metavar="DIM",
    help="provider, model, user, endpoint, day, hour, week, month, status, key, team, tag:KEY…; repeatable or comma-separated",
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="rows per table (summary default 10; detailed: the last N requests)"
)
@click.option("--latency", is_flag=True, help="success rate and latency p50/p95 per provider and model, and per --group-by group")
@click.option("--top", type=click.IntRange(min=0), default=0, metavar="N", help="the N most expensive requests")
@click.option("--savings", is_flag=True, help="what cache reads saved against the full input price")
@click.option("--projection", is_flag=True, help="this month's cost projected from the recent daily rate")
@click.option("--suggest", is_flag=True, help="suggestions where the data shows them")
@click.option("--shares", is_flag=True, help="cost by provider and by model with each one's share and average per request")
@click.option("--compare", is_flag=True, help="today vs yesterday and this week vs last week (calendar, in --tz; filters apply)")
@click.option("--sessions", is_flag=True, help="sessions (the record's session_id): count, average cost, the top ones")
@click.option("--sessions-sort", type=click.Choice(SESSION_SORTS), default="recent", show_default=True, help="order of the --sessions list")
@click.option("--min-cost", metavar="USD", help="only sessions costing at least this (--sessions)")
@click.option("--max-cost", metavar="USD", help="only sessions costing at most this (--sessions)")
@click.option("--users", is_flag=True, help="active users (at least one call) and the cost per active user")
@click.option("--all", "-a", "all_sections", is_flag=True, help="all of the above (top 10)")
# filters
@_many("--provider", metavar="NAME", help="provider name as configured (openai, anthropic, …)")
@_many("--model", metavar="MODEL", help="model, alias or snapshot (gpt-4o also matches gpt-4o-2024-08-06, not gpt-4o-mini)")
@_many("--user", metavar="ID", help="user id")
@_many("--status", metavar="STATUS", help="HTTP status: 200, 429, 4xx, 5xx, ok or error")
@click.option("--errors-only", is_flag=True, help="only failed requests")
@_many("--tag", metavar="KEY=VALUE", help="a request tag, e.g. feature=search")
@category_option()
@click.pass_context
def report(
    ctx: click.Context,
    log_file: tuple[str, ...],
    all_sections: bool,
    fmt: str,
    tag: tuple[str, ...],
    category: tuple[str, ...],
    **options: Any,
) -> int:
    """What did we spend, on what, for whom: reports from the proxy's JSONL cost log."""
    # An unnamed log is left to the report (file=()), whose error then says how to name one.
    req = ReportRequest(file=() if log_from_default(ctx) else tuple(log_file), format=fmt, tag=with_category(tag, category), **options)
    return run(req.with_all_sections() if all_sections else req)


def run(req: ReportRequest, now: datetime | None = None) -> int:
    """Write the report ``req`` asks for, then its warnings on stderr."""
    at = now or _now()
    path = req.output
    if req.format == "csv" and not path and sys.stdout.isatty():
        # The guide's "--format csv creates a CSV file": on a terminal a file is what
        # people want; piped (or with --output -) the CSV goes to stdout as ever.
        path = unused_name(csv_file_name(resolve_window(req, get_tz(req.tz), at), at))
    # A bar on stderr while the log is read (only on a terminal), except where the rows
    # themselves stream to that terminal as they are read.
    streams = req.format == "detailed" or (req.format == "csv" and not req.group_by)
    with ProgressLine("reading the log") as bar:
        show = not (streams and path in (None, "-") and sys.stdout.isatty())
        warnings = write_report(req, lambda files: open_output(path, req.format, files), at, progress=bar if show else None)
    if path and path != req.output:
        click.echo(f"CSV written to {path}", err=True)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    return 0


def csv_file_name(window: Window, now: datetime) -> str:
    """``cost-report-<start>-<end>.csv`` for the window, in its time zone: whole days as
    dates (the end inclusive, as --end-date says it), else date_HHMM; an open start is
    "all". Only digits, dashes and underscores, so it is safe on every filesystem."""
    end = min(window.end, now) if window.end else now
    start = window.start
    tz = window.tz

    def midnight(d: datetime) -> bool:
        return d.astimezone(tz).time() == datetime.min.time()

    if start is not None and window.end is not None and midnight(start) and midnight(end):
        a, b = start.astimezone(tz).date(), (end.astimezone(tz) - timedelta(days=1)).date()
        return f"cost-report-{a.isoformat()}-{b.isoformat()}.csv"
    a_text = start.astimezone(tz).strftime("%Y-%m-%d_%H%M") if start else "all"
    return f"cost-report-{a_text}-{end.astimezone(tz).strftime('%Y-%m-%d_%H%M')}.csv"


def unused_name(name: str) -> str:
    """``name``, or ``name`` with -2, -3… before its suffix when a file has it: a CSV
    written by an earlier run (and maybe edited since) is never replaced unasked."""
    stem, dot, ext = name.rpartition(".")
    n, candidate = 1, name
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{stem}-{n}{dot}{ext}"
    return candidate


def _now() -> datetime:
    # Tests pin "now" so relative windows are reproducible.
    fixed = os.environ.get("ANALYZE_COSTS_NOW")
    if fixed:
        return datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    return datetime.now(UTC)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The report alone, as ``scripts/analyze_costs.py`` runs it (``prog`` in help and errors)."""
    code: Any = report.main(list(argv) if argv is not None else None, prog_name=prog, standalone_mode=False)
    return int(code)
