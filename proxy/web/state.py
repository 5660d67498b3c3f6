"""The proxy's shared state (``ProxyState``) and the app key it is kept under."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

from proxy.budgets import BudgetLedger, BudgetState
from proxy.config import Config
from proxy.engine.totals import RollingWindow
from proxy.pricing import PriceBook
from proxy.storage.keyfile import KeyStore
from proxy.storage.logwriter import JsonlWriter
from proxy.storage.orphan import exit_with_parent
from proxy.web.events import Changes

log = logging.getLogger("proxy")


@dataclass(slots=True)
class ProxyState:
    config: Config
    prices: PriceBook
    writer: JsonlWriter | None
    window: RollingWindow
    session: aiohttp.ClientSession | None = None
    warned_unpriced: set[tuple[str, str]] | None = None
    keys: KeyStore | None = None  # with auth: configured
    budgets: BudgetLedger | None = None  # with budgets: or auth: configured
    tasks: set[asyncio.Task[None]] | None = None  # webhook posts in flight
    shutting_down: bool = False  # set at SIGTERM: calls cut from here on were cut by us
    # With serve --workers N: take in the records the other workers appended to the log
    # since the last look (web/cluster.py). Called by whatever answers from the counts
    # (/health, /metrics, /api/calls), so the answer is all workers'.
    follow: Callable[[], None] | None = None
    changes: Changes = field(default_factory=Changes)  # records written, for /api/events
    # Each record and its line as handed to the writer (metrics, /api/calls/{id}); each must be
    # cheap and must not raise: it runs on the call's own path.
    record_sinks: list[Callable[[dict[str, Any], bytes], None]] = field(default_factory=list)
    # Budget alerts ("warning" or "limit", the budget's state), once per budget and period.
    alert_sinks: list[Callable[[str, BudgetState], None]] = field(default_factory=list)
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def publish(self, record: dict[str, Any], line: bytes) -> None:
        """Hand a record just given to the writer to every record sink; a sink that fails
        is logged, never felt by the call (or the POST) that made the record."""
        for sink in self.record_sinks:
            try:
                sink(record, line)
            except Exception as e:
                log.error("record sink %s failed: %s", getattr(sink, "__qualname__", "?"), type(e).__name__)

    def body_pool(self) -> ProcessPoolExecutor:
        """One worker process for digesting huge request bodies, started on first need."""
        if self._pool is None:
            # spawn: a fork of a process with threads (the log writer) is not safe.
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
            )
        return self._pool

    def shutdown_pool(self) -> None:
        """Stop the body digest worker, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


APP_STATE = web.AppKey("proxy_state", ProxyState)
