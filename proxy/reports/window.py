"""The time a report covers (``Window``), from --since, --start-date/--end-date or --period, in a time zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from proxy.core.periods import calendar_period
from proxy.errors import UsageError
from proxy.reports.request import ReportRequest


def parse_since(text: str) -> float | None:
    """Hours ("24", "1.5"), or with a unit: "90m", "36h", "7d", "2w"; "all": no limit."""
    t = text.strip().lower()
    if t in ("all", "0", "none"):
        return None
    mult = {"m": 1 / 60, "h": 1, "d": 24, "w": 168}
    try:
        hours = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise UsageError(f"--since: expected hours like 24, 36h, 7d or all, got {text!r}") from None
    if not 0 < hours <= _MAX_SINCE_HOURS:  # also NaN
        raise UsageError(f"--since: expected a positive time up to 100 years (or all), got {text!r}")
    return hours


_MAX_SINCE_HOURS = 100 * 366 * 24


def parse_when(text: str, tz: tzinfo, *, end: bool) -> datetime:
    """A bare date is the whole day in ``tz`` (``--end-date`` includes that day); an ISO
    time without a zone is in ``tz`` too."""
    t = text.strip()
    try:
        if len(t) == 10:
            d = date.fromisoformat(t)
            start = datetime(d.year, d.month, d.day, tzinfo=tz)
            day = start + timedelta(days=1) if end else start
            day.timestamp()
            return day
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
        dt = dt if dt.tzinfo else dt.replace(tzinfo=tz)
        dt.timestamp()  # a time the engine can hold (epoch seconds), in any zone
    except ValueError:
        raise UsageError(f"expected a date (2026-11-01) or ISO time (2026-11-01T09:30), got {text!r}") from None
    except OverflowError:
        raise UsageError(f"{text!r} is beyond the dates a report can cover") from None
    return dt


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


@dataclass
class Window:
    start: datetime | None
    end: datetime | None
    label: str
    tz: tzinfo


def resolve_window(args: ReportRequest, tz: tzinfo, now: datetime) -> Window:
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
        if args.start_date and args.end_date:
            label = f"{args.start_date} through {args.end_date}"
        else:
            label = f"from {args.start_date}" if args.start_date else f"through {args.end_date}"
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
