"""Running a report: its log files, its optional config, the engine query it compiles to, the scan, and the chosen format written out."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

import orjson

from proxy.config import Config, load_config, pricebook_for
from proxy.core.money import units_to_usd, usd_to_units
from proxy.core.text import printable
from proxy.defaults import default_log_path
from proxy.engine.cube import ScanResult
from proxy.engine.query import LATENCY_DIM, TIME_DIMS, Query, check_dim, status_matcher
from proxy.errors import ConfigError, UsageError
from proxy.reports.csvfile import write_group_csv, write_request_csv
from proxy.reports.extra import SESSION_SORTS, ExtraRequest, extra_sections, extra_text
from proxy.reports.jsondoc import report_json
from proxy.reports.model import Report
from proxy.reports.request import SERIES, ReportRequest
from proxy.reports.summary import render_summary
from proxy.reports.text import render_series, tz_name, write_detailed
from proxy.reports.window import Window, get_tz, resolve_window
from proxy.storage.logfiles import log_files, order_files
from proxy.storage.memo import SegmentMemo
from proxy.storage.scan import iter_selected, scan


def resolve_files(args: ReportRequest) -> list[Path]:
    patterns = list(args.file) or [default_log_path()]
    try:
        files = log_files(patterns, rotated=not args.no_rotated)
    except FileNotFoundError as e:
        hint = "" if args.file else " (set COST_TRACKING_FILE or pass --log-file)"
        raise UsageError(f"no log found at {e.args[0]}{hint}") from None
    return order_files(files)


def optional_config(path: str, needed: bool, warnings: list[str]) -> Config | None:
    """The config when it exists and is valid, else None (aliases and prices are extras;
    a broken one is ignored with a warning)."""
    if not needed or not os.path.exists(path):
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        warnings.append(f"ignoring {e}")
        return None


def scan_warnings(res: ScanResult) -> list[str]:
    """What a reader should know about the log that was read: lines skipped, files damaged."""
    out = []
    if res.bad_lines:
        s = "s" if res.bad_lines != 1 else ""
        out.append(f"skipped {res.bad_lines:,} corrupt or incomplete line{s}")
    if res.duplicate_lines:
        s = "s" if res.duplicate_lines != 1 else ""
        out.append(f"skipped {res.duplicate_lines:,} duplicate line{s} (a call written twice by a retried write; counted once)")
    out += [f"{printable(broken, 400)} (read up to the damage)" for broken in dict.fromkeys(res.broken_files)]
    return out


def pricebook(config: Any) -> Any:
    if config is None:
        return None
    return pricebook_for(config)


def config_aliases(config: Config | None) -> dict[str, str]:
    """Every alias a config defines (top level, then each provider's), for --model."""
    aliases: dict[str, str] = dict(config.aliases) if config else {}
    if config is not None:
        for p in config.providers.values():
            aliases.update(p.aliases)
    return aliases


def request_query(
    args: ReportRequest, window: Window, tz: tzinfo, aliases: Mapping[str, str], *, dims: Sequence[str], **more: Any
) -> Query:
    """The engine query for a request's window and filters (report, stats, export);
    ``more`` are the query's extras (latency, top, savings…)."""
    return Query(
        start=window.start.timestamp() if window.start else None,
        end=window.end.timestamp() if window.end else None,
        providers=args.provider,
        models=args.model,
        aliases=aliases,
        users=args.user,
        teams=args.team,
        statuses=args.status,
        errors_only=args.errors_only,
        tags=parse_tags(args.tag),
        dims=tuple(dims),
        tz=tz,
        **more,
    )


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


def cost_bound(option: str, text: str | None) -> Decimal | None:
    """A session cost bound in USD from the command line."""
    if text is None:
        return None
    try:
        units = usd_to_units(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    if not 0 <= units <= usd_to_units(10**12):
        raise UsageError(f"{option}: expected an amount from 0 to 1,000,000,000,000 US dollars, got {text!r}")
    return units_to_usd(units)


@dataclass
class Prepared:
    """A request checked and compiled: everything but the scan."""

    args: ReportRequest
    now: datetime
    tz: tzinfo
    window: Window
    files: list[Path]
    group_dims: list[str]
    config: Config | None
    book: Any
    query: Query
    filters: dict[str, Any]
    extra_ask: ExtraRequest
    warnings: list[str]


def prepare(
    args: ReportRequest,
    now: datetime,
    *,
    config: Config | None = None,
    use_config: bool = False,
    files: list[Path] | None = None,
    book: Any = None,
) -> Prepared:
    """Check every argument of ``args`` and compile its engine query (a UsageError for
    the first mistake). ``use_config``: take ``config`` (the running proxy's) instead of
    reading ``args.config``; ``files``: these logs instead of finding ``args.file``;
    ``book``: the config's price book, made once by a long-lived caller."""
    warnings: list[str] = []
    tz = get_tz(args.tz)
    window = resolve_window(args, tz, now)
    files = resolve_files(args) if files is None else files
    group_dims = parse_group_by(args.group_by)
    tags = parse_tags(args.tag)
    if not use_config:
        needs_config = bool(args.model or args.savings or args.suggest)
        config = optional_config(args.config, needs_config, warnings)
    book = (book or pricebook(config)) if (args.savings or args.suggest) else None
    aliases = config_aliases(config)

    fmt = args.format
    # The cube always keeps provider and model (summary tables and sections need them),
    # plus the asked-for groups and one time dimension when any view is over time.
    dims: list[str] = ["provider", "model", *[d for d in group_dims if d not in ("provider", "model")]]
    if fmt in SERIES and SERIES[fmt] not in dims:
        dims.append(SERIES[fmt])
    if args.projection and not any(d in TIME_DIMS for d in dims):
        dims.append("day")
    query = request_query(
        args,
        window,
        tz,
        aliases,
        dims=dims,
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
    filters: dict[str, Any] = {
        k: v
        for k, v in (
            ("provider", list(args.provider)),
            ("model", list(args.model)),
            ("user", list(args.user)),
            ("team", list(args.team)),
            ("status", list(args.status)),
            ("tag", [f"{k}={v}" for k, v in tags]),
        )
        if v
    }
    if args.errors_only:
        filters["errors_only"] = True
    extra_ask = ExtraRequest(
        compare=args.compare,
        sessions=args.sessions,
        sessions_sort=args.sessions_sort,
        min_cost=cost_bound("--min-cost", args.min_cost),
        max_cost=cost_bound("--max-cost", args.max_cost),
        users=args.users,
    )
    if args.sessions_sort not in SESSION_SORTS:
        raise UsageError(f"--sessions-sort: expected one of {', '.join(SESSION_SORTS)}")
    if not args.sessions:
        given = [o for o, v in (("--min-cost", args.min_cost), ("--max-cost", args.max_cost)) if v is not None]
        given += ["--sessions-sort"] if args.sessions_sort != "recent" else []
        if given:  # they shape the sessions list, which only --sessions (or --all) shows
            raise UsageError(f"{given[0]} needs --sessions")
    if extra_ask.min_cost is not None and extra_ask.max_cost is not None and extra_ask.min_cost > extra_ask.max_cost:
        raise UsageError(f"--min-cost {args.min_cost} is more than --max-cost {args.max_cost}: no session could match")
    return Prepared(args, now, tz, window, files, group_dims, config, book, query, filters, extra_ask, warnings)


def aggregate(
    p: Prepared, progress: Callable[[int, int], None] | None = None, *, jobs: int | None = None, memo: SegmentMemo | None = None
) -> Report:
    """The scan a prepared request asks for, and its extra sections: the report every
    aggregated format (and the analytics API) renders. ``memo``: a long-lived reader's
    results of whole log segments (storage/memo.py)."""
    args = p.args
    use_index = not (args.no_index or os.environ.get("ANALYZE_COSTS_NO_INDEX"))
    jobs = args.jobs if jobs is None else jobs
    res = scan(p.files, p.query, jobs=jobs, use_index=use_index, progress=progress, memo=memo)
    report = Report(args, p.window, p.now, p.files, res, p.group_dims, p.config, p.book, p.filters)
    if args.format != "csv":
        report.extras = extra_sections(p.extra_ask, p.query, p.files, p.now, p.tz, res, jobs=jobs, use_index=use_index, memo=memo)
    if args.latency and p.group_dims and args.format != "csv":
        # Success and latency per group: a cube of the groups by whole milliseconds.
        lat = replace(p.query, dims=(*p.group_dims, LATENCY_DIM), latency=False, top=0, savings=False, habits=False, pricebook=None)
        report.group_latency = scan(p.files, lat, jobs=jobs, use_index=use_index, memo=memo).latency_by(p.group_dims)
    return report


def write_report(
    args: ReportRequest,
    open_output: Callable[[Sequence[Path]], tuple[IO[str], bool]],
    now: datetime,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run the report ``args`` asks for over the log and write it to the output
    ``open_output(log files)`` gives (the stream, and whether to close it after). The
    output is opened only once every argument has been checked, so a mistake never
    truncates a file; it is given the logs to be read, so it can refuse to overwrite one.
    Returns the warnings for the reader (a config ignored, corrupt or duplicate lines,
    damaged files)."""
    p = prepare(args, now)
    fmt, files, tz = args.format, p.files, p.tz
    out, close = open_output(files)
    try:
        if fmt == "detailed" or (fmt == "csv" and not p.group_dims):
            res = ScanResult(dims=(), tz=tz)
            res.files = files
            records = iter_selected(files, p.query, res, progress=progress)
            report = Report(args, p.window, now, files, res, p.group_dims, p.config, p.book, p.filters)
            if fmt == "detailed":
                write_detailed(out, records, report)
            else:
                write_request_csv(out, records)
        else:
            report = aggregate(p, progress)
            if fmt == "summary":
                out.write(render_summary(report))
            elif fmt == "json":
                out.write(orjson.dumps(report_json(report), option=orjson.OPT_INDENT_2).decode() + "\n")
            elif fmt == "csv":
                write_group_csv(out, report)
            else:
                out.write(render_series(report, SERIES[fmt]))
                more = extra_text(report.extras, tz_name(tz), args.limit or 10, args.sessions_sort)
                if more:
                    out.write("\n" + "\n".join(more).rstrip("\n") + "\n")
    finally:
        if close:
            out.close()
    return p.warnings + scan_warnings(report.res)
