"""The Grafana dashboard's queries (docs/grafana-dashboard.json) run by a real Prometheus
(Debian's ``prometheus``, which scripts/test.sh installs where missing) that scrapes the
real proxy on 127.0.0.1, and the proxy's /metrics checked by ``promtool check metrics``.

Grafana itself is not needed to know that a panel works: each panel's PromQL, with the
dashboard's variables filled in as Grafana fills them, must be valid and, after calls
went through the proxy between scrapes, must return series."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.support import ROOT
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import MockUpstream, json_reply, sse, stream_reply
from tests.support.ports import free_port
from tests.support.provider_replies import anthropic_stream_events, openai_chat

DASHBOARD = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
# How Grafana fills its variables in: "All" of a multi-value variable is its allValue.
VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "15s", "$provider": ".*", "$model": ".*"}
# Panels that may rightly be empty after these calls (none of them is unpriced).
MAY_BE_EMPTY: set[str] = set()


def exprs() -> list[tuple[str, str]]:
    out = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs Debian's prometheus package (or: apt-get install prometheus)")
    return path


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A Prometheus on a free loopback port, its config file (targets filled in later)."""
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1s}\nscrape_configs: []\n")
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus"),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("prometheus did not start")
        yield url, cfg
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def scrapes(s: aiohttp.ClientSession, url: str) -> int:
    """How many samples of ``up`` Prometheus holds for the proxy: one per scrape."""
    async with s.get(f"{url}/api/v1/query", params={"query": 'count_over_time(up{job="proxy"}[5m])'}) as r:
        result = (await r.json())["data"]["result"]
    return int(result[0]["value"][1]) if result else 0


async def wait_for_scrapes(s: aiohttp.ClientSession, url: str, n: int) -> None:
    for _ in range(300):
        if await scrapes(s, url) >= n:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"prometheus did not scrape the proxy {n} times")


async def calls(s: aiohttp.ClientSession, proxy_url: str) -> None:
    openai_auth = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}
    anthropic_auth = {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    for body in (chat, {**chat, "stream": True}):
        async with s.post(f"{proxy_url}/openai/v1/chat/completions", json=body, headers=openai_auth) as r:
            assert r.status == 200
            await r.read()
    message = {"model": "claude-haiku-4-5", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    async with s.post(f"{proxy_url}/anthropic/v1/messages", json=message, headers=anthropic_auth) as r:
        assert r.status == 200
        await r.read()
    async with s.post(f"{proxy_url}/gemini/v1beta/models/gemini-2.5-flash:generateContent", json={"contents": []}) as r:
        assert r.status == 503  # an error, for the error-rate panels
        await r.read()


async def test_every_dashboard_query_runs_in_a_real_prometheus_scraping_the_proxy(
    mock: MockUpstream, start_proxy: Any, prometheus: tuple[str, Path]
) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events())))
    mock.on("/v1beta/models/gemini-2.5-flash:generateContent", json_reply({"error": {"code": 503, "message": "busy"}}, status=503))
    cfg = make_config(mock.url)
    cfg["budgets"] = {"limits": [{"scope": "global", "period": "daily", "usd": 50}, {"scope": "user", "period": "monthly", "usd": 5}]}
    proxy = await start_proxy(cfg)
    prom_url, prom_cfg = prometheus
    target = proxy.url.removeprefix("http://")
    prom_cfg.write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: proxy\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    async with aiohttp.ClientSession() as s:
        await calls(s, proxy.url)
        async with s.post(f"{prom_url}/-/reload") as r:
            assert r.status == 200
        await wait_for_scrapes(s, prom_url, 1)
        await calls(s, proxy.url)  # between scrapes, so rate() and increase() see them
        await wait_for_scrapes(s, prom_url, 3)
        empty, failed = [], []
        for title, expr in exprs():
            async with s.get(f"{prom_url}/api/v1/query", params={"query": expr}) as r:
                answer = await r.json()
            if answer.get("status") != "success":
                failed.append((title, expr, answer.get("error")))
            elif not answer["data"]["result"] and title not in MAY_BE_EMPTY:
                empty.append((title, expr))
        assert failed == [], failed
        assert empty == [], empty
        # The cost Prometheus sums is the log's (to float precision).
        async with s.get(f"{prom_url}/api/v1/query", params={"query": "sum(llm_proxy_cost_usd_total)"}) as r:
            prom_cost = float((await r.json())["data"]["result"][0]["value"][1])
        async with s.get(f"{proxy.url}/metrics") as r:
            exposition = await r.read()
    records = await proxy.records()
    assert prom_cost == pytest.approx(sum(float(r["total_cost"] or 0) for r in records), rel=1e-9)
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    # promtool's linter: naming, units, counters ending in _total, help text on every metric.
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_dashboard_variables_are_the_only_placeholders_left() -> None:
    """Every $name in a query is one this test (and Grafana) fills in."""
    for title, expr in exprs():
        assert not re.search(r"\$\w+", expr), (title, expr)
