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

import logging
import math
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from proxy.core.money import format_usd, units_to_usd
from proxy.core.periods import iso, period_bounds

log = logging.getLogger("proxy")

SCOPES = ("global", "user", "team", "tag", "key", "session")
PERIODS = ("daily", "weekly", "monthly")
# A session budget has no calendar period; a session's spend is kept while it is in
# use and rebuilt at start-up from this far back (it is forgotten after this long idle).
SESSION_WINDOW = 31 * 86400
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
        """One budget: the limit applied to one value (``user:bob daily``). A limit for
        each value, applied to one, says so (``user:bob daily (each user)``): beside a
        limit set for bob alone, two budgets are never shown under one name."""
        head = self.scope
        if self.scope == "tag":
            head += f":{self.tag}" + (f"={value}" if value is not None else "")
        elif self.scope != "global" and value is not None:
            head += f":{value}"
        name = f"{head} {self.period}" if self.period else head
        if value is not None and self.match is None and self.scope != "global":
            name += f" (each {self.tag if self.scope == 'tag' else self.scope})"
        return name


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
    # Where the ledger lives: "memory" (this process) or a redis://, rediss:// or unix://
    # URL (storage/redis_ledger.py: shared by workers and replicas). Never shown: the
    # URL may hold a password.
    backend: str = field(default="memory", repr=False)
    on_backend_error: str = "refuse"  # or "allow": budgeted calls pass unchecked while Redis is down
    backend_timeout: float = 0.5  # seconds, to connect to Redis and for each answer
    redis_prefix: str = "llm-cost-proxy"  # every key the ledger keeps in Redis starts with it


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
    new_limit: BudgetState | None = None  # the refusing budget, when it first refuses a call this period
    tightest: BudgetState | None = None  # least remaining of the applicable budgets

    @property
    def allowed(self) -> bool:
        return self.hold is not None


def least_headroom(states: Iterable[BudgetState]) -> BudgetState | None:
    """The budget with the least headroom; of equals, the one that resets first (then
    the first given)."""
    return min(states, key=lambda s: (s.limit.units - s.used, s.end), default=None)


def backend_address(url: str) -> str:
    """Where a ``budgets.backend`` URL points, fit for a log line or an error: host and
    port, or the socket's path; never the user name or password it may carry."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "?"
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    return f"[{host}]:{port or 6379}" if ":" in host else f"{host}:{port or 6379}"


def refusal_message(state: BudgetState, worst: int) -> str:
    limit = state.limit
    resets = f"resets at {iso(state.end)}" if state.end != _INF else "does not reset (session budget)"
    return (
        f"Budget exceeded: {state.name} has a limit of {format_usd(limit.units, exact=True)} and "
        f"{format_usd(state.spent, exact=True)} is spent"
        + (f" (+{format_usd(state.reserved, exact=True)} held by calls in progress)" if state.reserved else "")
        + f"; this call may cost up to {format_usd(worst, exact=True)}. The budget {resets}."
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
        self._limited: set[tuple[Limit, str | None, float]] = set()  # budgets that refused a call this period
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

    def empty_copy(self) -> BudgetLedger:
        """A ledger with the same limits, dimensions, zone and clock, and no spend (to
        rebuild a ledger kept elsewhere from the log)."""
        return BudgetLedger(self.limits, timezone=self.tz.key, warn_at=self.warn_at, clock=self.clock, extra_dims=self.dims)

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

    def applicable(self, subject: Subject, limits: Sequence[Limit]) -> Iterator[tuple[Limit, str]]:
        """The limits that apply to ``subject``, each with the value it is counted under."""
        for limit in limits:
            value = subject.value(limit.scope, limit.tag)
            if value is not None and (limit.match is None or limit.match == value):
                yield limit, value

    def reserved_on(self, subject: Subject, extra_limits: Sequence[Limit] = ()) -> list[tuple[tuple[str, str | None, str | None], str]]:
        """The counters a call reserves on, (dimension, value): every tracked dimension
        the subject has a value for (so a limit added later starts from the true spend)
        and the dimensions of any extra (per-key) limits."""
        out: list[tuple[tuple[str, str | None, str | None], str]] = []
        seen: set[tuple[str, str | None, str | None]] = set()
        for dim in (*self.dims, *(lim.dim for lim in extra_limits)):
            if dim in seen:
                continue
            seen.add(dim)
            value = subject.value(dim[0], dim[1])
            if value is not None:
                out.append((dim, value))
        return out

    # -- the hot path: synchronous, so check + reserve is atomic under asyncio --

    def reserve(self, subject: Subject, worst: int, extra_limits: Sequence[Limit] = (), override: bool = False) -> Decision:
        """Check every applicable budget and, unless one would be crossed (and no
        override), reserve ``worst`` units against all of them, in one step."""
        now = self.clock()
        if now >= self._next_prune:
            self.prune(now)
        limits = self.limits + tuple(extra_limits) if extra_limits else self.limits
        checks = [self._state(limit, value, now) for limit, value in self.applicable(subject, limits)]
        decision = Decision(worst=max(0, worst))
        worst = decision.worst
        # Refused if this call could cross the limit, or the limit is already reached
        # (so a call of unknown price cannot slip past an exhausted budget).
        blocking = [s for s in checks if s.used + worst > s.limit.units or s.used >= s.limit.units]
        if blocking:
            decision.refused = refused = least_headroom(blocking)
            assert refused is not None
            if not override:
                # Announced once per period, and only for a call really refused (an
                # override lets it through: nothing was refused).
                mark = (refused.limit, refused.value, refused.start)
                if mark not in self._limited:
                    self._limited.add(mark)
                    decision.new_limit = refused
                return decision
            decision.overridden = True
        counters: list[Counter] = []
        for dim, value in self.reserved_on(subject, extra_limits):
            c = self._counter(dim, value, now)
            c.reserved += worst
            c.last = now
            counters.append(c)
        decision.hold = Hold(counters, worst)
        after = [self._state(s.limit, s.value, now) for s in checks]  # type: ignore[arg-type]
        decision.tightest = least_headroom(after)
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

    def count(self, subject: Subject, units: int | None) -> None:
        """Add the cost of a call made elsewhere (``POST /api/usage``) to its counters."""
        self.settle(self.reserve(subject, 0, (), True).hold, units)

    # -- start-up and reports --

    def add_spent(self, dim: tuple[str, str | None, str | None], value: str, units: int, last: float, now: float) -> None:
        """Count logged spend towards the current period of ``dim`` (start-up)."""
        c = self._counter(dim, value, now, at=last)
        c.spent += units
        c.last = max(c.last, last)

    def prune(self, now: float) -> None:
        """Forget ended periods and idle sessions (never while a call holds a reservation)."""
        self._next_prune = now + _PRUNE_EVERY
        dead = [
            k for k, c in self.counters.items() if c.reserved == 0 and (c.end <= now or (c.end == _INF and c.last < now - SESSION_WINDOW))
        ]
        for k in dead:
            del self.counters[k]
        self._warned = {m for m in self._warned if m[2] >= self.bounds(m[0].period, now)[0]}
        self._limited = {m for m in self._limited if m[2] >= self.bounds(m[0].period, now)[0]}

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


# --- the ledger a proxy keeps ----------------------------------------------------------


def ledger_for(budgets: BudgetsConfig | None, *, per_key: bool, clock: Callable[[], float] = time.time) -> BudgetLedger:
    """The ledger a proxy with this config keeps; ``per_key`` (with auth:) tracks each
    proxy key's monthly spend too, for its budget_monthly."""
    extra = [("key", None, "monthly")] if per_key else []
    if budgets is None:
        return BudgetLedger((), clock=clock, extra_dims=extra)
    return BudgetLedger(budgets.limits, timezone=budgets.timezone, warn_at=budgets.warn_at, clock=clock, extra_dims=extra)
