"""The proxy app run in this process on 127.0.0.1 (as ``python -m proxy`` runs it: with
handler_cancellation), the handle the ``start_proxy`` fixture gives a test."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import web

from tests.support.records import parse_log


class ProxyHandle:
    def __init__(self, runner: web.AppRunner, url: str, log_path: Path) -> None:
        self.runner, self.url, self.log_path = runner, url, log_path
        self._stopped = False

    def __iter__(self):  # ``url, records = proxy``
        return iter((self.url, self.records))

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.runner.cleanup()  # flushes the JSONL writer

    def raw_log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def records(self) -> list[dict]:
        """Stop the proxy (so every record is on disk) and return the parsed, checked log."""
        await self.stop()
        return parse_log(self.raw_log())

    async def wait_raw_log(self, n: int, timeout: float = 5.0) -> str:
        """Without stopping: the log's text once it holds at least ``n`` whole lines.
        Records reach the file from a writer thread after the reply has gone out, so a
        read right after a call may miss the last ones; on timeout this fails the test
        rather than hand back a short log that would let a check pass unseen."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.raw_log()
            whole = text[: text.rfind("\n") + 1]  # a batch still being written is not read
            if whole.count("\n") >= n:
                return whole
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {n} log records in {self.log_path}: it holds {whole.count(chr(10))}"
                )
            await asyncio.sleep(0.01)

    async def wait_records(self, n: int, timeout: float = 5.0) -> list[dict]:
        """Without stopping: the parsed, checked records once there are at least ``n``."""
        return parse_log(await self.wait_raw_log(n, timeout))
