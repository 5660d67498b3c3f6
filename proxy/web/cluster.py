"""One worker of ``serve --workers N`` (docs/operations.md, "Several workers"): its
place among the workers, and the log follower that gives it every worker's records.

The workers share nothing but the log (and, for budgets, ``budgets.backend``). Each
counts its own calls as it makes them and the other workers' from the log
(``storage.follow``; its own lines, known by its record ids, are stepped over unparsed):
the 24-hour window behind ``/health``, the ``/metrics`` tally (from the moment the
workers started, the same point for all, so a restarted worker's counters agree with
the others'), ``/api/calls/{id}`` and the dashboard's change feed. A request to any of
those first reads what was appended since the last look, so it sees every call that
had its reply, whichever worker answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from proxy.core.records import record_id_prefix
from proxy.engine.replay import replay_records
from proxy.storage.follow import LogFollower, Record
from proxy.storage.redis_ledger import RedisLedger
from proxy.web.calls import UNKNOWN_PROVIDER
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")

# How often a worker reads the log without being asked: what the dashboard's live
# updates lag by at most. A look that finds nothing costs one pread.
FOLLOW_EVERY = 0.2


@dataclass(frozen=True, slots=True)
class WorkerRole:
    index: int  # 0 .. count-1; worker 0 also runs what must happen once (the daily summary email)
    count: int
    # (device, inode, size) of the log when the workers started: every worker's /metrics
    # counts from that point, so all answer the same whichever one a scrape reaches.
    log_start: tuple[int, int, int] | None = None


def open_follower(path: Path) -> LogFollower:
    """The follower, at the log's end: made before the window is loaded, which stops
    where it starts (``records_since(until=...)``), so no record is missed or twice."""
    return LogFollower(path, skip=own_lines())


def own_lines() -> bytes:
    """What this process's records hold, and no other's: its record id prefix, as the
    log writes the field."""
    return b'"record_id":"' + record_id_prefix().encode()


def window_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as the window counts it: calls to providers clients invent under one name."""
    return {**rec, "provider": UNKNOWN_PROVIDER} if rec.get("provider_type") == "unknown" else rec


def follow_log(app: web.Application, state: ProxyState, follower: LogFollower, role: WorkerRole) -> None:
    """Feed the window, the record sinks, the change feed and (in-process budgets) the
    ledger from the log, at start-up from ``role.log_start`` and then as it grows."""
    # Only an in-process ledger: a shared one (budgets.backend) sees every worker's calls.
    ledger = None if isinstance(state.budgets, RedisLedger) else state.budgets

    def take(batch: list[Record], window: bool) -> None:
        for rec, line in batch:
            if window:
                state.window.add(window_record(rec))
            state.publish(rec, line)
        if window and ledger is not None and ledger.dims:  # the start-up replay (not window) is in it already
            # In-process ledgers are one per worker; other workers' settled spend is added
            # as it appears (their calls in flight are not seen: budgets.backend does that).
            replay_records(ledger, [rec for rec, _ in batch], ledger.clock())
        if batch:
            state.changes.notify()

    def catch_up() -> None:
        take(follower.read(), True)

    state.follow = catch_up

    async def start(app: web.Application) -> None:
        start = role.log_start
        here = follower.position
        if start is not None and start[:2] == here[:2] and start[2] < here[2]:
            # Calls the other workers recorded since the workers started (this one was
            # restarted): the metrics count them; the window has them already.
            earlier = LogFollower(follower.path, start[2], start[:2], skip=follower.skip)
            try:
                take(earlier.read(until=here[2]), False)
            finally:
                earlier.close()
        app[_TICKER] = asyncio.get_running_loop().create_task(_tick(catch_up))

    async def stop(app: web.Application) -> None:
        task = app.get(_TICKER)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        follower.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


async def _tick(catch_up: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(FOLLOW_EVERY)
        t0 = time.perf_counter()
        try:
            catch_up()
        except Exception as e:  # a bad moment on disk must not end the following
            log.error("reading the shared log failed: %s", type(e).__name__)
        if time.perf_counter() - t0 > 1:
            log.warning("reading the shared log took %.1f s", time.perf_counter() - t0)


_TICKER = web.AppKey("lcp_follow_ticker", asyncio.Task)
