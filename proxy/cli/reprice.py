"""``python -m proxy reprice``: re-price a whole log with today's configuration.

Every record keeps the normalized token counts, the raw usage, its timestamp and
what priced it, so history can be re-priced with the price that was in force at
each call's time. Files are streamed line by line: constant memory at any size.
"""

from __future__ import annotations

from pathlib import Path

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import config_option, log_file_option
from proxy.cli.progress import ProgressLine
from proxy.config import load_config, pricebook_for
from proxy.core.money import units_to_usd
from proxy.engine.reprice import RepriceStats, reprice_lines
from proxy.errors import UsageError
from proxy.storage.logfiles import is_gzip, open_log
from proxy.storage.rewrite import all_lines, counted, reprice_file


def format_stats(stats: RepriceStats) -> str:
    lines = [
        f"records: {stats.records}",
        f"cost changed: {stats.changed} (newly priced {stats.newly_priced}, now unpriced {stats.now_unpriced})",
        f"price id or source changed, same cost: {stats.relabelled}",
        f"total before: ${units_to_usd(stats.old_units)}",
        f"total after:  ${units_to_usd(stats.new_units)}",
        f"difference:   {'+' if stats.new_units >= stats.old_units else '-'}${abs(stats.difference)}",
    ]
    if stats.corrupt:
        lines.append(f"warning: {stats.corrupt} unreadable line(s) copied unchanged")
    if stats.duplicates:
        lines.append(f"note: {stats.duplicates} repeated line(s) (a retried write) counted once, copied re-priced")
    return "\n".join(lines)


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="the config whose prices apply")
@log_file_option(aliases=("--in",), help="the log to read (.gz allowed)")
@click.option("--out", metavar="PATH", help="write the re-priced log here")
@click.option("--in-place", is_flag=True, help="atomically replace the input")
@click.option("--dry-run", is_flag=True, help="only report what would change")
def reprice(config: str, log_file: str, out: str | None, in_place: bool, dry_run: bool) -> int:
    """Recompute every record's cost with the current config.yml (and catalog), each at
    the price in force at its timestamp. The input is never changed unless --in-place.
    Give exactly one of --out, --in-place and --dry-run."""
    chosen = [name for name, on in (("--out", out is not None), ("--in-place", in_place), ("--dry-run", dry_run)) if on]
    if len(chosen) != 1:
        given = f" (given: {' '.join(chosen)})" if chosen else ""
        raise click.UsageError(f"give exactly one of --out, --in-place and --dry-run{given}")
    book = pricebook_for(load_config(config))
    src = Path(log_file)
    if not src.exists():
        raise UsageError(f"{src}: no such log")
    try:
        if dry_run:
            stats = RepriceStats()
            with open_log(src) as f, ProgressLine("reading the log") as bar:
                for _ in reprice_lines(counted(all_lines(f), 0 if is_gzip(src) else src.stat().st_size, bar), book, stats, 0.0):
                    pass
        else:
            with ProgressLine("re-pricing") as bar:
                stats = reprice_file(src, Path(out) if out else None, book, in_place=in_place, progress=bar)
    except ValueError as e:
        raise UsageError(str(e)) from None
    click.echo(format_stats(stats))
    if out:
        click.echo(f"written: {out}")
    elif in_place:
        click.echo(f"rewritten: {src}")
    return 0
