"""The sections that need a scan of their own: ``--compare`` (today against yesterday,
this week against last week), ``--sessions`` and ``--users`` (cost per active user).
Each is one more ``storage.scan`` with the report's filters; every sum is the engine's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence

from proxy.core.money import format_usd
from proxy.core.periods import calendar_period
from proxy.engine.cube import ScanResult
from proxy.engine.query import NONE_LABEL, Query
from proxy.engine.totals import Totals
from proxy.reports.numbers import exact, ratio
from proxy.reports.text import table, top_of
from proxy.storage.scan import scan

SESSION_SORTS = ("recent", "cost", "tokens", "requests")
# (label, named period) pairs, each current period before the one it is compared with.
COMPARED = (("today", "daily"), ("yesterday", "yesterday"), ("this week", "weekly"), ("last week", "last-week"))


@dataclass
class Extras:
    """What the extra scans found, for the text and JSON formats."""

    compare: list[tuple[str, datetime, datetime, Totals]] | None = None
    sessions: list[tuple[str, Totals, str]] | None = None  # (session id, totals, last active hour)
    sessions_total: int = 0  # sessions in the cost range, before --limit
    sessions_without_id: int = 0  # requests with no session id
    users: tuple[int, Totals, int] | None = None  # (active users, their totals, requests without a user id)


@dataclass(frozen=True)
class ExtraRequest:
    compare: bool = False
    sessions: bool = False
    sessions_sort: str = "recent"
    min_cost: Decimal | None = None
    max_cost: Decimal | None = None
    users: bool = False


def _plain(q: Query, **changes: Any) -> Query:
    """The report's query with its filters, keeping nothing but the cube."""
    return replace(q, latency=False, top=0, savings=False, habits=False, pricebook=None, **changes)


def compare_periods(
    q: Query, files: Sequence[Path], now: datetime, tz: tzinfo, main: ScanResult | None = None, **scan_args: Any
) -> list[tuple[str, datetime, datetime, Totals]]:
    """Calendar periods around ``now`` in ``tz`` (not the report's window), with its
    filters: from the report's own cube ``main`` where it holds the period by the hour,
    else from a scan of the period."""
    out = []
    local_now = now.astimezone(tz)
    for label, name in COMPARED:
        start, end, _ = calendar_period(name, local_now)
        held = main is not None and main.holds(q.start, q.end, start.timestamp(), end.timestamp())
        if main is not None and held:
            t = main.totals_between(start.timestamp(), end.timestamp())
        else:
            t = scan(files, _plain(q, start=start.timestamp(), end=end.timestamp(), dims=("provider",)), **scan_args).totals()
        out.append((label, start, min(end, now), t))
    return out


def session_rows(res: ScanResult, sort: str, lo: Decimal | None, hi: Decimal | None) -> tuple[list[tuple[str, Totals, str]], int]:
    """Sessions of a ("session", "hour") scan in the cost range, sorted; and how many
    requests had no session id."""
    per = res.rollup(["session"])
    last: dict[str, str] = {}
    for (sid, hour), _ in res.rollup(["session", "hour"]).items():
        if hour > last.get(sid, ""):
            last[sid] = hour
    missing = per.pop((NONE_LABEL,), Totals()).requests
    rows = [(str(k[0]), t, last.get(k[0], "")) for k, t in per.items()]
    rows = [r for r in rows if (lo is None or r[1].total_cost >= lo) and (hi is None or r[1].total_cost <= hi)]
    keys = {
        "recent": lambda r: (r[2], r[1].cost_units),
        "cost": lambda r: (r[1].cost_units, r[2]),
        "tokens": lambda r: (r[1].tokens["total_tokens"], r[2]),
        "requests": lambda r: (r[1].requests, r[2]),
    }
    rows.sort(key=lambda r: r[0])
    rows.sort(key=keys[sort], reverse=True)
    return rows, missing


def extra_sections(
    ask: ExtraRequest, q: Query, files: Sequence[Path], now: datetime, tz: tzinfo, main: ScanResult | None = None, **scan_args: Any
) -> Extras:
    """The sections ``ask`` wants; ``main``: the report's own scan, where a section can be
    read from its cube instead of scanning again."""
    ex = Extras()
    if ask.compare:
        ex.compare = compare_periods(q, files, now, tz, main, **scan_args)
    if ask.sessions:
        res = scan(files, _plain(q, dims=("session", "hour")), **scan_args)
        rows, ex.sessions_without_id = session_rows(res, ask.sessions_sort, ask.min_cost, ask.max_cost)
        ex.sessions, ex.sessions_total = rows, len(rows)
    if ask.users:
        per = scan(files, _plain(q, dims=("user",)), **scan_args).rollup(["user"])
        missing = per.pop((NONE_LABEL,), Totals()).requests
        total = Totals()
        for t in per.values():
            total.merge(t)
        ex.users = (len(per), total, missing)
    return ex


# --- output ------------------------------------------------------------------------------


def change_text(now_units: int, before_units: int) -> str:
    if not before_units:
        return "-" if not now_units else "new"
    return f"{(now_units - before_units) * 100 / before_units:+.1f}%"


def count_change(now_n: int, before_n: int) -> str:
    if not before_n:
        return "-" if not now_n else "new"
    return f"{(now_n - before_n) * 100 / before_n:+.1f}%"


def extra_text(ex: Extras | None, tz_label: str, limit: int | None, sort: str) -> list[str]:
    out: list[str] = []
    if ex is None:
        return out
    if ex.compare is not None:
        out.append(f"Compared periods ({tz_label} calendar, up to now; the filters apply, the report's window does not)")
        rows = []
        for i, (label, _, _, t) in enumerate(ex.compare):
            if i % 2 == 0:
                before = ex.compare[i + 1][3]
                rows.append(
                    (
                        label,
                        format_usd(t.total_cost, at_least=t.incomplete),
                        f"{t.requests:,}",
                        change_text(t.cost_units, before.cost_units),
                        count_change(t.requests, before.requests),
                    )
                )
            else:
                rows.append((label, format_usd(t.total_cost, at_least=t.incomplete), f"{t.requests:,}", "", ""))
        out.append(table(["period", "cost", "requests", "cost change", "requests change"], rows, [False, True, True, True, True]))
    if ex.sessions is not None:
        n = ex.sessions_total
        cost = Totals()
        for _, t, _ in ex.sessions:
            cost.merge(t)
        avg = format_usd(ratio(cost.total_cost, n), at_least=cost.incomplete) if n else "-"
        head = f"Sessions: {n:,} (average {avg} per session"
        head += f"; {ex.sessions_without_id:,} requests without a session id)" if ex.sessions_without_id else ")"
        out.append(head)
        shown = ex.sessions[:limit] if limit else ex.sessions
        if shown:
            out.append(f"  by {sort}" + top_of(len(shown), n))
            out.append(
                table(
                    ["session", "last active", "requests", "tokens", "cost"],
                    [
                        (s, hour, f"{t.requests:,}", f"{t.tokens['total_tokens']:,}", format_usd(t.total_cost, at_least=t.incomplete))
                        for s, t, hour in shown
                    ],
                    [False, False, True, True, True],
                )
            )
        else:
            out.append("")
    if ex.users is not None:
        n, t, missing = ex.users
        per = format_usd(ratio(t.total_cost, n), at_least=t.incomplete) if n else "-"
        line = f"Active users: {n:,} (with at least one call), {per} per active user"
        if missing:
            line += f"; {missing:,} requests without a user id are not counted"
        out += [line, ""]
    return out


def extra_json(ex: Extras | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if ex is None:
        return body
    if ex.compare is not None:
        body["compare"] = [
            {
                "period": label,
                "start": start.isoformat(),
                "end": end.isoformat(),
                "requests": t.requests,
                "total_cost": exact(t.total_cost),
                "cost_is_lower_bound": t.incomplete,
            }
            for label, start, end, t in ex.compare
        ]
    if ex.sessions is not None:
        cost = Totals()
        for _, t, _ in ex.sessions:
            cost.merge(t)
        body["sessions"] = {
            "count": ex.sessions_total,
            "avg_cost_per_session": exact(ratio(cost.total_cost, ex.sessions_total)),
            "requests_without_session_id": ex.sessions_without_id,
            "sessions": [
                {
                    "session_id": s,
                    "last_active_hour": hour,
                    "requests": t.requests,
                    "tokens": t.tokens["total_tokens"],
                    "total_cost": exact(t.total_cost),
                    "cost_is_lower_bound": t.incomplete,
                }
                for s, t, hour in ex.sessions
            ],
        }
    if ex.users is not None:
        n, t, missing = ex.users
        body["active_users"] = {
            "count": n,
            "total_cost": exact(t.total_cost),
            "cost_per_active_user": exact(ratio(t.total_cost, n)),
            "cost_is_lower_bound": t.incomplete,
            "requests_without_user_id": missing,
        }
    return body
