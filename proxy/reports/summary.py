"""The default ``--format summary``: the user guide's block, to the letter (people parse
it in cron jobs), then what the block has no room for (the log, the window, filters,
lower bounds), then the sections asked for."""

from __future__ import annotations

from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Sequence

from proxy.core.money import format_usd_places
from proxy.core.text import printable
from proxy.engine.totals import Totals
from proxy.reports.extra import extra_text
from proxy.reports.model import Report
from proxy.reports.text import filters_text, group_table, lower_bound_parts, row_limit, sections_text, shares_text, tz_name

TITLE = "LLM PROXY COST ANALYSIS SUMMARY"
BANNER = "=" * 60
PROVIDER_RULE = "-" * 40
MODEL_RULE = "-" * 50
# The guide's column widths; a column grows (for every row) when a value is wider.
PROVIDER_WIDTH = 12
MODEL_WIDTH = 24
REQ_WIDTH = 5
TOKEN_WIDTH = 8


def naive_iso(dt: datetime, tz: tzinfo) -> str:
    """ISO seconds in the report's zone, without the offset, as the guide prints it."""
    return dt.astimezone(tz).replace(tzinfo=None, microsecond=0).isoformat()


def period_bounds(r: Report) -> tuple[datetime, datetime]:
    start, end = r.shown_span()
    # An open window over an empty log has no start: the period is then empty, ending now.
    return (start or end), end


def per(amount: Decimal, count: int, scale: int = 1) -> Decimal:
    """An exact average (rounded only where it is printed)."""
    return amount * scale / count if count else Decimal(0)


def at_least(t: Totals) -> str:
    """What follows a lower-bound amount: `` (at least: 3 requests unpriced)``, or nothing."""
    missing = lower_bound_counts(t)
    return f" (at least: {missing})" if missing else ""


def guide_rows(rows: Sequence[tuple[str, Totals]], name_width: int) -> list[str]:
    """``name | $cost | N req | N tokens`` rows, columns as wide as the widest value; a
    row whose cost is a lower bound says so after its last column."""
    cells = [
        (printable(name), format_usd_places(t.total_cost), str(t.requests), f"{t.tokens['total_tokens']:,}", at_least(t))
        for name, t in rows
    ]
    nw = max([name_width, *(len(c[0]) for c in cells)])
    cw = max([0, *(len(c[1]) for c in cells)])
    rw = max([REQ_WIDTH, *(len(c[2]) for c in cells)])
    tw = max([TOKEN_WIDTH, *(len(c[3]) for c in cells)])
    return [f"{n:<{nw}} | {c:>{cw}} | {q:>{rw}} req | {k:>{tw}} tokens{x}" for n, c, q, k, x in cells]


def lower_bound_counts(t: Totals) -> str:
    return ", ".join(lower_bound_parts(t, brief=True))


def guide_block(r: Report) -> tuple[list[str], list[str]]:
    """The guide's lines, and the notes that go after them."""
    res = r.res
    t = res.totals()
    limit = row_limit(r)
    start, end = period_bounds(r)
    cost = t.total_cost
    tokens = t.tokens["total_tokens"]
    missing = lower_bound_counts(t)
    mark = at_least(t)
    avg_mark = " (at least)" if missing else ""
    out = [
        BANNER,
        TITLE,
        BANNER,
        f"Time Period: {naive_iso(start, r.tz)} to {naive_iso(end, r.tz)}",
        f"Total Cost: {format_usd_places(cost)}{mark}",
        f"Total Requests: {t.requests}",
        f"Total Tokens: {tokens:,}",
        f"Average Cost per Request: {format_usd_places(per(cost, t.requests))}{avg_mark}",
        f"Average Cost per 1K Tokens: {format_usd_places(per(cost, tokens, 1000))}{avg_mark}",
        "",
        "COST BY PROVIDER:",
        PROVIDER_RULE,
    ]
    by_provider = sorted(res.rollup(["provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
    out += guide_rows([(k[0], v) for k, v in by_provider], PROVIDER_WIDTH)
    out += ["", "TOP MODELS BY COST:", MODEL_RULE]
    by_model = sorted(res.rollup(["provider", "model"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
    out += guide_rows([(f"{k[0]}/{k[1]}", v) for k, v in (by_model[:limit] if limit else by_model)], MODEL_WIDTH)

    notes = [f"Window: {r.window.label}, times in {tz_name(r.tz)}"]
    extra = f" (+{len(r.files) - 1} more)" if len(r.files) > 1 else ""
    notes.append(f"Log: {printable(str(r.files[0]), 400)}{extra}")
    if r.filters:
        notes.append("Filters: " + filters_text(r))
    if not t.requests:
        notes.append("No requests in this period." if not r.filters else "No requests match these filters in this period.")
    if limit is not None and len(by_model) > limit:
        notes.append(f"Top models: {limit} of {len(by_model)} shown (--limit N for more)")
    if missing:
        short = [f"{k[0]}/{k[1]}" for k, v in by_model if v.incomplete]
        names = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        notes.append(f"Costs are lower bounds: {', '.join(lower_bound_parts(t))}; models affected: {printable(names, 400)}.")
    return out, notes


def render_summary(r: Report) -> str:
    block, notes = guide_block(r)
    out = [*block, "", *notes, ""]
    t = r.res.totals()
    if r.group_dims and t.requests:
        rows = group_table(r, r.group_dims, t, limit=row_limit(r))
        out += rows
    if r.request.shares:
        out += shares_text(r, t)
    out += sections_text(r, t)
    out += extra_text(r.extras, tz_name(r.tz), row_limit(r), r.request.sessions_sort)
    return "\n".join(out).rstrip("\n") + "\n"
