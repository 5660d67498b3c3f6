"""The proxy's shared state (``ProxyState``) and the app key it is kept under."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.budgets import BudgetLedger
from proxy.config import Config
from proxy.engine.totals import RollingWindow
from proxy.pricing import PriceBook
from proxy.storage.keyfile import KeyStore
from proxy.storage.logwriter import JsonlWriter
from proxy.web.events import Changes


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
    changes: Changes = field(default_factory=Changes)  # records written, for /api/events
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def body_pool(self) -> ProcessPoolExecutor:
        """One worker process for digesting huge request bodies, started on first need."""
        if self._pool is None:
            # spawn: a fork of a process with threads (the log writer) is not safe.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def shutdown_pool(self) -> None:
        """Stop the body digest worker, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


APP_STATE = web.AppKey("proxy_state", ProxyState)
