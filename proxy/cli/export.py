"""``python -m proxy export``: one row per request, for accounting (the cost tracker's
``export``). CSV has the per-request columns of ``report --format csv``
(``reports.csvfile.write_request_csv``); JSON is an array of the records and JSONL one
record a line, as read from the log. Records are streamed: the log is never held in
memory, whatever its size."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import IO, Any, Iterable

import click
import orjson

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import category_option, config_option, log_file_option, log_from_default, with_category
from proxy.cli.output import open_output
from proxy.core.records import json_default
from proxy.engine.cube import ScanResult
from proxy.reports.build import config_aliases, optional_config, request_query, resolve_files, scan_warnings
from proxy.reports.csvfile import write_request_csv
from proxy.reports.request import ReportRequest
from proxy.reports.window import get_tz, resolve_window
from proxy.storage.scan import iter_selected

EXPORT_FORMATS = ("csv", "json", "jsonl")

EXAMPLES = """Examples:

\b
  {prog} --format csv --output usage_report.csv
  {prog} --format json --output usage_report.json
  {prog} --format csv --model sonnet --start-date 2026-11-01 --output november_sonnet.csv
  {prog} --format csv --category technical --output technical_usage.csv
  {prog} --format jsonl | jq -r .total_cost

\b
Dates are whole days in --tz; --end-date includes its day. Without dates, the whole log
(and its rotated siblings)."""


class ExportCommand(Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = EXAMPLES.format(prog=ctx.command_path)
        super().format_epilog(ctx, formatter)


def write_json_array(out: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """``[``, the records separated by ``,\\n``, ``]``: valid JSON written as it is read."""
    out.write("[")
    sep = "\n"
    for rec in records:
        out.write(sep)
        out.write(orjson.dumps(rec, default=json_default).decode())
        sep = ",\n"
    out.write("\n]\n")


def write_jsonl(out: IO[str], records: Iterable[dict[str, Any]]) -> None:
    for rec in records:
        out.write(orjson.dumps(rec, default=json_default, option=orjson.OPT_APPEND_NEWLINE).decode())


def model_aliases(config: str, models: tuple[str, ...], warnings: list[str]) -> dict[str, str]:
    """The config's aliases for a --model filter, as the report reads them (none needed
    without one; a missing or broken config is then skipped with a warning)."""
    return config_aliases(optional_config(config, bool(models), warnings))


WRITERS = {"csv": write_request_csv, "json": write_json_array, "jsonl": write_jsonl}


@click.command(cls=ExportCommand, context_settings=CONTEXT)
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="csv", show_default=True, help="csv, json (an array) or jsonl")
@click.option("--output", "-o", metavar="FILE", help="write here ('-': stdout)  [default: stdout]")
@click.option("--start-date", metavar="DATE", help="from this date or ISO time (inclusive)")
@click.option("--end-date", metavar="DATE", help="to this date (the whole day) or ISO time (exclusive)")
@click.option("--tz", default="UTC", show_default=True, help="time zone of the dates ('local' or e.g. Europe/Berlin)")
@click.option("--model", multiple=True, metavar="MODEL", help="model, alias or snapshot; repeatable")
@category_option()
@click.option("--tag", multiple=True, metavar="KEY=VALUE", help="a request tag, e.g. feature=search; repeatable")
@click.option("--provider", multiple=True, metavar="NAME", help="provider name; repeatable")
@click.option("--user", multiple=True, metavar="ID", help="user id; repeatable")
@log_file_option(multiple=True, help="log file, glob or directory; repeatable; rotated and .gz siblings included")
@config_option(help="config for model aliases (optional)")
@click.pass_context
def export(
    ctx: click.Context,
    fmt: str,
    output: str | None,
    start_date: str | None,
    end_date: str | None,
    tz: str,
    model: tuple[str, ...],
    category: tuple[str, ...],
    tag: tuple[str, ...],
    provider: tuple[str, ...],
    user: tuple[str, ...],
    log_file: tuple[str, ...],
    config: str,
) -> int:
    """One row per request as CSV, JSON or JSONL, for accounting and spreadsheets."""
    # Every argument is checked before the output is opened: a mistake never truncates a file.
    req = ReportRequest(
        file=() if log_from_default(ctx) else log_file,
        config=config,
        since=None if (start_date or end_date) else "all",
        start_date=start_date,
        end_date=end_date,
        tz=tz,
        model=model,
        provider=provider,
        user=user,
        tag=with_category(tag, category),
    )
    zone = get_tz(tz)
    window = resolve_window(req, zone, datetime.now(timezone.utc))
    files = resolve_files(req)
    warnings: list[str] = []
    aliases = model_aliases(config, model, warnings)
    query = request_query(req, window, zone, aliases, dims=())
    out, close = open_output(output, fmt, files)
    res = ScanResult(dims=(), tz=zone)
    try:
        WRITERS[fmt](out, iter_selected(files, query, res))
    finally:
        if close:
            out.close()
    for warning in warnings + scan_warnings(res):
        click.echo(f"warning: {warning}", err=True)
    return 0
