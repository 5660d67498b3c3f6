"""Calendar periods: the one implementation budgets and reports share.

A day runs from local midnight in a time zone (DST-aware: 23 or 25 hours on a change),
a week from Monday 00:00, a month from the 1st 00:00. Pure: times are POSIX seconds.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone, tzinfo

PERIODS = ("daily", "weekly", "monthly")
# Report names: the current period, or the one before it.
_NAMED = {
    "daily": ("daily", False, "today"),
    "yesterday": ("daily", True, "yesterday"),
    "weekly": ("weekly", False, "this week"),
    "last-week": ("weekly", True, "last week"),
    "monthly": ("monthly", False, "this month"),
    "last-month": ("monthly", True, "last month"),
}
NAMED_PERIODS = tuple(_NAMED)


_INF = math.inf


def _midnight(d: date, tz: tzinfo) -> float:
    # Wall-clock midnight of that date in the zone (DST-aware: a day can be 23 or 25 h).
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


def period_bounds(period: str | None, ts: float, tz: tzinfo) -> tuple[float, float]:
    """[start, end) of the calendar period holding ``ts``: daily from local midnight,
    weekly from Monday 00:00, monthly from the 1st 00:00. No period: all time."""
    if period is None:
        return 0.0, _INF
    d = datetime.fromtimestamp(ts, tz).date()
    if period == "daily":
        start, end = d, d + timedelta(days=1)
    elif period == "weekly":
        start = d - timedelta(days=d.weekday())
        end = start + timedelta(days=7)
    elif period == "monthly":
        start = d.replace(day=1)
        end = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    lo, hi = _midnight(start, tz), _midnight(end, tz)
    # A zone whose midnight falls in a DST gap: the day starts at the first instant
    # that exists; never let ``ts`` fall outside its own bounds.
    if lo > ts:
        lo = ts
    return lo, hi


def iso(ts: float) -> str | None:
    if ts == _INF:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def calendar_period(name: str, now: datetime) -> tuple[datetime, datetime, str]:
    """A named period (``NAMED_PERIODS``: daily, yesterday, weekly, last-week, monthly,
    last-month) around ``now`` in ``now``'s zone: (start, end, label such as "this week")."""
    period, previous, label = _NAMED[name]
    tz = now.tzinfo or timezone.utc
    lo, hi = period_bounds(period, now.timestamp(), tz)
    if previous:
        lo, hi = period_bounds(period, lo - 1, tz)
    return datetime.fromtimestamp(lo, tz), datetime.fromtimestamp(hi, tz), label
