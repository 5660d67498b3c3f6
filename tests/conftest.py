"""Fixtures for the end-to-end tests: a mock upstream and the real proxy, both on
127.0.0.1, the proxy run the way ``python -m proxy`` runs it (handler_cancellation).
The helpers behind them are in tests/support/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, parse_config
from proxy.web.app import create_app
from tests.support.config import make_config
from tests.support.inproc import ProxyHandle
from tests.support.mock_upstream import MockUpstream


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    m = await MockUpstream().start()
    yield m
    await m.close()


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    handles: list[ProxyHandle] = []

    async def start(
        config: dict | Config, log_path: Path | None = None, clock: Any = time.time, config_path: str = "test-config.yml"
    ) -> ProxyHandle:
        """``clock`` drives budget periods; ``config_path`` anchors relative paths (keys file)."""
        cfg = config if isinstance(config, Config) else parse_config(config, config_path)
        path = log_path or tmp_path / f"cost-{len(handles)}.jsonl"
        app = create_app(cfg, path, clock=clock)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        handle = ProxyHandle(runner, f"http://127.0.0.1:{port}", path)
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        await h.stop()


@pytest.fixture
async def proxy(mock: MockUpstream, start_proxy) -> ProxyHandle:
    """The proxy in front of ``mock`` with the standard test config."""
    return await start_proxy(make_config(mock.url))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s
