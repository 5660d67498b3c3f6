"""Cost reports from the JSONL log: ``scripts/analyze_costs.py`` and ``python -m proxy report``.

Only argument handling and formatting live here; every number comes from
``proxy.engine`` and ``proxy.storage`` (the engine /health and the analytics API share).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import IO, Any, Iterable, Sequence
from zoneinfo import ZoneInfo

import orjson

from proxy.cli import command
from proxy.config import load_config as load
from proxy.config import pricebook_for
from proxy.core.money import MILLION_DEC, cost_units, format_usd, units_to_usd
from proxy.core.periods import NAMED_PERIODS, calendar_period
from proxy.core.text import printable
from proxy.core.timestamps import canonical_ts, ts_to_datetime
from proxy.defaults import default_log_path
from proxy.engine.cube import ScanResult, time_bucket
from proxy.engine.insights import (
    H_LONG,
    H_LONG_CACHED,
    H_LONG_IN,
    H_OK,
    H_SHORT,
    H_SHORT_COST,
    H_SHORT_IN,
    H_SHORT_OUT,
    LONG_PROMPT_TOKENS,
    SHORT_REPLY_TOKENS,
    Projection,
    project_month,
)
from proxy.engine.query import TIME_DIMS, Query, check_dim, status_matcher
from proxy.engine.totals import Totals
from proxy.errors import ConfigError
from proxy.pricing import name_candidates
from proxy.storage.logfiles import log_files, order_files
from proxy.storage.scan import iter_selected, scan

UTC = timezone.utc
FORMATS = ("summary", "detailed", "csv", "json", "hourly", "daily", "weekly", "monthly")
SERIES = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}


class UsageError(Exception):
    pass


# --- money and numbers ------------------------------------------------------------------


def fmt_int(n: int) -> str:
    return f"{n:,}"


def exact(d: Decimal) -> orjson.Fragment:
    """A Decimal as an exact JSON number (never through a float)."""
    return orjson.Fragment(format(d, "f"))


def ratio(num: Decimal, den: int, scale: int = 1) -> Decimal:
    if not den:
        return Decimal(0)
    return (num * scale / den).quantize(Decimal("1e-10"), ROUND_HALF_UP).normalize()


# --- time arguments ---------------------------------------------------------------------


def parse_since(text: str) -> float | None:
    """Hours ("24", "1.5"), or with a unit: "90m", "36h", "7d", "2w"; "all": no limit."""
    t = text.strip().lower()
    if t in ("all", "0", "none"):
        return None
    mult = {"m": 1 / 60, "h": 1, "d": 24, "w": 168}
    try:
        if t and t[-1] in mult:
            return float(t[:-1]) * mult[t[-1]]
        return float(t)
    except ValueError:
        raise UsageError(f"--since: expected hours like 24, 36h, 7d or all, got {text!r}") from None


def parse_when(text: str, tz: tzinfo, *, end: bool) -> datetime:
    """A bare date is the whole day in ``tz`` (``--end-date`` includes that day); an ISO
    time without a zone is in ``tz`` too."""
    t = text.strip()
    try:
        if len(t) == 10:
            d = date.fromisoformat(t)
            start = datetime(d.year, d.month, d.day, tzinfo=tz)
            return start + timedelta(days=1) if end else start
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"expected a date (2026-11-01) or ISO time (2026-11-01T09:30), got {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=tz)


def get_tz(name: str | None) -> tzinfo:
    if not name or name.upper() == "UTC":
        return UTC
    if name.lower() == "local":
        tz = datetime.now().astimezone().tzinfo
        return tz or UTC
    try:
        return ZoneInfo(name)
    except Exception:
        raise UsageError(f"--tz: unknown time zone {name!r} (use e.g. UTC, local, Europe/Berlin)") from None


# --- the command line -------------------------------------------------------------------


def build_parser(prog: str = "analyze_costs.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="What did we spend, on what, for whom: reports from the proxy's JSONL cost log.",
        epilog="Examples:\n"
        "  %(prog)s                              last 24 hours, summary\n"
        "  %(prog)s --period monthly --all       this month, with every section\n"
        "  %(prog)s --since 7d --format daily    cost per day for a week\n"
        "  %(prog)s --group-by user --group-by model --since 30d\n"
        "  %(prog)s --model sonnet --errors-only --format detailed\n"
        "  %(prog)s --format csv --output costs.csv --start-date 2026-11-01",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input")
    src.add_argument(
        "--file",
        "-f",
        action="append",
        metavar="PATH",
        help="log file, glob or directory; repeatable; rotated and .gz siblings of a file are "
        "included (default: $COST_TRACKING_FILE or logs/cost-tracking.jsonl)",
    )
    src.add_argument("--no-rotated", action="store_true", help="read only the named files, not their rotated siblings")
    src.add_argument("--config", default="config.yml", help="config for model aliases and prices (optional; default ./config.yml)")
    src.add_argument("--jobs", "-j", type=int, default=None, help="processes for big logs (default: CPUs)")
    src.add_argument(
        "--no-index",
        action="store_true",
        help="neither use nor write the roll-up index beside the log (.NAME.rollup); results are the same",
    )

    when = p.add_argument_group("time")
    when.add_argument("--since", metavar="HOURS", help="the last HOURS (24, 36h, 7d, 2w, all; default 24)")
    when.add_argument("--start-date", metavar="DATE", help="from this date or ISO time (inclusive)")
    when.add_argument("--end-date", metavar="DATE", help="to this date (the whole day) or ISO time (exclusive)")
    when.add_argument(
        "--period", choices=NAMED_PERIODS, help="a calendar period: today, this week (from Monday), this month, or the previous one"
    )
    when.add_argument("--tz", default="UTC", help="time zone for dates, periods and buckets (default UTC; 'local' or e.g. Europe/Berlin)")

    out = p.add_argument_group("output")
    out.add_argument("--format", default="summary", choices=FORMATS)
    out.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    out.add_argument(
        "--group-by",
        "-g",
        action="append",
        metavar="DIM",
        help="provider, model, user, endpoint, day, hour, week, month, status, key, team, tag:KEY…; repeatable or comma-separated",
    )
    out.add_argument("--limit", type=int, default=None, help="rows per table (summary default 10; detailed: the last N requests)")
    out.add_argument("--latency", action="store_true", help="success rate and latency p50/p95 per provider and model")
    out.add_argument("--top", type=int, default=0, metavar="N", help="the N most expensive requests")
    out.add_argument("--savings", action="store_true", help="what cache reads saved against the full input price")
    out.add_argument("--projection", action="store_true", help="this month's cost projected from the recent daily rate")
    out.add_argument("--suggest", action="store_true", help="suggestions where the data shows them")
    out.add_argument("--all", "-a", action="store_true", help="all of the above (top 10)")

    flt = p.add_argument_group("filters (repeat a filter for alternatives; different filters combine)")
    flt.add_argument("--provider", action="append", help="provider name as configured (openai, anthropic, …)")
    flt.add_argument("--model", action="append", help="model, alias or snapshot (gpt-4o also matches gpt-4o-2024-08-06, not gpt-4o-mini)")
    flt.add_argument("--user", action="append", help="user id")
    flt.add_argument("--status", action="append", help="HTTP status: 200, 429, 4xx, 5xx, ok or error")
    flt.add_argument("--errors-only", action="store_true", help="only failed requests")
    flt.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a request tag, e.g. feature=search")
    return p


@dataclass
class Window:
    start: datetime | None
    end: datetime | None
    label: str
    tz: tzinfo


def resolve_window(args: argparse.Namespace, tz: tzinfo, now: datetime) -> Window:
    explicit = args.start_date or args.end_date or args.period
    if explicit and args.since is not None:
        raise UsageError("use either --since or --start-date/--end-date/--period")
    start: datetime | None
    end: datetime | None
    if args.period:
        if args.start_date or args.end_date:
            raise UsageError("use either --period or --start-date/--end-date")
        start, end, label = calendar_period(args.period, now.astimezone(tz))
        return Window(start, end, label, tz)
    if explicit:
        start = parse_when(args.start_date, tz, end=False) if args.start_date else None
        end = parse_when(args.end_date, tz, end=True) if args.end_date else None
        if start and end and end <= start:
            raise UsageError("--end-date is before --start-date")
        label = " to ".join(x for x in (args.start_date and f"from {args.start_date}", args.end_date and f"through {args.end_date}") if x)
        return Window(start, end, label, tz)
    hours = parse_since(args.since if args.since is not None else "24")
    if hours is None:
        return Window(None, None, "all time", tz)
    start = now - timedelta(hours=hours)
    label = f"last {_human_hours(hours)}"
    return Window(start, None, label, tz)


def _human_hours(h: float) -> str:
    if h >= 48 and h % 24 == 0:
        return f"{int(h // 24)} days"
    if h == int(h):
        return f"{int(h)} hours" if h != 1 else "hour"
    return f"{h:g} hours"


def resolve_files(args: argparse.Namespace) -> list[Path]:
    patterns = args.file or [default_log_path()]
    try:
        files = log_files(patterns, rotated=not args.no_rotated)
    except FileNotFoundError as e:
        hint = "" if args.file else " (set COST_TRACKING_FILE or pass --file)"
        raise UsageError(f"no log found at {e.args[0]}{hint}") from None
    return order_files(files)


def load_config(path: str, needed: bool) -> Any:
    """The config when it exists and is valid, else None (aliases and prices are extras)."""
    if not needed or not os.path.exists(path):
        return None

    try:
        return load(path)
    except ConfigError as e:
        print(f"warning: ignoring {e}", file=sys.stderr)
        return None


def pricebook(config: Any) -> Any:
    if config is None:
        return None
    return pricebook_for(config)


def parse_group_by(values: Sequence[str] | None) -> list[str]:
    dims: list[str] = []
    for v in values or ():
        for part in v.split(","):
            part = part.strip()
            if part:
                try:
                    d = check_dim(part)
                except ValueError as e:
                    raise UsageError(f"--group-by: {e}") from None
                if d not in dims:
                    dims.append(d)
    return dims


def parse_tags(values: Sequence[str] | None) -> list[tuple[str, str]]:
    out = []
    for v in values or ():
        if "=" not in v:
            raise UsageError(f"--tag: expected KEY=VALUE, got {v!r}")
        k, _, val = v.partition("=")
        out.append((k.strip(), val.strip()))
    return out


# --- running a report ----------------------------------------------------------------------


@dataclass
class Report:
    """Everything a format prints: the scan plus the context to describe it."""

    args: argparse.Namespace
    window: Window
    now: datetime
    files: list[Path]
    res: ScanResult
    group_dims: list[str]
    config: Any = None
    book: Any = None
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def tz(self) -> tzinfo:
        return self.window.tz

    def span(self) -> tuple[datetime | None, datetime]:
        """The time the report covers: the window, or the data where the window is open."""
        start = self.window.start or (ts_to_datetime(self.res.first_ts) if self.res.first_ts else None)
        # A calendar period still running ends now, not at its end.
        end = min(self.window.end, self.now) if self.window.end else self.now
        return start, end


def main(argv: Sequence[str] | None = None, prog: str = "analyze_costs.py") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def run(args: argparse.Namespace, now: datetime | None = None) -> int:
    if args.all:
        args.latency = args.savings = args.projection = args.suggest = True
        args.top = args.top or 10
    tz = get_tz(args.tz)
    now = now or _now()
    window = resolve_window(args, tz, now)
    files = resolve_files(args)
    group_dims = parse_group_by(args.group_by)
    tags = parse_tags(args.tag)
    needs_config = bool(args.model or args.savings or args.suggest)
    config = load_config(args.config, needs_config)
    book = pricebook(config) if (args.savings or args.suggest) else None
    aliases: dict[str, str] = dict(getattr(config, "aliases", {}) or {}) if config else {}
    if config is not None:
        for p in config.providers.values():
            aliases.update(getattr(p, "aliases", {}) or {})

    fmt = args.format
    # The cube always keeps provider and model (summary tables and sections need them),
    # plus the asked-for groups and one time dimension when any view is over time.
    dims: list[str] = ["provider", "model", *[d for d in group_dims if d not in ("provider", "model")]]
    if fmt in SERIES and SERIES[fmt] not in dims:
        dims.append(SERIES[fmt])
    if args.projection and not any(d in TIME_DIMS for d in dims):
        dims.append("day")
    query = Query(
        start=window.start.timestamp() if window.start else None,
        end=window.end.timestamp() if window.end else None,
        providers=args.provider or (),
        models=args.model or (),
        aliases=aliases,
        users=args.user or (),
        statuses=args.status or (),
        errors_only=args.errors_only,
        tags=tags,
        dims=tuple(dims),
        tz=tz,
        latency=args.latency,
        top=args.top,
        pricebook=book,
        savings=args.savings,
        habits=args.suggest,
    )
    try:
        if args.status:
            status_matcher(args.status)
    except ValueError as e:
        raise UsageError(f"--status: {e}") from None
    filters = {
        k: v
        for k, v in (
            ("provider", args.provider),
            ("model", args.model),
            ("user", args.user),
            ("status", args.status),
            ("tag", [f"{k}={v}" for k, v in tags]),
        )
        if v
    }
    if args.errors_only:
        filters["errors_only"] = True

    out, close = _open_output(args.output, fmt)
    try:
        if fmt == "detailed" or (fmt == "csv" and not group_dims):
            res = ScanResult(dims=(), tz=tz)
            res.files = files
            records = iter_selected(files, query, res)
            report = Report(args, window, now, files, res, group_dims, config, book, filters)
            if fmt == "detailed":
                write_detailed(out, records, report)
            else:
                write_request_csv(out, records)
        else:
            use_index = not (args.no_index or os.environ.get("ANALYZE_COSTS_NO_INDEX"))
            res = scan(files, query, jobs=args.jobs, use_index=use_index)
            report = Report(args, window, now, files, res, group_dims, config, book, filters)
            if fmt == "summary":
                out.write(render_summary(report))
            elif fmt == "json":
                out.write(orjson.dumps(report_json(report), option=orjson.OPT_INDENT_2).decode() + "\n")
            elif fmt == "csv":
                write_group_csv(out, report)
            else:
                out.write(render_series(report, SERIES[fmt]))
    finally:
        if close:
            out.close()
    warn_bad(report.res)
    return 0


def _now() -> datetime:
    # Tests pin "now" so relative windows are reproducible.
    fixed = os.environ.get("ANALYZE_COSTS_NOW")
    if fixed:
        return datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    return datetime.now(UTC)


def _open_output(path: str | None, fmt: str) -> tuple[IO[str], bool]:
    if not path or path == "-":
        return sys.stdout, False
    # newline="" lets the csv module write its own \r\n, which spreadsheets expect.
    return open(path, "w", encoding="utf-8", newline="" if fmt == "csv" else None), True


def warn_bad(res: ScanResult) -> None:
    if res.bad_lines:
        s = "s" if res.bad_lines != 1 else ""
        print(f"warning: skipped {res.bad_lines:,} corrupt or incomplete line{s}", file=sys.stderr)
    if res.duplicate_lines:
        s = "s" if res.duplicate_lines != 1 else ""
        print(
            f"warning: skipped {res.duplicate_lines:,} duplicate line{s} (a call written twice by a retried write; counted once)",
            file=sys.stderr,
        )
    for broken in dict.fromkeys(res.broken_files):
        print(f"warning: {printable(broken, 400)} (read up to the damage)", file=sys.stderr)


# --- text tables -----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool], indent: str = "  ") -> str:
    # Every cell, not only the ones known to come from records: a table is the one
    # place all text output passes, so no new column can forget it.
    headers = [printable(h) for h in headers]
    rows = [[printable(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if right[i] else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), *[line(r) for r in rows]]) + "\n"


def _share(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.1f}%" if whole else "-"


def _fmt_ts(ts: str | None, tz: tzinfo, seconds: bool = False) -> str:
    if not ts:
        return "-"
    dt = ts_to_datetime(ts).astimezone(tz)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _tz_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or datetime.now(tz).tzname() or "UTC")


def header_lines(r: Report, title: str) -> list[str]:
    start, end = r.span()
    if start is not None and r.res.first_ts:
        # A window reaching far back before the log (--since 100000) is shown from the first record.
        first = ts_to_datetime(r.res.first_ts)
        if first - start > timedelta(days=1):
            start = first
    s = start.astimezone(r.tz).strftime("%Y-%m-%d %H:%M") if start else "the beginning"
    e = end.astimezone(r.tz).strftime("%Y-%m-%d %H:%M")
    lines = [f"{title}: {s} to {e} {_tz_name(r.tz)} ({r.window.label})"]
    extra = f" (+{len(r.files) - 1} more)" if len(r.files) > 1 else ""
    lines.append(f"Log: {printable(str(r.files[0]), 400)}{extra}")
    if r.filters:
        lines.append(
            "Filters: "
            + "  ".join(
                printable(f"{k}={','.join(v) if isinstance(v, list) else v}", 400) if k != "errors_only" else "errors only"
                for k, v in r.filters.items()
            )
        )
    return lines


def lower_bound_note(t: Totals) -> str:
    parts = []
    if t.unpriced:
        parts.append(f"{t.unpriced:,} unpriced (no price for their model)")
    if t.unknown:
        parts.append(f"{t.unknown:,} with unknown usage (stream cut before usage arrived)")
    return "; ".join(parts)


def render_summary(r: Report) -> str:
    res = r.res
    t = res.totals()
    limit = r.args.limit or 10
    out = header_lines(r, "Cost report")
    out.append("")
    if not t.requests:
        out.append("No requests in this period." if not r.filters else "No requests match these filters in this period.")
        return "\n".join(out) + "\n"
    cost = t.total_cost
    at_least = t.incomplete
    cost_text = ("at least " if at_least else "") + format_usd(cost)
    rows = [("Total cost", cost_text)]
    ok = t.requests - t.errors
    rows.append(("Requests", f"{t.requests:,}  ({ok:,} ok, {t.errors:,} errors, {_share(ok, t.requests)} success)"))
    tok = t.tokens
    tok_detail = f"input {tok['input_tokens']:,}, output {tok['output_tokens']:,}"
    if tok["cache_read_tokens"]:
        tok_detail += f", cache read {tok['cache_read_tokens']:,}"
    rows.append(("Tokens", f"{tok['total_tokens']:,}  ({tok_detail})"))
    rows.append(("Avg per request", format_usd(ratio(cost, t.requests), at_least=at_least)))
    rows.append(("Avg per 1K tokens", format_usd(ratio(cost, tok["total_tokens"], 1000), at_least=at_least)))
    w = max(len(k) for k, _ in rows)
    out += [f"{k.ljust(w)}  {v}" for k, v in rows]
    note = lower_bound_note(t)
    if note:
        out.append(f"{'':{w}}  Costs are lower bounds: {note}.")
    out.append("")

    if r.group_dims:
        out.append("By " + ", ".join(r.group_dims))
        out.append(group_table(r, r.group_dims, t, limit=r.args.limit))
    else:
        by_provider = sorted(res.rollup(["provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        out.append("Cost by provider")
        out.append(
            table(
                ["provider", "cost", "share", "requests", "tokens"],
                [
                    (
                        k[0],
                        format_usd(v.total_cost, at_least=v.incomplete),
                        _share(v.cost_units, t.cost_units),
                        fmt_int(v.requests),
                        fmt_int(v.tokens["total_tokens"]),
                    )
                    for k, v in by_provider
                ],
                [False, True, True, True, True],
            )
        )
        by_model = sorted(res.rollup(["model", "provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        shown = by_model[:limit]
        more = len(by_model) - len(shown)
        out.append("Top models by cost" + (f" (top {limit} of {len(by_model)})" if more > 0 else ""))
        out.append(
            table(
                ["model", "provider", "cost", "share", "requests", "avg/request"],
                [
                    (
                        k[0],
                        k[1],
                        format_usd(v.total_cost, at_least=v.incomplete),
                        _share(v.cost_units, t.cost_units),
                        fmt_int(v.requests),
                        format_usd(ratio(v.total_cost, v.requests), at_least=v.incomplete),
                    )
                    for k, v in shown
                ],
                [False, False, True, True, True, True],
            )
        )
    out += sections_text(r, t)
    return "\n".join(out).rstrip("\n") + "\n"


def group_table(r: Report, dims: Sequence[str], overall: Totals, limit: int | None = None) -> str:
    rows = sorted_groups(r, dims)
    if limit:
        rows = rows[:limit]
    return table(
        [*dims, "requests", "errors", "tokens", "cost", "share"],
        [
            (
                *[str(x) for x in k],
                fmt_int(v.requests),
                fmt_int(v.errors),
                fmt_int(v.tokens["total_tokens"]),
                format_usd(v.total_cost, at_least=v.incomplete),
                _share(v.cost_units, overall.cost_units),
            )
            for k, v in rows
        ],
        [False] * len(dims) + [True] * 5,
    )


def sorted_groups(r: Report, dims: Sequence[str]) -> list[tuple[tuple, Totals]]:
    groups = r.res.rollup(dims)
    if dims and dims[0] in TIME_DIMS:
        return sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
    return sorted(groups.items(), key=lambda kv: (-kv[1].cost_units, tuple(str(x) for x in kv[0])))


# --- extra sections ----------------------------------------------------------------------------


def sections_text(r: Report, t: Totals) -> list[str]:
    out: list[str] = []
    a = r.args
    if a.latency:
        out.append("Success rate and latency (ms)")
        for by in ("provider", "model"):
            stats = sorted(r.res.latency_for(by).items(), key=lambda kv: (-kv[1][0], kv[0]))
            out.append(
                table(
                    [by, "requests", "success", "p50", "p95"],
                    [(name, fmt_int(n), _share(n - err, n), _ms(p50), _ms(p95)) for name, (n, err, _, p50, p95) in stats],
                    [False, True, True, True, True],
                )
            )
    if a.top:
        top = r.res.top_requests()
        out.append(f"Most expensive requests (top {len(top)})")
        out.append(
            table(
                ["time", "provider/model", "in", "out", "cost", "user", "request_id"],
                [
                    (
                        _fmt_ts(x["timestamp"], r.tz, True),
                        f"{x['provider']}/{x['model'] or x['response_model']}",
                        fmt_int(x["input_tokens"] or 0),
                        fmt_int(x["output_tokens"] or 0),
                        format_usd(Decimal(repr(x["total_cost"]))),
                        str(x["user_id"] or "-"),
                        str(x["request_id"] or "-"),
                    )
                    for x in top
                ],
                [False, False, True, True, True, False, False],
            )
        )
    if a.savings:
        s = savings(r)
        out.append("Cache savings")
        if s["priced_tokens"] or s["derived"]:
            line = f"  Cache reads of {s['tokens']:,} tokens saved {format_usd(s['saved'])} against the full input price"
            if t.cost_units:
                line += f" (you paid {format_usd(t.total_cost)}; without the cache, about {format_usd(t.total_cost + s['saved'])})"
            out.append(line + ".")
            if s["unpriced_tokens"]:
                out.append(
                    f"  {s['unpriced_tokens']:,} cache-read tokens could not be priced"
                    f"{' (no config found: pass --config)' if r.book is None else ''}."
                )
        elif s["tokens"]:
            out.append(
                f"  {s['tokens']:,} tokens were read from cache, but their savings need input prices"
                f"{': pass --config' if r.book is None else ' the config does not have'}."
            )
        else:
            out.append("  No cache reads in this period.")
        out.append("")
    if a.projection:
        p = projection(r)
        out.append("Projection")
        if p is None:
            out.append("  Not enough data to project.")
        else:
            rate = format_usd(units_to_usd(p.daily_rate_units))
            days = p.recent_seconds / 86400
            basis = f"{days:.1f} days" if days >= 1 else f"{p.recent_seconds / 3600:.1f} hours"
            if p.month_to_date_units is not None:
                out.append(
                    f"  {p.month}: {format_usd(units_to_usd(p.month_to_date_units))} so far; at {rate}/day "
                    f"(the last {basis}) the month ends near {format_usd(units_to_usd(p.projected_units))}."
                )
            else:
                out.append(
                    f"  {p.month}: at {rate}/day (the last {basis}) a full month costs about {format_usd(units_to_usd(p.projected_units))}."
                )
        out.append("")
    if a.suggest:
        tips = suggestions(r)
        out.append("Suggestions")
        out += [f"  - {tip}" for tip in tips] or ["  Nothing stands out."]
        out.append("")
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def savings(r: Report) -> dict[str, Any]:
    res = r.res
    priced_tokens = sum(res.savings_by_rate.values())
    saved = sum((rate * n for rate, n in res.savings_by_rate.items()), Decimal(0)) / MILLION_DEC
    saved = saved.quantize(Decimal("1e-10"), ROUND_HALF_UP) + units_to_usd(res.savings_derived_units)
    tokens = r.res.totals().tokens["cache_read_tokens"]
    return {
        "tokens": tokens,
        "priced_tokens": priced_tokens,
        "derived": res.savings_derived_units,
        "unpriced_tokens": res.savings_unpriced_tokens,
        "saved": saved.normalize() if saved else Decimal(0),
    }


def projection(r: Report) -> Projection | None:
    start, end = r.span()
    if start is None or end is None or not r.res.cells:
        return None
    width = 3600 if r.res.time_width == 13 else 60
    return project_month(r.res.time_buckets(), start, end, r.tz, bucket_seconds=width)


_SIBLING_SWAPS = (("opus", "sonnet"), ("sonnet", "haiku"), ("-pro", "-flash"), ("-flash", "-flash-lite"))


def cheaper_siblings(name: str, known: Iterable[str]) -> list[str]:
    """Smaller models of the same family by naming convention: gpt-4o -> gpt-4o-mini,
    claude-sonnet-4-5 -> claude-haiku-4-5, gemini-2.5-pro -> gemini-2.5-flash."""
    known = set(known)
    cands = [name + s for s in ("-mini", "-nano", "-lite")]
    cands += [name.replace(a, b) for a, b in _SIBLING_SWAPS if a in name and b not in name]
    return [c for c in cands if c in known and c != name]


def suggestions(r: Report) -> list[str]:

    tips: list[tuple[int, str]] = []
    book = r.book
    when = r.now
    for (provider, family, model), h in sorted(r.res.habits.items()):
        ok = h[H_OK]
        family_name = name_candidates(model, {})[-1]
        shown = f"{printable(provider)}/{printable(model)}"  # lookups below use the names as logged
        # Short replies on a big model: would the smaller sibling have done?
        if book is not None and h[H_SHORT] >= 20 and h[H_SHORT] * 4 >= ok:
            table_ = getattr(book, "_models", {}).get(provider, {})
            for sib in cheaper_siblings(family_name, table_):
                price = book.resolve(provider, sib, family=family)
                if price is None:
                    continue
                rates = _base_rates(price, when)
                est = (h[H_SHORT_IN] * rates.input + h[H_SHORT_OUT] * rates.output) / MILLION_DEC
                actual = units_to_usd(h[H_SHORT_COST])
                if est < actual:
                    saved = actual - est
                    tips.append(
                        (
                            int(saved * 10**10),
                            (
                                f"{shown}: {h[H_SHORT]:,} of {ok:,} successful calls "
                                f"({_share(h[H_SHORT], ok)}) returned at most {SHORT_REPLY_TOKENS} tokens and cost "
                                f"{format_usd(actual)}; at {printable(sib)}'s list price they would cost about {format_usd(est)} "
                                f"(save ~{format_usd(saved)}), if it answers them well enough."
                            ),
                        )
                    )
                    break
        # Long prompts that are rarely read from cache.
        if h[H_LONG] >= 20 and h[H_LONG_CACHED] * 10 < h[H_LONG_IN]:
            share = _share(h[H_LONG_CACHED], h[H_LONG_IN])
            hint = (
                "mark the stable prefix with cache_control"
                if family == "anthropic"
                else "keep the stable part (system prompt, tools, documents) first and identical"
            )
            tip = (
                f"{shown}: {h[H_LONG]:,} calls sent prompts of {LONG_PROMPT_TOKENS:,}+ tokens "
                f"but only {share} of that input came from cache; if these prompts repeat, {hint}"
            )
            weight = 0
            if book is not None:
                price = book.resolve(provider, model, family=family)
                if price is not None:
                    rates = _base_rates(price, when)
                    cached = rates.cached_input if rates.cached_input is not None else rates.input
                    per10 = (Decimal(h[H_LONG_IN] - h[H_LONG_CACHED]) / 10 * (rates.input - cached)) / MILLION_DEC
                    if per10 > 0:
                        tip += f" (each 10% of it cached saves about {format_usd(per10)})"
                        weight = int(per10 * 10**10)
            tips.append((weight, tip + "."))
    return [text for _, text in sorted(tips, key=lambda x: -x[0])]


def _base_rates(price: Any, when: datetime) -> Any:
    period = price.period_at(when)
    card = getattr(period, "card", period)
    return card.rates


# --- time series -------------------------------------------------------------------------------


def bucket_sequence(first: str, last: str, dim: str, tz: tzinfo) -> list[str]:
    """Every bucket label from the first to the last, so quiet hours show as zero."""
    labels = []
    start = ts_to_datetime(first).astimezone(tz)
    end = ts_to_datetime(last).astimezone(tz)
    if dim == "hour":
        cur = start.replace(minute=0, second=0, microsecond=0)
        step = timedelta(hours=1)
    else:
        cur = start.replace(hour=0, minute=0, second=0, microsecond=0)
        if dim == "week":
            cur -= timedelta(days=cur.weekday())
        if dim == "month":
            cur = cur.replace(day=1)
        step = timedelta(days=1)
    seen = set()
    guard = 0
    while cur <= end and guard < 200_000:
        label = time_bucket(cur, dim)
        if label not in seen:
            seen.add(label)
            labels.append(label)
        if dim == "hour":
            # Step in UTC so DST changes neither skip nor repeat an hour.
            cur = (cur.astimezone(UTC) + step).astimezone(tz)
        elif dim == "month":
            cur = (cur.replace(day=1) + timedelta(days=32)).replace(day=1)
        elif dim == "week":
            cur = cur + timedelta(days=7)
        else:
            cur = (cur + step).replace(hour=0)
        guard += 1
    return labels


def series_rows(r: Report, dim: str) -> list[tuple[str, Totals]]:
    groups = {k[0]: v for k, v in r.res.rollup([dim]).items()}
    if not groups or r.res.first_ts is None or r.res.last_ts is None:
        return []
    labels = bucket_sequence(r.res.first_ts, r.res.last_ts, dim, r.tz)
    for k in groups:
        if k not in labels:
            labels.append(k)
    return [(label, groups.get(label) or Totals()) for label in sorted(labels)]


def render_series(r: Report, dim: str) -> str:
    names = {"hour": "hour", "day": "day", "week": "week", "month": "month"}
    out = header_lines(r, f"Cost by {names[dim]}")
    out.append("")
    rows = series_rows(r, dim)
    if not rows:
        out.append("No requests in this period.")
        return "\n".join(out) + "\n"
    peak = max(v.cost_units for _, v in rows) or 1
    total = r.res.totals()
    body = []
    for label, v in rows:
        bar = "█" * round(v.cost_units * 30 / peak) if v.cost_units else ""
        body.append(
            (
                label,
                fmt_int(v.requests),
                fmt_int(v.errors),
                fmt_int(v.tokens["total_tokens"]),
                format_usd(v.total_cost, at_least=v.incomplete),
                bar,
            )
        )
    body.append(
        (
            "total",
            fmt_int(total.requests),
            fmt_int(total.errors),
            fmt_int(total.tokens["total_tokens"]),
            format_usd(total.total_cost, at_least=total.incomplete),
            "",
        )
    )
    out.append(table([dim, "requests", "errors", "tokens", "cost", ""], body, [False, True, True, True, True, False]).rstrip("\n"))
    top_label, top_v = max(rows, key=lambda kv: (kv[1].cost_units, kv[0]))
    out.append("")
    out.append(f"Peak {dim}: {top_label} at {format_usd(top_v.total_cost)} ({_share(top_v.cost_units, total.cost_units)} of the total)")
    note = lower_bound_note(total)
    if note:
        out.append(f"Costs are lower bounds: {note}.")
    out += [""] + sections_text(r, total) if any((r.args.latency, r.args.top, r.args.savings, r.args.projection, r.args.suggest)) else []
    return "\n".join(out).rstrip("\n") + "\n"


# --- per request ---------------------------------------------------------------------------------


def write_detailed(out: IO[str], records: Iterable[dict[str, Any]], r: Report) -> None:
    """One line per request, streamed (``--limit N``: the last N)."""
    tz = r.tz
    if r.args.limit:
        records = deque(records, maxlen=r.args.limit)
    header = f"{'time':19}  {'provider/model':40}  {'in':>9}  {'out':>8}  {'cost':>12}  {'user':16}  status"
    out.write(header + "\n")
    n = 0
    units = 0
    incomplete = False
    for rec in records:
        n += 1
        cost = rec.get("total_cost")
        if cost is None:
            cost_text = "unpriced" if rec.get("total_tokens") else "unknown"
            incomplete = True
        else:
            units += cost_units(cost) or 0
            cost_text = format_usd(_dec(cost))
        model = rec.get("model") or rec.get("response_model") or "-"
        status = printable(str(rec.get("status")), 20)
        if rec.get("error") and status.startswith("2"):
            status += " (error)"
        out.write(
            f"{_fmt_ts(canonical_ts(rec.get('timestamp')), tz, True):19}  "
            f"{printable(str(rec.get('provider')) + '/' + str(model), 40):40}  "
            f"{_num(rec.get('input_tokens')):>9}  {_num(rec.get('output_tokens')):>8}  {cost_text:>12}  "
            f"{printable(str(rec.get('user_id') or '-'), 16):16}  {status}\n"
        )
    out.write(f"{n:,} requests, {'at least ' if incomplete else ''}{format_usd(units_to_usd(units))}\n")


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:,}"


def _dec(v: Any) -> Decimal:
    # repr of a float is the shortest text that round-trips: the digits the log holds.
    return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)


_CSV_FIELDS = (
    "time_utc",
    "request_id",
    "provider",
    "model",
    "response_model",
    "user_id",
    "team",
    "key_id",
    "session_id",
    "endpoint",
    "status",
    "error",
    "is_streaming",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "pricing_source",
    "usage_source",
    "latency_ms",
    "ttft_ms",
    "tags",
)


def _cell(v: Any) -> Any:
    """Text a spreadsheet shows as written: no formulas (=, +, -, @ lead), no float noise."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(_dec(v), "f")
    if isinstance(v, (dict, list)):
        v = ";".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else orjson.dumps(v).decode()
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def write_request_csv(out: IO[str], records: Iterable[dict[str, Any]]) -> None:
    w = csv.writer(out)
    w.writerow(_CSV_FIELDS)
    for rec in records:
        ts = canonical_ts(rec.get("timestamp"))
        # "2026-11-23 18:15:28.893": a form spreadsheets read as a date-time.
        row = [ts[:10] + " " + ts[11:23] if ts else ""]
        row += [_cell(rec.get(f)) for f in _CSV_FIELDS[1:]]
        w.writerow(row)


def write_group_csv(out: IO[str], r: Report) -> None:
    dims = r.group_dims or ["provider", "model"]
    w = csv.writer(out)
    w.writerow(
        [d.replace(":", "_") for d in dims]
        + [
            "requests",
            "errors",
            "priced",
            "unpriced",
            "unknown_usage",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cache_read_tokens",
            "input_cost",
            "output_cost",
            "total_cost",
        ]
    )
    for k, v in sorted_groups(r, dims):
        w.writerow(
            [_cell(x) for x in k]
            + [
                v.requests,
                v.errors,
                v.priced,
                v.unpriced,
                v.unknown,
                v.tokens["input_tokens"],
                v.tokens["output_tokens"],
                v.tokens["total_tokens"],
                v.tokens["cache_read_tokens"],
                format(units_to_usd(v.input_cost_units), "f"),
                format(units_to_usd(v.output_cost_units), "f"),
                format(v.total_cost, "f"),
            ]
        )


# --- json ---------------------------------------------------------------------------------------


def totals_json(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "errors": t.errors,
        "success_rate": round((t.requests - t.errors) / t.requests, 6) if t.requests else None,
        "priced_requests": t.priced,
        "unpriced_requests": t.unpriced,
        "unknown_usage_requests": t.unknown,
        "cost_is_lower_bound": t.incomplete,
        "total_cost": exact(t.total_cost),
        "input_cost": exact(units_to_usd(t.input_cost_units)),
        "output_cost": exact(units_to_usd(t.output_cost_units)),
        "avg_cost_per_request": exact(ratio(t.total_cost, t.requests)),
        "avg_cost_per_1k_tokens": exact(ratio(t.total_cost, t.tokens["total_tokens"], 1000)),
        "tokens": dict(t.tokens),
    }


def report_json(r: Report) -> dict[str, Any]:
    res = r.res
    t = res.totals()
    start, end = r.span()
    body: dict[str, Any] = {
        "period": {
            "label": r.window.label,
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "tz": _tz_name(r.tz),
            "first_record": res.first_ts,
            "last_record": res.last_ts,
        },
        "files": [str(p) for p in r.files],
        "filters": r.filters,
        "totals": totals_json(t),
        "by_provider": [
            {"provider": k[0], **totals_json(v)}
            for k, v in sorted(res.rollup(["provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        ],
        "by_model": [
            {"model": k[0], "provider": k[1], **totals_json(v)}
            for k, v in sorted(res.rollup(["model", "provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        ],
        "corrupt_lines": res.bad_lines,
        "duplicate_lines": res.duplicate_lines,
    }
    if r.group_dims:
        body["groups"] = [{**{d: x for d, x in zip(r.group_dims, k)}, **totals_json(v)} for k, v in sorted_groups(r, r.group_dims)]
    a = r.args
    if a.latency:
        body["latency"] = {
            by: [
                {
                    by: name,
                    "requests": n,
                    "errors": err,
                    "success_rate": round((n - err) / n, 6) if n else None,
                    "p50_ms": p50,
                    "p95_ms": p95,
                }
                for name, (n, err, _, p50, p95) in sorted(res.latency_for(by).items())
            ]
            for by in ("provider", "model")
        }
    if a.top:
        body["top_requests"] = [{**x, "total_cost": exact(_dec(x["total_cost"]))} for x in res.top_requests()]
    if a.savings:
        s = savings(r)
        body["cache_savings"] = {
            "cache_read_tokens": s["tokens"],
            "saved": exact(s["saved"]),
            "unpriced_cache_read_tokens": s["unpriced_tokens"],
        }
    if a.projection:
        p = projection(r)
        body["projection"] = (
            None
            if p is None
            else {
                "month": p.month,
                "month_to_date": exact(units_to_usd(p.month_to_date_units)) if p.month_to_date_units is not None else None,
                "daily_rate": exact(units_to_usd(p.daily_rate_units)),
                "rate_from_hours": round(p.recent_seconds / 3600, 3),
                "projected": exact(units_to_usd(p.projected_units)),
            }
        )
    if a.suggest:
        body["suggestions"] = suggestions(r)
    return body


@command("report", "cost reports from the JSONL log (same as scripts/analyze_costs.py)")
def report_command(argv: list[str]) -> int:
    return main(argv, prog="python -m proxy report")
