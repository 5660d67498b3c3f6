"""The budget ledger kept in Redis (``budgets.backend: redis://…``), shared by the
workers of ``serve --workers N`` and by replicas on other machines.

``RedisLedger`` is a ``BudgetLedger`` in everything but where the counters live: the
same limits, dimensions, calendar periods, names and states. Its check-and-reserve is
one Lua script (``storage/redis_scripts.py``), awaited (``reserve_shared``): Redis runs
one script at a time, so racing calls on any worker or machine cannot share headroom.
A settle is queued and sent by a task (``settle`` is called where nothing may wait);
while Redis is unreachable the queue keeps them, bounded, and sends them when it
answers again. The counters this object holds are a copy of Redis's, refreshed every
few seconds and on request (``refresh``), for readers that cannot wait (``/metrics``).

A reservation has an id and a deadline: one left by a worker that died is released
by the first reserve after its deadline. A Redis that lost its data (restarted
without persistence) is noticed by the next reserve, which rebuilds from the log.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from proxy.budgets import (
    SESSION_WINDOW,
    BudgetLedger,
    BudgetsConfig,
    BudgetState,
    Counter,
    Decision,
    Hold,
    Limit,
    Subject,
    backend_address,
    least_headroom,
)
from proxy.storage.redis_scripts import REBUILD, RESERVE, SETTLE
from proxy.storage.replay import replay_log

log = logging.getLogger("proxy")

Dim = tuple[str, "str | None", "str | None"]
# A reservation its worker never settled (the worker died) is released after this long.
# Longer than any call: a hold released early only makes the budget laxer for a while.
HOLD_SECONDS = 3600.0
MIRROR_EVERY = 5.0  # how stale /metrics' budget figures may be
# After a failure, Redis is not asked again for this long: calls meanwhile get their
# answer (503, or through) at once instead of each waiting for a timeout.
DOWN_FOR = 1.0
MAX_PENDING = 100_000  # settles kept while Redis is down; beyond, the oldest are dropped
# A settle queued this long before a rebuild from the log is in what the rebuild read
# (the record is written as the settle is queued): its cost is not added again.
REBUILT_MARGIN_MS = 2000
_WINDOW_MS = SESSION_WINDOW * 1000
_NO_END_MS = 2**53  # a session budget's "period end", for ties only


class LedgerUnreachable(Exception):
    """Redis did not answer, or not in time. ``budgeted``: a limit applies to the call
    (else it may go ahead whatever the mode); ``hold``: the call's counters, to count
    its cost on once Redis answers, if it goes ahead."""

    def __init__(self, address: str, cause: str, budgeted: bool = True, hold: SharedHold | None = None, sent: bool = False) -> None:
        super().__init__(f"budget ledger at {address} unreachable ({cause})")
        self.address, self.cause, self.budgeted, self.hold = address, cause, budgeted, hold
        self.sent = sent  # the command went out and its answer did not come: it may have run


@dataclass(slots=True)
class SharedHold(Hold):
    """A reservation in Redis: its id ("": nothing reserved, the settle only adds the
    cost) and the counters it is on: hash key, value and period end of each."""

    id: str = ""
    keys: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    ends: tuple[float, ...] = ()
    dims: tuple[str, ...] = ()  # dimension names, as ``built`` knows them


class Throttle:
    """At most one log line per ``seconds`` for a recurring condition; ``due()`` says
    whether to log now, and how many were held back since the last line."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds, self.next, self.held = seconds, 0.0, 0

    def due(self) -> int | None:
        now = time.monotonic()
        if now < self.next:
            self.held += 1
            return None
        self.next = now + self.seconds
        held, self.held = self.held, 0
        return held


def dim_name(dim: Dim) -> str:
    return f"{dim[0]}:{dim[1] or ''}:{dim[2] or ''}"


def limit_mark(limit: Limit) -> str:
    """What tells one limit from another on the same dimension, in the once-per-period
    marks (a limit changed in config.yml is a new one, announced again)."""
    return f"{limit.units}:{limit.source}:{'one' if limit.match is not None else 'each'}"


def _ms(t: float) -> int:
    return round(t * 1000)


def _ttl_ms(end: float, now: float) -> int:
    """Relative expiry from the proxy's clock (never an absolute time: the proxy's clock
    need not be Redis's). A session counter lives a session window past its last use.
    0: the period is over."""
    if end == math.inf:
        return _WINDOW_MS
    return max(0, math.ceil((end - now) * 1000))


class RedisLedger(BudgetLedger):
    def __init__(
        self, base: BudgetLedger, config: BudgetsConfig, log_path: str | os.PathLike[str], hold_seconds: float = HOLD_SECONDS
    ) -> None:
        super().__init__(base.limits, timezone=base.tz.key, warn_at=base.warn_at, clock=base.clock, extra_dims=base.dims)
        self._url = config.backend  # may hold a password: never logged, never shown
        self.address = backend_address(config.backend)
        self.prefix = config.redis_prefix
        self.timeout = config.backend_timeout
        self.log_path = Path(log_path)
        self.hold_seconds = hold_seconds
        self.built_key, self.holds_key, self.info_key = f"{self.prefix}:built", f"{self.prefix}:holds", f"{self.prefix}:hold"
        self.unreachable_log = Throttle()  # for the shell's line about calls refused or let through
        self.refreshed_at: float | None = None  # the proxy's clock at the last copy of Redis's counters
        self._client: aredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        # (hold, cost, when queued, token): the token makes a settle sent twice (its answer
        # lost to a timeout, so sent again) count once.
        self._pending: collections.deque[tuple[SharedHold, int, float, str]] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self._mirror: asyncio.Task[None] | None = None
        self._rebuilding: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._cause = ""
        self._errors = Throttle()
        self._dropped = 0

    # -- keys --

    def counter_key(self, dim: Dim, end: float) -> str:
        """The hash of one dimension's counters in the period ending at ``end``."""
        return f"{self.prefix}:c:{dim_name(dim)}:{0 if end == math.inf else _ms(end)}"

    def _counters_of(self, on: Sequence[tuple[Dim, str]], now: float) -> tuple[list[tuple[float, float]], SharedHold]:
        bounds = [self.bounds(dim[2], now) for dim, _ in on]
        hold = SharedHold(
            [],
            0,
            keys=tuple(self.counter_key(dim, end) for (dim, _), (_, end) in zip(on, bounds)),
            values=tuple(value for _, value in on),
            ends=tuple(end for _, end in bounds),
            dims=tuple(dim_name(dim) for dim, _ in on),
        )
        return bounds, hold

    # -- the connection --

    def _connect(self) -> aredis.Redis:
        if self._client is None:
            t = self.timeout
            pool = aredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=64,
                timeout=t,  # waiting for a free connection
                socket_timeout=t,
                socket_connect_timeout=t,
                # Once, on a broken connection only (a pooled one Redis closed when it
                # restarted); never on a timeout, which would double the wait.
                retry=AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                encoding_errors="surrogatepass",  # any str a client sends is a value
            )
            self._client = aredis.Redis.from_pool(pool)
            for name, text in (("reserve", RESERVE), ("settle", SETTLE), ("rebuild", REBUILD)):
                self._scripts[name] = self._client.register_script(text)
            self._mirror = asyncio.get_running_loop().create_task(self._mirror_loop())
        return self._client

    async def _guard(self, op: Callable[[], Awaitable[Any]], budgeted: bool = True, hold: SharedHold | None = None) -> Any:
        """Run one Redis operation, bounded in time; any failure is ``LedgerUnreachable``
        (and Redis is left alone for ``DOWN_FOR``)."""
        self._connect()
        if time.monotonic() < self._down_until:
            raise LedgerUnreachable(self.address, self._cause, budgeted, hold)
        try:
            # A connect (or reconnect) and the answer, each within the timeout.
            return await asyncio.wait_for(op(), 2 * self.timeout + 0.1)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._down_until = time.monotonic() + DOWN_FOR
            self._cause = f"Redis answered {str(e)[:120]}" if isinstance(e, ResponseError) else type(e).__name__
            held = self._errors.due()
            if held is not None:
                more = f" ({held} more failures since the last line)" if held else ""
                log.warning("budgets: the ledger at %s failed: %s%s", self.address, self._cause, more)
            sent = isinstance(e, (asyncio.TimeoutError, RedisTimeoutError))
            raise LedgerUnreachable(self.address, self._cause, budgeted, hold, sent) from None

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence[Any], budgeted: bool = True, hold: SharedHold | None = None
    ) -> Any:
        return await self._guard(lambda: self._scripts[name](keys=keys, args=args, client=self._client), budgeted, hold)

    # -- check and reserve --

    def reserve(self, subject: Subject, worst: int, extra_limits: Sequence[Limit] = (), override: bool = False) -> Decision:
        """Not here: the check runs in Redis (``await reserve_shared``)."""
        raise TypeError("a RedisLedger checks in Redis: await reserve_shared()")

    async def reserve_shared(self, subject: Subject, worst: int, extra_limits: Sequence[Limit] = (), override: bool = False) -> Decision:
        """``BudgetLedger.reserve``'s decision, made by the reserve script in one step
        in Redis. Raises ``LedgerUnreachable``.

        Shielded: a call cancelled meanwhile (its client left) gets its reservation
        released as soon as the script answers. One whose worker dies first keeps it
        until its deadline (``hold_seconds``), when the next reserve releases it."""
        task = asyncio.ensure_future(self._reserve(subject, max(0, worst), tuple(extra_limits), override))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, task: asyncio.Future[Decision]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.settle(task.result().hold, 0)

    async def _reserve(self, subject: Subject, worst: int, extra_limits: tuple[Limit, ...], override: bool) -> Decision:
        now = self.clock()
        checks = list(self.applicable(subject, self.limits + extra_limits))
        on = self.reserved_on(subject, extra_limits)
        bounds, spend_only = self._counters_of(on, now)
        decision = Decision(worst=worst)
        if not on:  # nothing tracked for this call: nothing to ask Redis
            decision.hold = spend_only
            return decision
        index = {dim: i for i, (dim, _) in enumerate(on, 1)}
        hold_id = os.urandom(9).hex()
        args: list[Any] = [_ms(now), worst, int(override), repr(self.warn_at), hold_id, _ms(now + self.hold_seconds)]
        args += [len(on), len(checks), _WINDOW_MS]
        for (dim, value), (_, end) in zip(on, bounds):
            args += [value, _ttl_ms(end, now), int(dim[2] is None), dim_name(dim)]
        for limit, _ in checks:
            end = bounds[index[limit.dim] - 1][1]
            args += [index[limit.dim], limit.units, limit_mark(limit), _NO_END_MS if end == math.inf else _ms(end)]
        keys = [self.built_key, self.holds_key, self.info_key, *spend_only.keys]
        budgeted = bool(checks)
        try:
            reply = await self._script("reserve", keys, args, budgeted, spend_only)
            if reply[0] == -1:  # Redis has lost (or never had) these counters
                await self.rebuild(budgeted, spend_only)
                reply = await self._script("reserve", keys, args, budgeted, spend_only)
                if reply[0] == -1:
                    raise LedgerUnreachable(self.address, "its counters vanish as they are rebuilt", budgeted, spend_only)
        except LedgerUnreachable as e:
            if e.sent and worst:  # the script may have run, its answer lost: release the hold it made, if any
                self.settle(replace(spend_only, units=worst, id=hold_id), 0)
            raise

        def state(i: int, spent: bytes, reserved: bytes) -> BudgetState:
            limit, value = checks[i]
            start, end = bounds[index[limit.dim] - 1]
            return BudgetState(limit, value, int(spent), int(reserved), start, end)

        status, refused = int(reply[0]), int(reply[1])
        if refused:
            decision.refused = state(refused - 1, reply[3], reply[4])
        if status == 1:
            decision.new_limit = decision.refused if int(reply[2]) else None
            return decision
        decision.overridden = status == 2
        after, warn = [], []
        for i in range(len(checks)):
            s, r, is_warning, is_new = reply[5 + 4 * i : 9 + 4 * i]
            after.append(state(i, s, r))
            if int(is_warning):
                warn.append((after[-1], bool(int(is_new))))
        warn.sort(key=lambda w: -w[0].fraction)  # stable: as BudgetLedger orders them
        decision.warnings = [s for s, _ in warn]
        decision.new_warnings = [s for s, new in warn if new]
        decision.tightest = least_headroom(after)
        spend_only.units = worst
        spend_only.id = hold_id if worst else ""
        decision.hold = spend_only
        return decision

    # -- settle --

    def settle(self, hold: Hold | None, actual: int | None) -> None:
        """Release the reservation and add the real cost, in Redis, soon: queued, and
        kept while Redis is down (the oldest dropped beyond ``MAX_PENDING``)."""
        if not isinstance(hold, SharedHold):
            super().settle(hold, actual)
            return
        if hold.settled:
            return
        hold.settled = True
        real = max(0, actual or 0)
        if not hold.keys or (not hold.id and not real):
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1
            if self._errors.due() is not None:
                log.error(
                    "budgets: %d settled costs dropped unsent (the ledger at %s is down): spend is undercounted",
                    self._dropped,
                    self.address,
                )
        self._pending.append((hold, real, self.clock(), f"{self.prefix}:settled:{os.urandom(9).hex()}"))
        self._kick()

    def count(self, subject: Subject, units: int | None) -> None:
        """Add the cost of a call made elsewhere (``POST /api/usage``), soon."""
        _, hold = self._counters_of(self.reserved_on(subject), self.clock())
        self.settle(hold, units)

    def _kick(self) -> asyncio.Task[None] | None:
        if self._drainer is None or self._drainer.done():
            try:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            except RuntimeError:  # no loop running: the next flush sends them
                return None
        return self._drainer

    async def _drain(self) -> None:
        delay, answered = 0.05, 0
        while self._pending:
            hold, real, queued, token = self._pending[0]
            now = self.clock()
            args: list[Any] = [hold.id, real, _ms(now), _WINDOW_MS, _ms(queued), REBUILT_MARGIN_MS]
            for value, end, dim in zip(hold.values, hold.ends, hold.dims):
                args += [value, _ttl_ms(end, now), int(end == math.inf), dim]
            args += [token, _ms(self.hold_seconds)]
            try:
                await self._script("settle", [self.holds_key, self.info_key, self.built_key, *hold.keys], args)
            except LedgerUnreachable as e:
                if e.cause.startswith("Redis answered"):
                    answered += 1
                    if answered >= 3:  # Redis refuses this one itself: not a passing outage
                        self._pending.popleft()
                        log.error("budgets: a settled cost was dropped: %s", e.cause)
                        answered = 0
                        continue
                await asyncio.sleep(max(delay, self._down_until - time.monotonic()))
                delay = min(2 * delay, 2.0)
                continue
            self._pending.popleft()
            delay, answered = 0.05, 0

    async def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every queued settle is in Redis (True), or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._pending:
            task = self._kick()
            left = deadline - time.monotonic()
            if task is None or left <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(task), left)
            except asyncio.TimeoutError:
                return False
        return True

    # -- reading --

    async def refresh(self) -> None:
        """Copy Redis's current counters into this ledger (``states``, ``summary``).
        Raises ``LedgerUnreachable``."""
        now = self.clock()
        plan = [(dim, *self.bounds(dim[2], now)) for dim in self.dims]

        async def read() -> list[Any]:
            assert self._client is not None
            async with self._client.pipeline(transaction=False) as pipe:
                for dim, _, end in plan:
                    pipe.hgetall(self.counter_key(dim, end))
                return list(await pipe.execute())

        results = await self._guard(read)
        counters: dict[tuple[str, str | None, str | None, str, float], Counter] = {}
        for (dim, start, end), fields in zip(plan, results):
            for f, v in fields.items():
                kind = f[:2]
                if kind not in (b"s:", b"r:"):
                    continue  # the once-per-period marks
                key = (dim[0], dim[1], dim[2], f[2:].decode("utf-8", "surrogatepass"), start)
                c = counters.get(key)
                if c is None:
                    c = counters[key] = Counter(start, end, last=now)
                if kind == b"s:":
                    c.spent = int(v)
                else:
                    c.reserved = int(v)
        self.counters = counters
        self.refreshed_at = now

    async def _mirror_loop(self) -> None:
        while True:
            await asyncio.sleep(MIRROR_EVERY)
            try:
                await self.refresh()
            except LedgerUnreachable:
                pass  # logged by _guard; /metrics shows the last copy

    # -- rebuilt from the log --

    def _replayed(self, now: float) -> tuple[BudgetLedger, int]:
        fresh = self.empty_copy()
        _, counted = replay_log(fresh, self.log_path, now)
        return fresh, counted

    def _rebuild_args(self, fresh: BudgetLedger, now: float) -> tuple[list[str], list[Any]]:
        dims = list(self.dims)
        index = {dim: i for i, dim in enumerate(dims, 1)}
        ends = [self.bounds(dim[2], now)[1] for dim in dims]
        keys = [self.built_key, *(self.counter_key(dim, end) for dim, end in zip(dims, ends))]
        args: list[Any] = [_ms(now), _WINDOW_MS]
        for dim, end in zip(dims, ends):
            args += [dim_name(dim), _ttl_ms(end, now), int(dim[2] is None)]
        for (scope, tag, period, value, _), c in fresh.counters.items():
            i = index.get((scope, tag, period))
            if i is not None and c.spent > 0:
                args += [i, value, c.spent, _ms(c.last)]
        return keys, args

    async def rebuild(self, budgeted: bool = True, hold: SharedHold | None = None) -> None:
        """Refill Redis from the log (the dimensions it lacks), once per worker at a time."""
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild_once())
        try:
            await asyncio.shield(self._rebuilding)
        except LedgerUnreachable as e:
            raise LedgerUnreachable(self.address, e.cause, budgeted, hold) from None

    async def _rebuild_once(self) -> None:
        now, t0 = self.clock(), time.perf_counter()
        try:
            fresh, counted = await asyncio.to_thread(self._replayed, now)
        except (OSError, ValueError) as e:
            log.error("budgets: rebuilding the ledger at %s from the log failed: %s", self.address, type(e).__name__)
            raise LedgerUnreachable(self.address, "rebuild from the log failed") from None
        keys, args = self._rebuild_args(fresh, now)
        done = await self._script("rebuild", keys, args)
        if done:
            log.warning(
                "budgets: the ledger at %s had no counters (new, or emptied); rebuilt from %d records of the log in %.2fs",
                self.address,
                counted,
                time.perf_counter() - t0,
            )

    def start_sync(self) -> int | None:
        """At start-up, before serving (blocking, as the in-process ledger's replay is):
        rebuild Redis from the log if it lacks any dimension. The records counted, or
        None when there was nothing to do or Redis did not answer (the first reserve
        then rebuilds)."""
        if not self.dims:
            return None
        t = self.timeout
        client = redis.Redis.from_url(
            self._url, socket_timeout=t, socket_connect_timeout=t, retry=Retry(NoBackoff(), 0), encoding_errors="surrogatepass"
        )
        try:
            built = client.hmget(self.built_key, [dim_name(dim) for dim in self.dims])
            if all(built):
                return None
            now = self.clock()
            fresh, counted = self._replayed(now)
            keys, args = self._rebuild_args(fresh, now)
            client.eval(REBUILD, len(keys), *keys, *args)
            return counted
        except (RedisError, OSError) as e:
            log.warning("budgets: the ledger at %s is unreachable at start-up (%s)", self.address, type(e).__name__)
            return None
        finally:
            client.close()

    async def close(self) -> None:
        """Send what is queued (2 s at most), stop the tasks, close the connections."""
        if self._pending and not await self.flush(2.0):
            log.error("budgets: %d settled costs not sent to the ledger at %s before shutdown", len(self._pending), self.address)
        tasks = [t for t in (self._drainer, self._mirror, self._rebuilding) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
