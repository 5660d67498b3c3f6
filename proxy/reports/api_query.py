"""The analytics API's query strings (docs/api.md "Parameters"): each checked, parameter
by parameter, into the report request the CLI would build (``parse_params``), and who is
asking (``Viewer``). Pure: a UsageError names the parameter at fault."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Mapping, Sequence

from proxy.core.money import usd_to_units
from proxy.engine.query import status_matcher
from proxy.errors import UsageError
from proxy.reports.request import ReportRequest
from proxy.reports.window import get_tz, parse_when

# Query parameters every analytics endpoint takes: the report CLI's window and filters.
COMMON_PARAMS = ("days", "start", "end", "tz", "provider", "model", "user", "team", "category", "status", "tag")
REPEATABLE = frozenset(("provider", "model", "user", "team", "category", "status", "tag"))
MAX_DAYS = 3660
MAX_LIMIT = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_HOURLY_DAYS = 31  # an hourly series longer than a month is too long to draw or send

# Per endpoint: (its own parameters beyond COMMON_PARAMS, the default window in days).
ENDPOINTS: dict[str, tuple[tuple[str, ...], int]] = {
    "usage": (("interval",), 7),
    "costs": ((), 30),
    "provider": (("interval",), 7),
    "latency": ((), 7),
    "expensive-requests": (("limit",), 7),
    "users": (("limit",), 7),
    "user": (("interval",), 7),
    "sessions": (("sort", "min_cost", "max_cost", "limit"), 7),
    "export": (("format",), 7),
}


@dataclass(frozen=True)
class Viewer:
    """Whose numbers a request may see: everyone's (``user`` None), or one user's."""

    role: str  # "admin", "user" or "local" (no auth:, served on loopback or public)
    user: str | None = None


@dataclass(frozen=True)
class Asked:
    """A query string checked: the report request it stands for, and the endpoint's own
    parameters (as given, validated)."""

    request: ReportRequest
    extra: Mapping[str, str]


def one_param(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or ()
    if len(values) > 1:
        raise UsageError(f"{name}: given {len(values)} times; give it once", name)
    return values[0] if values else None


def whole_number(text: str, name: str, lo: int, hi: int) -> int:
    try:
        n = int(text.strip())
    except ValueError:
        raise UsageError(f"{name}: expected a whole number from {lo} to {hi}, got {text[:40]!r}", name) from None
    if not lo <= n <= hi:
        raise UsageError(f"{name}: expected a whole number from {lo} to {hi}, got {n}", name)
    return n


def usd_param(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    try:
        units = usd_to_units(text)
    except ValueError:
        raise UsageError(f"{name}: expected an amount in US dollars like 0.05, got {text[:40]!r}", name) from None
    if not 0 <= units <= usd_to_units(10**12):
        raise UsageError(f"{name}: expected an amount from 0 to 1000000000000 US dollars", name)
    return text.strip()


def parse_params(kind: str, params: Mapping[str, Sequence[str]], log_path: str, viewer: Viewer) -> Asked:
    """The report request a query string asks for, checked parameter by parameter (a
    UsageError naming the parameter for the first mistake). A user's key is held to its
    own user's records."""
    own, default_days = ENDPOINTS[kind]
    known = (*COMMON_PARAMS, *own)
    for name in params:
        if name not in known:
            raise UsageError(f"unknown parameter {name!r}; this endpoint takes {', '.join(known)}", name)
    for name in params:
        if name not in REPEATABLE:
            one_param(params, name)
    tz_text = one_param(params, "tz") or "UTC"
    try:
        tz = get_tz(tz_text)
    except UsageError:
        raise UsageError(f"tz: unknown time zone {tz_text[:60]!r} (use e.g. UTC, Europe/Berlin)", "tz") from None
    days, start, end = one_param(params, "days"), one_param(params, "start"), one_param(params, "end")
    if days is not None and (start or end):
        raise UsageError("days: give either days or start/end, not both", "days")
    for name, text in (("start", start), ("end", end)):
        if text is not None:
            try:
                parse_when(text, tz, end=name == "end")
            except UsageError as e:
                raise UsageError(f"{name}: {e}", name) from None
    if start and parse_when(start, tz, end=False) < EPOCH:
        raise UsageError("start: before 1970, when no call was logged", "start")
    if start and end:
        lo, hi = parse_when(start, tz, end=False), parse_when(end, tz, end=True)
        if hi <= lo:
            raise UsageError("end: is before start", "end")
        if hi - lo > timedelta(days=MAX_DAYS):
            raise UsageError(f"end: a window is at most {MAX_DAYS} days", "end")
    since = None
    if not (start or end):
        since = f"{whole_number(days, 'days', 1, MAX_DAYS) if days is not None else default_days}d"
    tags: list[str] = []
    for text in params.get("tag") or ():
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"tag: expected KEY=VALUE, got {text[:60]!r}", "tag")
        tags.append(f"{key.strip()}={value.strip()}")
    tags += [f"category={c}" for c in params.get("category") or ()]
    statuses = tuple(params.get("status") or ())
    try:
        if statuses:
            status_matcher(statuses)
    except ValueError as e:
        raise UsageError(f"status: {e}", "status") from None
    users = tuple(params.get("user") or ())
    if viewer.user is not None:
        if any(u != viewer.user for u in users):
            raise UsageError("user: this key sees only its own user's numbers", "user")
        users = (viewer.user,)
    extra = {name: v for name in own if (v := one_param(params, name)) is not None}
    req = ReportRequest(
        file=(log_path,),
        since=since,
        start_date=start,
        end_date=end,
        tz=tz_text,
        format="json",
        provider=tuple(params.get("provider") or ()),
        model=tuple(params.get("model") or ()),
        user=users,
        team=tuple(params.get("team") or ()),
        status=statuses,
        tag=tuple(tags),
    )
    return Asked(req, extra)
