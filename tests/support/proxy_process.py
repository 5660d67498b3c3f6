"""The proxy run as its own process (``python -m proxy``), as the CLI tests, the SIGKILL
test and bench/ run it: its command line, and waiting until it (or any server) serves."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

from tests.support.ports import HOST


def proxy_command(
    config: Path | str,
    port: int | None = None,
    *,
    host: str | None = None,
    log_file: Path | str | None = None,
    python: Sequence[str] = (sys.executable,),
) -> list[str]:
    """``python -m proxy --config CONFIG [--host HOST] [--port PORT] [--log-file LOG]``;
    ``python`` is what runs the module (e.g. ``[sys.executable, "-m", "cProfile", ...]``)."""
    argv = [*python, "-m", "proxy", "--config", str(config)]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    return argv


def health_url(port: int, path: str = "/health", host: str = HOST) -> str:
    return f"http://{host}:{port}{path}"


async def wait_serving(
    session: aiohttp.ClientSession,
    url: str,
    *,
    exited: Callable[[], bool] = lambda: False,
    timeout: float = 20.0,
    interval: float = 0.05,
) -> bool:
    """Poll ``GET url`` until it answers 200 (True). False when ``exited()`` says the
    process is gone first, or after ``timeout`` seconds: the caller says why it failed."""
    deadline = time.monotonic() + timeout
    while not exited():
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return False
