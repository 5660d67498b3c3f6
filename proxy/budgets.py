"""Spend limits that hold under concurrency, reset on calendar boundaries and need
nothing but the JSONL log.

The ledger is pure (its clock is injected) and synchronous. Before a call goes
upstream the server asks it, in ONE call with no ``await`` inside, to check every
budget that applies and to reserve the call's worst-case cost against all of them;
on the single asyncio thread nothing can run between that check and that reserve,
so N concurrent calls can never all see the same headroom. When the call ends the
reservation is released and the real cost added (``settle``).

Money is integer units of 1e-10 USD (``core.money.cost_units``), the precision of
records, so sums are exact.

Spend is counted per *dimension* value and period: (scope, tag, period) such as
("user", None, "daily") holds one counter per user per day. A limit is a threshold
on one dimension (optionally for one ``match`` value); two limits on the same
dimension read the same counter. Every call updates the counters of every tracked
dimension, so a limit added later (``keys update --budget-monthly``) starts from the
true spend.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .attribution import TAG_NAME
from .cli import command
from .core.money import COST_UNITS_PER_USD, cost_units, units_to_usd
from .core.timestamps import parse_timestamp
from .defaults import default_log_path
from .storage.logfiles import records_since

log = logging.getLogger("proxy")

SCOPES = ("global", "user", "team", "tag", "key", "session")
PERIODS = ("daily", "weekly", "monthly")
# A session budget has no calendar period; a session's spend is kept while it is in
# use and rebuilt at start-up from this far back (it is forgotten after this long idle).
SESSION_WINDOW = 31 * 86400
# Records are written when a call ends but stamped when it began: a long call's line
# can sit after later ones. Reading the log from this much before a period start is
# enough to find them all (the proxy gives up on a silent upstream after read_timeout).
_LATE_SLACK = 86400
_PRUNE_EVERY = 60.0
_INF = math.inf


# --- configuration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # one of SCOPES
    period: str | None  # one of PERIODS; None: no reset (sessions)
    units: int  # the limit, in 1e-10 USD
    match: str | None = None  # only this value (user alice); None: each value separately
    tag: str | None = None  # the tag name, for scope "tag"
    source: str = "config"  # "config" | "key" (set by `keys create/update`)

    @property
    def usd(self) -> Decimal:
        return units_to_usd(self.units)

    @property
    def dim(self) -> tuple[str, str | None, str | None]:
        return (self.scope, self.tag, self.period)

    @property
    def label(self) -> str:
        """The budget as configured: ``user:alice daily``, ``user daily`` (each user)."""
        return self.name(self.match)

    def name(self, value: str | None) -> str:
        """One budget: the limit applied to one value (``user:bob daily``)."""
        head = self.scope
        if self.scope == "tag":
            head += f":{self.tag}" + (f"={value}" if value is not None else "")
        elif self.scope != "global" and value is not None:
            head += f":{value}"
        return f"{head} {self.period}" if self.period else head


@dataclass(frozen=True, slots=True)
class BudgetsConfig:
    limits: tuple[Limit, ...] = ()
    timezone: str = "UTC"
    warn_at: float = 0.8
    webhook: str | None = None
    override: bool = False  # never block, only warn
    # Output reserved by an uncapped call when neither config.yml nor the catalog
    # knows the model's limit (see ``model_output_limit``).
    default_max_output_tokens: int = 4096
    # A model without a price reserves and adds $0, so it could spend past every
    # limit unseen: such calls are refused under a budget unless this is set.
    allow_unpriced: bool = False


def usd_to_units(value: Any) -> int:
    """A USD amount from config or the command line, as exact integer units."""
    if isinstance(value, bool):
        raise ValueError("expected a number of US dollars")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"expected a number of US dollars, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"expected a non-negative number of US dollars, got {value!r}")
    return int((d * COST_UNITS_PER_USD).to_integral_value())


_LIMIT_KEYS = {"scope", "period", "usd", "match", "tag"}
_BUDGET_KEYS = {"timezone", "warn_at", "webhook", "override", "default_max_output_tokens", "allow_unpriced", "limits"}


def parse_budgets(value: Any, path: str, cost_tracking: bool = True) -> BudgetsConfig | None:
    """The ``budgets:`` section of config.yml; None when absent."""
    from urllib.parse import urlsplit

    from .config import ConfigError

    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, "budgets", f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if k not in _BUDGET_KEYS:
            raise ConfigError(path, f"budgets.{k}", f"unknown setting; known: {', '.join(sorted(_BUDGET_KEYS))}")
    if not cost_tracking:
        raise ConfigError(path, "budgets", "budgets need features.cost_tracking.enabled: spend is counted from the records")
    tz = value.get("timezone", "UTC")
    if not isinstance(tz, str):
        raise ConfigError(path, "budgets.timezone", f"expected a zone name such as UTC or Europe/Berlin, got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, "budgets.timezone", f"unknown time zone {tz!r} (IANA names such as UTC, Europe/Berlin)") from None
    warn_at = value.get("warn_at", 0.8)
    if isinstance(warn_at, bool) or not isinstance(warn_at, (int, float)) or not 0 < warn_at <= 1:
        raise ConfigError(path, "budgets.warn_at", f"expected a fraction of the limit in (0, 1], e.g. 0.8; got {warn_at!r}")
    webhook = value.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(path, "budgets.webhook", f"expected an http(s) URL, got {webhook!r}")
    override = value.get("override", False)
    if not isinstance(override, bool):
        raise ConfigError(path, "budgets.override", f"expected true or false, got {override!r}")
    cap = value.get("default_max_output_tokens", 4096)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(path, "budgets.default_max_output_tokens", f"expected a whole number of tokens, got {cap!r}")
    allow_unpriced = value.get("allow_unpriced", False)
    if not isinstance(allow_unpriced, bool):
        raise ConfigError(path, "budgets.allow_unpriced", f"expected true or false, got {allow_unpriced!r}")
    raw_limits = value.get("limits") or []
    if not isinstance(raw_limits, list):
        raise ConfigError(path, "budgets.limits", f"expected a list of limits, got {type(raw_limits).__name__}")
    limits = [_parse_limit(spec, path, f"budgets.limits[{i}]") for i, spec in enumerate(raw_limits)]
    return BudgetsConfig(tuple(limits), tz, float(warn_at), webhook, override, cap, allow_unpriced)


def _parse_limit(spec: Any, path: str, key: str) -> Limit:
    from .config import ConfigError

    if not isinstance(spec, Mapping):
        raise ConfigError(path, key, "expected a mapping such as {scope: user, period: daily, usd: 5}")
    for k in spec:
        if k not in _LIMIT_KEYS:
            raise ConfigError(path, f"{key}.{k}", f"unknown setting; known: {', '.join(sorted(_LIMIT_KEYS))}")
    scope = spec.get("scope")
    if scope not in SCOPES:
        raise ConfigError(path, f"{key}.scope", f"expected one of {', '.join(SCOPES)}; got {scope!r}")
    period = spec.get("period")
    if period is None and scope != "session":
        raise ConfigError(path, f"{key}.period", f"required: one of {', '.join(PERIODS)}")
    if period is not None and period not in PERIODS:
        raise ConfigError(path, f"{key}.period", f"expected one of {', '.join(PERIODS)}; got {period!r}")
    if "usd" not in spec:
        raise ConfigError(path, f"{key}.usd", "required: the limit in US dollars")
    try:
        units = usd_to_units(spec["usd"])
    except ValueError as e:
        raise ConfigError(path, f"{key}.usd", str(e)) from None
    match = spec.get("match")
    if match is not None:
        if scope == "global":
            raise ConfigError(path, f"{key}.match", "a global limit applies to everything; remove match")
        if not isinstance(match, (str, int)) or isinstance(match, bool) or str(match) == "":
            raise ConfigError(path, f"{key}.match", f"expected a value such as a user id, got {match!r}")
        match = str(match)
    tag = spec.get("tag")
    if scope == "tag":
        if not isinstance(tag, str) or not TAG_NAME.fullmatch(tag):
            raise ConfigError(path, f"{key}.tag", "required for scope tag: the tag name ([a-z0-9_-], e.g. feature)")
    elif tag is not None:
        raise ConfigError(path, f"{key}.tag", "only for scope tag")
    return Limit(scope, period, units, match, tag)


# --- calendar periods ---------------------------------------------------------------


def _midnight(d: date, tz: ZoneInfo) -> float:
    # Wall-clock midnight of that date in the zone (DST-aware: a day can be 23 or 25 h).
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


def period_bounds(period: str | None, ts: float, tz: ZoneInfo) -> tuple[float, float]:
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


# --- the ledger ---------------------------------------------------------------------


@dataclass(slots=True)
class Subject:
    """The values a call (or a record) has on each scope."""

    user_id: str | None = None
    team: str | None = None
    key_id: str | None = None
    session_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def value(self, scope: str, tag: str | None = None) -> str | None:
        if scope == "global":
            return "*"
        if scope == "user":
            return self.user_id
        if scope == "team":
            return self.team
        if scope == "key":
            return self.key_id
        if scope == "session":
            return self.session_id
        if scope == "tag" and tag is not None:
            v = self.tags.get(tag) if isinstance(self.tags, Mapping) else None
            return v if isinstance(v, str) else None
        return None


@dataclass(slots=True)
class Counter:
    start: float
    end: float
    spent: int = 0
    reserved: int = 0
    last: float = 0.0  # last activity, for forgetting idle sessions


CounterKey = tuple[str, "str | None", "str | None", str, float]  # scope, tag, period, value, start


@dataclass(slots=True)
class Hold:
    """A reservation: released, and the real cost added, by ``settle``."""

    counters: list[Counter]
    units: int
    settled: bool = False


@dataclass(frozen=True, slots=True)
class BudgetState:
    """One budget (a limit applied to one value) at one instant."""

    limit: Limit
    value: str | None
    spent: int
    reserved: int
    start: float
    end: float

    @property
    def name(self) -> str:
        return self.limit.name(self.value)

    @property
    def used(self) -> int:
        return self.spent + self.reserved

    @property
    def remaining(self) -> int:
        return max(0, self.limit.units - self.used)

    @property
    def fraction(self) -> float:
        if self.limit.units <= 0:
            return _INF if self.used > 0 else 1.0
        return self.used / self.limit.units

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.name,
            "scope": self.limit.scope,
            "value": self.value,
            "period": self.limit.period,
            "source": self.limit.source,
            "limit_usd": self.limit.usd,
            "spent_usd": units_to_usd(self.spent),
            "reserved_usd": units_to_usd(self.reserved),
            "remaining_usd": units_to_usd(self.remaining),
            "period_start": iso(self.start) if self.limit.period else None,
            "resets_at": iso(self.end),
        }


@dataclass(slots=True)
class Decision:
    hold: Hold | None = None  # None: refused
    refused: BudgetState | None = None  # the budget that blocks (also when overridden)
    overridden: bool = False  # a blocking budget was let through by an override
    worst: int = 0
    warnings: list[BudgetState] = field(default_factory=list)  # at or over warn_at, highest first
    new_warnings: list[BudgetState] = field(default_factory=list)  # first crossing this period
    tightest: BudgetState | None = None  # least remaining of the applicable budgets

    @property
    def allowed(self) -> bool:
        return self.hold is not None


def money(units: int) -> str:
    """Cents when exact, else every digit there is ($0.0034): spend is never rounded."""
    d = units_to_usd(units)
    return f"${d:.2f}" if units % 10**8 == 0 else f"${d:f}"


def refusal_message(state: BudgetState, worst: int) -> str:
    limit = state.limit
    resets = f"resets at {iso(state.end)}" if state.end != _INF else "does not reset (session budget)"
    scope_note = ""
    if limit.match is None and limit.scope != "global":
        scope_note = f" (a limit for each {limit.scope if limit.scope != 'tag' else 'value of tag ' + str(limit.tag)})"
    return (
        f"Budget exceeded: {state.name}{scope_note} has a limit of {money(limit.units)} and "
        f"{money(state.spent)} is spent"
        + (f" (+{money(state.reserved)} held by calls in progress)" if state.reserved else "")
        + f"; this call may cost up to {money(worst)}. The budget {resets}."
    )


class BudgetLedger:
    def __init__(
        self,
        limits: Sequence[Limit] = (),
        *,
        timezone: str = "UTC",
        warn_at: float = 0.8,
        clock: Callable[[], float] = time.time,
        extra_dims: Iterable[tuple[str, str | None, str | None]] = (),
    ) -> None:
        self.limits = tuple(limits)
        self.tz = ZoneInfo(timezone)
        self.warn_at = warn_at
        self.clock = clock
        dims: list[tuple[str, str | None, str | None]] = []
        for d in [*(lim.dim for lim in self.limits), *extra_dims]:
            if d not in dims:
                dims.append(d)
        self.dims = tuple(dims)
        self.counters: dict[CounterKey, Counter] = {}
        self._bounds: dict[str | None, tuple[float, float]] = {}
        self._warned: set[tuple[Limit, str | None, float]] = set()
        self._next_prune = 0.0

    # -- periods --

    def bounds(self, period: str | None, now: float) -> tuple[float, float]:
        if period is None:
            return 0.0, _INF
        b = self._bounds.get(period)
        if b is None or not (b[0] <= now < b[1]):
            b = self._bounds[period] = period_bounds(period, now, self.tz)
        return b

    def window_start(self, now: float) -> float:
        """The earliest instant whose records count towards a current budget."""
        starts = [now - SESSION_WINDOW if d[2] is None else self.bounds(d[2], now)[0] for d in self.dims]
        return min(starts, default=now)

    # -- counters --

    def _counter(self, dim: tuple[str, str | None, str | None], value: str, now: float, at: float | None = None) -> Counter:
        start, end = self.bounds(dim[2], now)
        key = (dim[0], dim[1], dim[2], value, start)
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = Counter(start, end, last=now if at is None else at)
        return c

    def _state(self, limit: Limit, value: str, now: float) -> BudgetState:
        start, end = self.bounds(limit.period, now)
        c = self.counters.get((limit.scope, limit.tag, limit.period, value, start))
        if c is None:
            return BudgetState(limit, value, 0, 0, start, end)
        return BudgetState(limit, value, c.spent, c.reserved, start, end)

    def _applicable(self, subject: Subject, limits: Sequence[Limit]) -> Iterator[tuple[Limit, str]]:
        for limit in limits:
            value = subject.value(limit.scope, limit.tag)
            if value is not None and (limit.match is None or limit.match == value):
                yield limit, value

    # -- the hot path: synchronous, so check + reserve is atomic under asyncio --

    def reserve(self, subject: Subject, worst: int, extra_limits: Sequence[Limit] = (), override: bool = False) -> Decision:
        """Check every applicable budget and, unless one would be crossed (and no
        override), reserve ``worst`` units against all of them, in one step."""
        now = self.clock()
        if now >= self._next_prune:
            self.prune(now)
        limits = self.limits + tuple(extra_limits) if extra_limits else self.limits
        checks = [self._state(limit, value, now) for limit, value in self._applicable(subject, limits)]
        decision = Decision(worst=max(0, worst))
        worst = decision.worst
        # Refused if this call could cross the limit, or the limit is already reached
        # (so a call of unknown price cannot slip past an exhausted budget).
        blocking = [s for s in checks if s.used + worst > s.limit.units or s.used >= s.limit.units]
        if blocking:
            decision.refused = min(blocking, key=lambda s: (s.limit.units - s.used, s.end))
            if not override:
                return decision
            decision.overridden = True
        # Reserve on every tracked dimension (so a limit added later starts from the
        # true spend) and on the dimensions of any extra (per-key) limits.
        counters: list[Counter] = []
        seen: set[tuple[str, str | None, str | None]] = set()
        for dim in (*self.dims, *(lim.dim for lim in extra_limits)):
            if dim in seen:
                continue
            seen.add(dim)
            value = subject.value(dim[0], dim[1])
            if value is None:
                continue
            c = self._counter(dim, value, now)
            c.reserved += worst
            c.last = now
            counters.append(c)
        decision.hold = Hold(counters, worst)
        after = [self._state(s.limit, s.value, now) for s in checks]  # type: ignore[arg-type]
        if after:
            decision.tightest = min(after, key=lambda s: (s.limit.units - s.used, s.end))
        warn = [s for s in after if s.fraction >= self.warn_at]
        warn.sort(key=lambda s: -s.fraction)
        decision.warnings = warn
        for s in warn:
            mark = (s.limit, s.value, s.start)
            if mark not in self._warned:
                self._warned.add(mark)
                decision.new_warnings.append(s)
        return decision

    def settle(self, hold: Hold | None, actual: int | None) -> None:
        """Release the reservation and add the real cost (None, unknown: 0)."""
        if hold is None or hold.settled:
            return
        hold.settled = True
        real = max(0, actual or 0)
        for c in hold.counters:
            c.reserved -= hold.units
            c.spent += real

    # -- start-up and reports --

    def add_spent(self, dim: tuple[str, str | None, str | None], value: str, units: int, last: float, now: float) -> None:
        """Count logged spend towards the current period of ``dim`` (start-up)."""
        c = self._counter(dim, value, now, at=last)
        c.spent += units
        c.last = max(c.last, last)

    def prune(self, now: float) -> None:
        """Forget ended periods and idle sessions (never while a call holds a reservation)."""
        self._next_prune = now + _PRUNE_EVERY
        dead = [k for k, c in self.counters.items()
                if c.reserved == 0 and (c.end <= now or (c.end == _INF and c.last < now - SESSION_WINDOW))]
        for k in dead:
            del self.counters[k]
        self._warned = {m for m in self._warned if m[2] >= self.bounds(m[0].period, now)[0]}

    def states(self, extra_limits: Sequence[Limit] = (), now: float | None = None) -> list[BudgetState]:
        """Every budget now: a limit with ``match`` (or global) always, a limit for
        each value once per value that has a counter in the current period."""
        now = self.clock() if now is None else now
        out: list[BudgetState] = []
        for limit in (*self.limits, *extra_limits):
            if limit.scope == "global":
                out.append(self._state(limit, "*", now))
            elif limit.match is not None:
                out.append(self._state(limit, limit.match, now))
            else:
                start, _ = self.bounds(limit.period, now)
                for (scope, tag, period, value, s), c in self.counters.items():
                    if (scope, tag, period) == limit.dim and s == start:
                        out.append(self._state(limit, value, now))
        return out

    def spent(self, dim: tuple[str, str | None, str | None], value: str, now: float | None = None) -> int:
        """Settled spend of one value of a tracked dimension in its current period."""
        now = self.clock() if now is None else now
        start, _ = self.bounds(dim[2], now)
        c = self.counters.get((dim[0], dim[1], dim[2], value, start))
        return c.spent if c is not None else 0

    def summary(self, extra_limits: Sequence[Limit] = ()) -> dict[str, int]:
        states = self.states(extra_limits)
        exhausted = sum(1 for s in states if s.fraction >= 1)
        warning = sum(1 for s in states if self.warn_at <= s.fraction < 1)
        return {"count": len(states), "warning": warning, "exhausted": exhausted}


# --- the worst case of a call -------------------------------------------------------

from .usage import Usage  # noqa: E402  (a leaf module: beside the only code that needs it)

# Every spelling of an output cap a provider accepts. Providers differ in which they
# honour when several are sent (and OpenAI-compatible servers differ again), so the
# largest one present is the cap.
_MAX_OUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_GEN_CONFIG_KEYS = ("generationConfig", "generation_config")
_GEN_MAX_OUT_KEYS = ("maxOutputTokens", "max_output_tokens")
# Choices billed per call: OpenAI ``n`` (and legacy completions' ``best_of``, which
# generates that many server-side and bills them all), Gemini candidate counts.
_CHOICE_KEYS = ("n", "best_of")
_GEN_CHOICE_KEYS = ("candidateCount", "candidate_count")
_MAX_CHOICES = 128
# No provider accepts a count this large; bounding the digits also keeps int() of a
# client's megabyte-long digit string off the event loop.
_MAX_DIGITS = 18
_MAX_COUNT = 10**_MAX_DIGITS


def _count(v: Any) -> int | None:
    """A non-negative whole number in any form a provider parses as one, else None:
    a provider rejects anything else, so it is not a cap to honour."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if 0 <= v < _MAX_COUNT else None
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and 0 <= v < _MAX_COUNT and v.is_integer() else None
    if isinstance(v, str):
        # Gemini's JSON (proto3) takes integers as strings, and lenient servers take
        # "1000.0"; str.isdigit alone would also pass non-ASCII digits such as "²".
        whole, dot, frac = v.strip().removeprefix("+").partition(".")
        if whole.isascii() and whole.isdigit() and len(whole) <= _MAX_DIGITS and (not dot or frac.strip("0") == ""):
            return int(whole)
    return None


def _largest(values: Iterable[Any], minimum: int = 0) -> int | None:
    found = [c for v in values if (c := _count(v)) is not None and c >= minimum]
    return max(found) if found else None


def max_output_tokens(body: Any, kind: str | None, default: int) -> int:
    """The most output a request can produce: its own cap or ``default`` (per choice),
    times the number of choices asked for (at most 128). Caps: ``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens`` (Responses) at the top level, and
    ``maxOutputTokens`` / ``max_output_tokens`` in Gemini's ``generationConfig`` /
    ``generation_config``; choices: ``n``, ``best_of``, ``candidateCount`` /
    ``candidate_count``. Ints, integral floats and numeric strings count; the largest
    of several spellings wins; negative or non-numeric values are ignored."""
    if kind == "embeddings":
        return 0
    if not isinstance(body, dict):
        return default
    caps = [body.get(k) for k in _MAX_OUT_KEYS]
    choices = [body.get(k) for k in _CHOICE_KEYS]
    for gk in _GEN_CONFIG_KEYS:
        gen = body.get(gk)
        if isinstance(gen, dict):
            caps += [gen.get(k) for k in _GEN_MAX_OUT_KEYS]
            choices += [gen.get(k) for k in _GEN_CHOICE_KEYS]
    cap = _largest(caps)
    # n=0 is rejected upstream; it must not make the reservation $0.
    n = _largest(choices, minimum=1) or 1
    return (default if cap is None else cap) * min(n, _MAX_CHOICES)


def worst_case_usage(
    body: Any,
    raw: bytes,
    kind: str | None,
    input_tokens: int,
    default_max_output: int,
    model_max_output: int | None = None,
) -> Usage:
    """A Usage for the most this request can cost: the estimated input, billed as a
    cache write when the request asks for caching (dearer than plain input on
    Anthropic), and the full output cap. A request without a cap may produce the
    model's maximum output per choice, ``model_max_output`` (``model_output_limit``),
    else ``default_max_output``."""
    per_choice = default_max_output if model_max_output is None else model_max_output
    u = Usage(input_tokens=input_tokens, output_tokens=max_output_tokens(body, kind, per_choice))
    if b"cache_control" in raw:
        u.cache_write_tokens = input_tokens
        if b'"1h"' in raw:
            u.cache_write_1h_tokens = input_tokens
    return u


def unpriced_refusal_message(provider: str, model: str | None) -> str:
    """Why a call under a budget is refused when its model has no price, and the three
    ways out. A model with no price would reserve and add $0: unseen spend."""
    if model:
        what = f"Model {model!r} on provider {provider!r} has no price"
        where = f"providers.{provider}.models.{model}.pricing"
    else:
        what = f"This call to provider {provider!r} names no model, so it has no price"
        where = f"providers.{provider}.models.<model>.pricing"
    return (
        f"{what}, so its cost cannot be counted against the budgets that apply to it. "
        f"To allow it, give the model a price: {where} in config.yml "
        "(e.g. {input: 2.50, output: 10.00}, USD per 1M tokens), "
        "or turn the bundled price catalog on (catalog: {enabled: true}) if it is off and lists this model, "
        "or set budgets.allow_unpriced: true to let calls to unpriced models through (their cost is not counted)."
    )


# --- rebuilding from the log --------------------------------------------------------


_FIELDS = {"user": "user_id", "team": "team", "key": "key_id", "session": "session_id"}


def _ms(ts: float) -> str:
    """Record timestamp text (UTC, milliseconds) of an instant: such texts sort in time order."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def replay_log(ledger: BudgetLedger, path: str | os.PathLike[str], now: float | None = None) -> tuple[int, int]:
    """Rebuild the current periods' spend from the log: (records read, records counted).

    Fast path for a month of records: bisect to the window, skip older lines from
    their raw bytes, parse the rest once (orjson), compare timestamps as text (the
    proxy writes one canonical UTC form), and sum integer units per (dimension,
    value) before touching the ledger."""
    now = ledger.clock() if now is None else now
    if not ledger.dims:
        return 0, 0
    plan = []
    for dim in ledger.dims:
        scope, tag, period = dim
        lo, hi = (now - SESSION_WINDOW, _INF) if period is None else ledger.bounds(period, now)
        plan.append((dim, _FIELDS.get(scope), scope == "global", tag, _ms(max(lo, 0.0)), "~" if hi == _INF else _ms(hi)))
    start = ledger.window_start(now)
    sums: dict[tuple[Any, str], list[Any]] = {}
    read = counted = 0
    for rec in records_since(path, start - 1, slack=_LATE_SLACK):
        read += 1
        ts = rec["timestamp"]  # canonical UTC text: compares as time
        units = cost_units(rec.get("total_cost")) or 0
        hit = False
        for dim, field_name, is_global, tag, lo_ts, hi_ts in plan:
            if not (lo_ts <= ts < hi_ts):
                continue
            if is_global:
                value: Any = "*"
            elif tag is not None:
                tags = rec.get("tags")
                value = tags.get(tag) if isinstance(tags, dict) else None
            else:
                value = rec.get(field_name) if field_name else None
            if not isinstance(value, str):
                continue
            acc = sums.get((dim, value))
            if acc is None:
                sums[(dim, value)] = [units, ts]
            else:
                acc[0] += units
                if ts > acc[1]:
                    acc[1] = ts
            hit = True
        counted += hit
    for (dim, value), (units, last) in sums.items():
        ledger.add_spent(dim, value, units, parse_timestamp(last), now)
    return read, counted


# --- `python -m proxy budgets` ------------------------------------------------------


def _load_sections(config_path: str) -> tuple[Any, Any]:
    """(auth, budgets) sections of config.yml, validated, without needing provider keys."""
    import yaml

    from .config import ConfigError
    from .keys import parse_auth

    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(config_path, "", "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(config_path, "", f"not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(config_path, "", "expected a mapping")
    return parse_auth(data.get("auth"), config_path), parse_budgets(data.get("budgets"), config_path)


def ledger_for(budgets: BudgetsConfig | None, auth: Any, clock: Callable[[], float] = time.time) -> BudgetLedger:
    """The ledger a proxy with this config keeps (per-key monthly spend too, with auth)."""
    extra = [("key", None, "monthly")] if auth is not None else []
    if budgets is None:
        return BudgetLedger((), clock=clock, extra_dims=extra)
    return BudgetLedger(budgets.limits, timezone=budgets.timezone, warn_at=budgets.warn_at, clock=clock, extra_dims=extra)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


@command("budgets", "each budget's limit, spend, remaining and reset time")
def budgets_main(argv: list[str]) -> int:
    from .config import ConfigError
    from .keys import KeyStore

    ap = argparse.ArgumentParser(prog="python -m proxy budgets",
                                 description="Each budget's limit, spend, remaining and reset time, from the log.")
    ap.add_argument("--config", default="config.yml")
    ap.add_argument("--log-file", default=None, help="JSONL log (default: $COST_TRACKING_FILE or logs/cost-tracking.jsonl)")
    ap.add_argument("--json", action="store_true", help="one JSON object per budget")
    args = ap.parse_args(argv)
    try:
        auth, budgets = _load_sections(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key_limits: list[Limit] = []
    if auth is not None:
        try:
            key_limits = KeyStore(auth.keys_file, auth.admin_hashes).budget_limits()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if budgets is None and not key_limits:
        print(f"{args.config} has no budgets (add a budgets: section; see docs/budgets.md)", file=sys.stderr)
        return 1
    ledger = ledger_for(budgets, auth)
    log_path = args.log_file or default_log_path()
    t0 = time.perf_counter()
    read, _ = replay_log(ledger, log_path)
    took = time.perf_counter() - t0
    states = ledger.states(key_limits)
    if args.json:
        import orjson

        from .records import json_default

        for s in states:
            sys.stdout.buffer.write(orjson.dumps({**s.as_dict(), "percent": round(s.fraction * 100, 1) if s.fraction != _INF else None},
                                                 default=json_default, option=orjson.OPT_APPEND_NEWLINE))
        return 0
    tz = ledger.tz
    rows = []
    for s in states:
        resets = datetime.fromtimestamp(s.end, tz).strftime("%Y-%m-%d %H:%M %Z") if s.end != _INF else "never (session)"
        pct = "-" if s.fraction == _INF else f"{s.fraction * 100:.0f}%"
        flag = "EXHAUSTED" if s.fraction >= 1 else ("warning" if s.fraction >= ledger.warn_at else "")
        rows.append([s.name, money(s.limit.units), money(s.spent), money(s.remaining), pct, resets, flag])
    print(_table(rows, ["BUDGET", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS", ""]))
    each = [lim for lim in (budgets.limits if budgets else ()) if lim.match is None and lim.scope != "global"]
    if each:
        scopes = "/".join(sorted({lim.scope for lim in each}))
        print(f"\n{len(each)} limit(s) apply to each {scopes} separately; only values with spend this period are listed.")
    print(f"(from {read} log records in {took:.2f}s; periods in {budgets.timezone if budgets else 'UTC'})", file=sys.stderr)
    return 0

