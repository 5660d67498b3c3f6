"""Fixtures for the end-to-end tests: a mock upstream and the real proxy, both on
127.0.0.1, the proxy run the way ``python -m proxy`` runs it (handler_cancellation)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from mock_upstream import MockUpstream
from proxy.config import Config, parse_config
from proxy.web.app import create_app

CLIENT_OPENAI_KEY = "sk-test-client-0123456789abcdefXYZ"
CLIENT_ANTHROPIC_KEY = "sk-ant-test-client-0123456789abcdef"
CLIENT_GEMINI_KEY = "AIzaTestClientKey0123456789abcdef"
PROXY_OPENAI_KEY = "sk-proxy-configured-9876543210fedcba"
PROXY_ANTHROPIC_KEY = "sk-ant-proxy-configured-9876543210"
PROXY_GEMINI_KEY = "AIzaProxyConfiguredKey9876543210"
ALL_KEYS = (CLIENT_OPENAI_KEY, CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, PROXY_OPENAI_KEY, PROXY_ANTHROPIC_KEY, PROXY_GEMINI_KEY)

RECORD_FIELDS = {
    "schema_version",
    "timestamp",
    "request_id",
    "user_id",
    "key_id",
    "ip_address",
    "provider",
    "provider_type",
    "model",
    "response_model",
    "endpoint",
    "is_streaming",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "input_cost",
    "output_cost",
    "total_cost",
    "currency",
    "pricing_source",
    "price_id",
    "service_tier",
    "finish_reason",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "usage_source",
    "raw_usage",
    "tags",
}
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_search_requests",
)
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

# USD per 1M tokens, from docs/providers.md §7 (the same as config.yml).
OPENAI_MODELS = {
    "gpt-4o": {"pricing": {"input": 2.50, "output": 10.00, "cached_input": 1.25}},
    "gpt-5": {
        "pricing": {
            "input": 1.25,
            "output": 10.00,
            "cached_input": 0.125,
            "service_tiers": {"flex": {"input": 0.625, "output": 5.00, "cached_input": 0.0625}},
        }
    },
    "o4-mini": {"pricing": {"input": 1.10, "output": 4.40, "cached_input": 0.275}},
    "text-embedding-3-small": {"pricing": {"input": 0.02, "output": 0}},
    "gpt-3.5-turbo-instruct": {"pricing": {"input": 1.50, "output": 2.00}},
}
ANTHROPIC_MODELS = {
    "claude-sonnet-4-5": {
        "pricing": {"input": 3.00, "output": 15.00, "cached_input": 0.30, "cache_write": 3.75, "cache_write_1h": 6.00, "web_search": 10}
    },
    "claude-haiku-4-5": {
        "pricing": {"input": 1.00, "output": 5.00, "cached_input": 0.10, "cache_write": 1.25, "cache_write_1h": 2.00, "web_search": 10}
    },
    "claude-opus-4-1": {
        "pricing": {"input": 15.00, "output": 75.00, "cached_input": 1.50, "cache_write": 18.75, "cache_write_1h": 30.00, "web_search": 10}
    },
}
GEMINI_MODELS = {
    "gemini-2.5-flash": {"pricing": {"input": 0.30, "output": 2.50, "cached_input": 0.03}},
    "gemini-2.5-pro": {
        "pricing": {
            "input": 1.25,
            "output": 10.00,
            "cached_input": 0.125,
            "tiers": [{"above": 200000, "input": 2.50, "output": 15.00, "cached_input": 0.25}],
        }
    },
}


def make_config(upstream: str, server: dict | None = None, catalog: bool = False, **extra_providers: dict) -> dict:
    """Every family twice: without api_key (client key passes) and with one (``*-keyed``).
    The genai-prices catalog is off unless asked for: only the prices below apply."""
    providers: dict[str, Any] = {
        "openai": {"base_url": upstream, "models": OPENAI_MODELS},
        "openai-keyed": {"type": "openai", "base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
        "anthropic": {"base_url": upstream, "models": ANTHROPIC_MODELS},
        "anthropic-keyed": {"type": "anthropic", "base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
        "gemini": {"base_url": upstream, "models": GEMINI_MODELS},
        "gemini-keyed": {"type": "gemini", "base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
        # An OpenAI-compatible server under its own name and price table.
        "compat": {
            "type": "openai",
            "base_url": upstream + "/compat",
            "models": {"gpt-4o-mini": {"pricing": {"input": 0.15, "output": 0.60, "cached_input": 0.075}}},
        },
    }
    providers.update(extra_providers)
    cfg: dict[str, Any] = {"providers": providers, "catalog": {"enabled": catalog}}
    if server:
        cfg["server"] = server
    return cfg


def dec(x: Any) -> Decimal | None:
    return None if x is None else Decimal(str(x))


def check_record(rec: dict) -> None:
    """Shape every record must have, whatever happened to the call."""
    assert RECORD_FIELDS <= set(rec), RECORD_FIELDS - set(rec)  # fields are only ever added
    assert rec["schema_version"] == 1
    assert _TS.match(rec["timestamp"]), rec["timestamp"]
    assert rec["currency"] == "USD"
    assert isinstance(rec["status"], int)
    assert isinstance(rec["is_streaming"], bool)
    assert isinstance(rec["latency_ms"], (int, float, Decimal)) and rec["latency_ms"] >= 0
    for f in TOKEN_FIELDS:
        assert rec[f] is None or (isinstance(rec[f], int) and rec[f] >= 0), (f, rec[f])
    if rec["input_tokens"] is not None:
        assert rec["total_tokens"] == rec["input_tokens"] + rec["output_tokens"]
        assert rec["cache_read_tokens"] + rec["cache_write_tokens"] <= rec["input_tokens"]
    if rec["total_cost"] is not None:
        total, input_cost, output_cost = dec(rec["total_cost"]), dec(rec["input_cost"]), dec(rec["output_cost"])
        assert total is not None and input_cost is not None and output_cost is not None, rec
        assert total == input_cost + output_cost
        # A cost of 0 only when nothing was used; an unpriced model has null, never 0.
        if rec["total_tokens"]:
            assert total > 0, rec
    else:
        assert rec["input_cost"] is None and rec["output_cost"] is None
    assert rec["ip_address"] in ("127.0.0.1", None)


def parse_log(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        assert line.strip(), "blank line in the log"
        rec = json.loads(line, parse_float=Decimal)  # exact decimals as written
        check_record(rec)
        records.append(rec)
    return records


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secrets(text: str, *secrets: str) -> None:
    for s in secrets or ALL_KEYS:
        assert s not in text, f"a key leaked into the log: {s[:8]}…"
