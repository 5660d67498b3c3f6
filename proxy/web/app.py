"""The aiohttp application: ``create_app`` builds the state, the start-up, shutdown and
clean-up hooks, and the routes."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

import aiohttp
from aiohttp import web

from proxy.config import Config, pricebook_for
from proxy.core.estimate import warm_up
from proxy.defaults import default_log_path
from proxy.engine.totals import RollingWindow
from proxy.storage.keyfile import KeyStore
from proxy.storage.logfiles import records_since
from proxy.storage.logwriter import JsonlWriter
from proxy.storage.orphan import end_helpers
from proxy.web.access import add_budget_headers, close_access, setup_access
from proxy.web.api import add_api_routes
from proxy.web.calls import UNKNOWN_PROVIDER
from proxy.web.cluster import WorkerRole, follow_log, open_follower
from proxy.web.dashboard import add_dashboard_routes, add_off_routes, off_reason
from proxy.web.forward import handle_proxy
from proxy.web.health import handle_health
from proxy.web.home import handle_home
from proxy.web.index_upkeep import setup_index_upkeep
from proxy.web.mailer import setup_email
from proxy.web.metrics import add_metrics_routes
from proxy.web.state import APP_STATE, ProxyState

log = logging.getLogger("proxy")


def shutdown_message(in_flight: int, timeout: float) -> str:
    """What SIGTERM logs: how many calls the proxy waits for, and for how long at most."""
    if in_flight == 0:
        return "shutting down: no calls in flight"
    calls = "1 call" if in_flight == 1 else f"{in_flight} calls"
    return f"shutting down: waiting up to {timeout:g} s for {calls} in flight"


def load_window(path: Path, window: RollingWindow, now: float, until: tuple[int, int, int] | None = None) -> int:
    """Rebuild the 24-hour window from the log so /health survives restarts (up to
    ``until``, where a log follower takes over)."""
    n = 0
    for rec in records_since(path, now - window.seconds, until=until):
        if rec.get("provider_type") == "unknown":
            rec = {**rec, "provider": UNKNOWN_PROVIDER}
        window.add(rec)
        n += 1
    return n


def create_app(
    config: Config,
    log_path: str | os.PathLike[str] | None = None,
    *,
    clock: Callable[[], float] = time.time,
    console: bool = True,
    host: str | None = None,
    role: WorkerRole | None = None,
) -> web.Application:
    """``clock`` (epoch seconds) drives budget periods; tests move it across boundaries.
    ``console``: print each call's cost line on stderr (the demo turns it off).
    ``host``: the address served, which decides whether the analytics API and dashboard
    are on without auth (loopback only, unless dashboard.public). ``role``: this
    process is one of ``serve --workers N`` (web/cluster.py)."""
    app = web.Application(client_max_size=config.max_body_mb * 1024 * 1024)
    path = Path(log_path or default_log_path())
    window = RollingWindow()
    # A broken keys file stops start-up (ConfigError) before anything is created on disk.
    keys = KeyStore(config.auth.keys_file, config.auth.admin_hashes) if config.auth is not None else None
    writer = follower = None
    if config.cost_tracking:
        if role is None:
            load_window(path, window, time.time())
            writer = JsonlWriter(path, console_fd=2 if console else None)
        else:
            # The log exists before the follower opens it, which it does before the
            # window is loaded: the window ends where the follower starts.
            writer = JsonlWriter(path, console_fd=2 if console else None)
            follower = open_follower(path)
            load_window(path, window, time.time(), follower.position)
    state = ProxyState(config, pricebook_for(config), writer, window, warned_unpriced=set(), keys=keys)
    app[APP_STATE] = state
    setup_access(state, path, clock, follower.position if follower is not None else None)
    setup_email(app, state, path, clock, summary=role is None or role.index == 0)
    if role is None or role.index == 0:  # one worker keeps the index: the others would find it locked
        setup_index_upkeep(app, state, path)  # the roll-up index kept current (web/index_upkeep.py)
    if state.budgets is not None:  # a signal per response costs; only when there are budgets
        app.on_response_prepare.append(add_budget_headers)

    async def on_startup(app: web.Application) -> None:
        # The tokenizer's vocabulary takes ~1 s and ~140 MB to load, holding the
        # interpreter meanwhile: load it before listening rather than stall live calls.
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.read_timeout),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    # Calls being handled (a stream until its last byte), for the shutdown message.
    in_flight = 0

    async def counted(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight
        in_flight += 1
        try:
            return await handle_proxy(request)
        finally:
            in_flight -= 1

    async def on_shutdown(app: web.Application) -> None:
        # aiohttp has stopped listening; next it waits up to shutdown_timeout for these.
        state.shutting_down = True
        state.changes.close()  # open dashboards' event streams end
        log.info("%s", shutdown_message(in_flight, config.shutdown_timeout))

    async def on_cleanup(app: web.Application) -> None:
        state.shutdown_pool()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=3)  # webhook posts time out after 2 s
        if state.session is not None:
            await state.session.close()
        await close_access(state)  # a shared ledger sends the settles it has queued
        if state.writer is not None:
            # Runs after in-flight calls finished: every record is on disk.
            await asyncio.get_running_loop().run_in_executor(None, state.writer.close)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/", handle_home)  # and HEAD
    app.router.add_get("/health", handle_health)
    add_metrics_routes(app, state)
    if follower is not None and role is not None:
        follow_log(app, state, follower, role)
    off = off_reason(config.dashboard, config.auth is not None, config.dashboard_public, host)
    if off is None:
        add_api_routes(app, state, path)
        add_dashboard_routes(app)
    else:
        if config.dashboard:
            log.warning("analytics API and dashboard off: %s", off)
        add_off_routes(app, off)

    async def end_helper_processes(app: web.Application) -> None:
        # Last of the clean-up hooks (the pools were told to stop by theirs).
        await asyncio.get_running_loop().run_in_executor(None, end_helpers, 3.0)

    app.on_cleanup.append(end_helper_processes)
    # [\s\S], not ".": a path with an encoded line break (%0A) is a call like any other.
    app.router.add_route("*", r"/{provider}/{tail:[\s\S]*}", counted)
    return app


def run_app(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop | None,
    host: str | None = None,
    port: int | None = None,
    sockets: Sequence[socket.socket] | None = None,
    shutdown_timeout: float,
) -> None:
    """Serve until SIGINT/SIGTERM, on ``sockets`` already listening (serve binds them
    first) or else on ``host:port``. handler_cancellation: a client that leaves cancels
    its call (recorded as 499); no access log, no banner (cli logs its own)."""
    tune_gc()
    web.run_app(
        app,
        loop=loop,
        host=host,
        port=port,
        sock=list(sockets) if sockets else None,
        shutdown_timeout=shutdown_timeout,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )


# Young objects a collection waits for (CPython's default: 700).
GC_YOUNG = 10_000


def tune_gc() -> None:
    """Garbage collection for a server (``run_app`` only: an app run in-process, as most
    tests run it, keeps CPython's defaults). Everything built before serving (modules,
    config, prices) lives as long as the process: frozen, no collection walks it again
    (a full collection took ~40 ms, every few thousand calls). A call makes a few hundred
    objects, nearly all freed when it ends: with the default 700 a young collection ran
    every call or two, walking the objects of the calls in flight. Collections were ~5 %
    of the proxy's CPU time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
