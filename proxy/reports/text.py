"""The text formats: the summary, time series (hourly/daily/weekly/monthly) and the detailed per-request listing."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import IO, Any, Iterable, Sequence

from proxy.core.money import cost_units, format_usd, units_to_usd
from proxy.core.text import printable
from proxy.core.timestamps import canonical_ts, ts_to_datetime
from proxy.engine.cube import time_bucket
from proxy.engine.totals import Totals
from proxy.reports.advice import projection, savings, suggestions
from proxy.reports.model import Report, sorted_groups
from proxy.reports.numbers import count_text, fmt_int, ms_text, ratio, record_decimal, share


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


def fmt_ts(ts: str | None, tz: tzinfo, seconds: bool = False) -> str:
    if not ts:
        return "-"
    dt = ts_to_datetime(ts).astimezone(tz)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def tz_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or datetime.now(tz).tzname() or "UTC")


def header_lines(r: Report, title: str) -> list[str]:
    start, end = r.shown_span()
    s = start.astimezone(r.tz).strftime("%Y-%m-%d %H:%M") if start else "the beginning"
    e = end.astimezone(r.tz).strftime("%Y-%m-%d %H:%M")
    lines = [f"{title}: {s} to {e} {tz_name(r.tz)} ({r.window.label})"]
    extra = f" (+{len(r.files) - 1} more)" if len(r.files) > 1 else ""
    lines.append(f"Log: {printable(str(r.files[0]), 400)}{extra}")
    if r.filters:
        lines.append("Filters: " + filters_text(r))
    return lines


def lower_bound_parts(t: Totals, *, brief: bool = False) -> list[str]:
    """Why a total is only a lower bound: the calls without a cost, each kind once."""
    parts = []
    if t.unpriced:
        s = "s" if t.unpriced != 1 else ""
        parts.append(f"{t.unpriced:,} request{s} unpriced" if brief else f"{t.unpriced:,} unpriced (no price for their model)")
    if t.unknown:
        parts.append(f"{t.unknown:,} with unknown usage" + ("" if brief else " (stream cut before usage arrived)"))
    return parts


def lower_bound_note(t: Totals) -> str:
    return "; ".join(lower_bound_parts(t))


def filters_text(r: Report) -> str:
    """The report's filters as one line's worth of ``key=value`` text."""
    return "  ".join(
        printable(f"{k}={','.join(v) if isinstance(v, (list, tuple)) else v}", 400) if k != "errors_only" else "errors only"
        for k, v in r.filters.items()
    )


DEFAULT_LIMIT = 10


def row_limit(r: Report) -> int | None:
    """Rows per table: ``--limit N``, 10 when not given, every row for ``--limit 0``."""
    limit = r.request.limit
    return DEFAULT_LIMIT if limit is None else (limit or None)


def shares_text(r: Report, t: Totals) -> list[str]:
    """``--shares``: cost by provider and by model with each one's share and average."""
    res = r.res
    limit = row_limit(r)
    ok = t.requests - t.errors
    tok = t.tokens
    tok_detail = f"input {tok['input_tokens']:,}, output {tok['output_tokens']:,}"
    if tok["cache_read_tokens"]:
        tok_detail += f", cache read {tok['cache_read_tokens']:,}"
    out: list[str] = [
        f"Requests  {t.requests:,}  ({ok:,} ok, {t.errors:,} errors, {share(ok, t.requests)} success)",
        f"Tokens    {tok['total_tokens']:,}  ({tok_detail})",
        "",
    ]
    by_provider = sorted(res.rollup(["provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
    out.append("Cost by provider")
    out.append(
        table(
            ["provider", "cost", "share", "requests", "tokens"],
            [
                (
                    k[0],
                    format_usd(v.total_cost, at_least=v.incomplete),
                    share(v.cost_units, t.cost_units),
                    fmt_int(v.requests),
                    fmt_int(v.tokens["total_tokens"]),
                )
                for k, v in by_provider
            ],
            [False, True, True, True, True],
        )
    )
    by_model = sorted(res.rollup(["model", "provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
    shown = by_model[:limit] if limit else by_model
    out.append("Models by cost" + top_of(len(shown), len(by_model)))
    out.append(
        table(
            ["model", "provider", "cost", "share", "requests", "avg/request"],
            [
                (
                    k[0],
                    k[1],
                    format_usd(v.total_cost, at_least=v.incomplete),
                    share(v.cost_units, t.cost_units),
                    fmt_int(v.requests),
                    format_usd(ratio(v.total_cost, v.requests), at_least=v.incomplete),
                )
                for k, v in shown
            ],
            [False, False, True, True, True, True],
        )
    )
    return out


def top_of(shown: int, total: int) -> str:
    return f" (top {shown} of {total})" if total > shown else ""


def group_table(r: Report, dims: Sequence[str], overall: Totals, limit: int | None = None) -> list[str]:
    """The ``--group-by`` table under its heading: the ``limit`` costliest groups (time
    groups in time order, the first ``limit``), the heading saying "top N of M"."""
    rows = sorted_groups(r, dims)
    shown = rows[:limit] if limit else rows
    heading = "By " + ", ".join(dims) + top_of(len(shown), len(rows))
    return [
        heading,
        table(
            [*dims, "requests", "errors", "tokens", "cost", "share"],
            [
                (
                    *[str(x) for x in k],
                    fmt_int(v.requests),
                    fmt_int(v.errors),
                    fmt_int(v.tokens["total_tokens"]),
                    format_usd(v.total_cost, at_least=v.incomplete),
                    share(v.cost_units, overall.cost_units),
                )
                for k, v in shown
            ],
            [False] * len(dims) + [True] * 5,
        ),
    ]


def sections_text(r: Report, t: Totals) -> list[str]:
    out: list[str] = []
    a = r.request
    if a.latency:
        out.append("Success rate and latency (ms)")
        for by in ("provider", "model"):
            stats = sorted(r.res.latency_for(by).items(), key=lambda kv: (-kv[1][0], kv[0]))
            limit = row_limit(r)  # --limit, as for every table of rows
            if limit and len(stats) > limit:
                out.append(f"  by {by}{top_of(limit, len(stats))}")
                stats = stats[:limit]
            out.append(
                table(
                    [by, "requests", "success", "p50", "p95"],
                    [(name, fmt_int(n), share(n - err, n), ms_text(p50), ms_text(p95)) for name, (n, err, _, p50, p95) in stats],
                    [False, True, True, True, True],
                )
            )
        if r.group_latency is not None:
            # Per --group-by group too, the busiest first (the --limit of them).
            rows = sorted(r.group_latency.items(), key=lambda kv: (-kv[1][0], tuple(str(x) for x in kv[0])))
            limit = row_limit(r)
            shown = rows[:limit] if limit else rows
            if len(shown) < len(rows):
                out.append(f"  by {', '.join(r.group_dims)}{top_of(len(shown), len(rows))}")
            out.append(
                table(
                    [*r.group_dims, "requests", "success", "p50", "p95"],
                    [
                        (*[str(x) for x in k], fmt_int(n), share(n - err, n), ms_text(p50), ms_text(p95))
                        for k, (n, err, _, p50, p95) in shown
                    ],
                    [False] * len(r.group_dims) + [True] * 4,
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
                        fmt_ts(x["timestamp"], r.tz, True),
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
    out.append(f"Peak {dim}: {top_label} at {format_usd(top_v.total_cost)} ({share(top_v.cost_units, total.cost_units)} of the total)")
    note = lower_bound_note(total)
    if note:
        out.append(f"Costs are lower bounds: {note}.")
    out += [""] + sections_text(r, total) if r.request.any_section else []
    return "\n".join(out).rstrip("\n") + "\n"


def write_detailed(out: IO[str], records: Iterable[dict[str, Any]], r: Report) -> None:
    """One line per request, streamed (``--limit N``: the last N)."""
    tz = r.tz
    if r.request.limit:
        records = deque(records, maxlen=r.request.limit)
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
            cost_text = format_usd(record_decimal(cost))
        model = rec.get("model") or rec.get("response_model") or "-"
        status = printable(str(rec.get("status")), 20)
        if rec.get("error") and status.startswith("2"):
            status += " (error)"
        out.write(
            f"{fmt_ts(canonical_ts(rec.get('timestamp')), tz, True):19}  "
            f"{printable(str(rec.get('provider')) + '/' + str(model), 40):40}  "
            f"{count_text(rec.get('input_tokens')):>9}  {count_text(rec.get('output_tokens')):>8}  {cost_text:>12}  "
            f"{printable(str(rec.get('user_id') or '-'), 16):16}  {status}\n"
        )
    out.write(f"{n:,} requests, {'at least ' if incomplete else ''}{format_usd(units_to_usd(units))}\n")
