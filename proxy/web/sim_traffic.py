"""``python -m proxy demo``'s moving parts: the simulated provider and the real proxy
served in one event loop, and a few hundred mixed calls sent through the proxy the way
clients send them (chat, streams, Anthropic with prompt caching, Gemini, embeddings,
several users and tags in the attribution headers, some errors)."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.web.app import create_app
from proxy.web.simulator import SimSettings, start_simulator

USERS = ("alice", "bob", "carol", "dave", "erin")
FEATURES = ("chat", "search", "summarize", "support-bot")
PROJECTS = ("atlas", "beacon")
# Long shared prefixes: repeated, they are read from the providers' caches.
HANDBOOK = " ".join(f"Rule {i}: answer politely, cite the policy section, and keep replies short." for i in range(1, 90))
CATALOG = " ".join(f"Product {i} costs {i * 3} dollars and ships in {i % 5 + 1} days." for i in range(1, 160))
QUESTIONS = (
    "How do I reset my password?",
    "Summarize this week's incidents.",
    "Which plan fits a team of twelve?",
    "Translate 'good morning' into French.",
    "Why did my invoice go up?",
    "Write a haiku about caching.",
)


@dataclass(frozen=True, slots=True)
class DemoCall:
    path: str  # on the proxy, after its base URL
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _openai(rng: random.Random, q: str) -> DemoCall:
    pick = rng.random()
    if pick < 0.1:
        return DemoCall("/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": [q, rng.choice(QUESTIONS)]})
    if pick < 0.25:
        model = rng.choice(("o4-mini", "gpt-5-mini"))
        return DemoCall("/openai/v1/responses", {"model": model, "input": q, "instructions": HANDBOOK, "stream": rng.random() < 0.5})
    model = rng.choice(("gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4.1-nano", "gpt-5-mini", "o4-mini"))
    system = HANDBOOK if rng.random() < 0.6 else "You are a helpful assistant."
    body: dict[str, Any] = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
    if rng.random() < 0.4:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        body["max_tokens"] = rng.choice((64, 256, 512))
    return DemoCall("/openai/v1/chat/completions", body)


def _anthropic(rng: random.Random, q: str) -> DemoCall:
    model = rng.choice(("claude-haiku-4-5", "claude-haiku-4-5", "claude-sonnet-4-5"))
    mark: dict[str, Any] = {"type": "ephemeral", **({"ttl": "1h"} if rng.random() < 0.3 else {})}
    system = [{"type": "text", "text": CATALOG, "cache_control": mark}]
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.choice((128, 400, 1024)),
        "system": system,
        "messages": [{"role": "user", "content": q}],
    }
    if rng.random() < 0.45:
        body["stream"] = True
    if model == "claude-sonnet-4-5" and rng.random() < 0.3:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    return DemoCall("/anthropic/v1/messages", body)


def _gemini(rng: random.Random, q: str) -> DemoCall:
    model = rng.choice(("gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"))
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": q}]}]}
    if rng.random() < 0.5:
        body["systemInstruction"] = {"parts": [{"text": HANDBOOK}]}
    verb = rng.choice(("generateContent", "generateContent", "streamGenerateContent?alt=sse", "streamGenerateContent"))
    return DemoCall(f"/gemini/v1beta/models/{model}:{verb}", body)


def demo_calls(n: int, seed: int = 7) -> list[DemoCall]:
    """``n`` calls: about half OpenAI, a quarter each Anthropic and Gemini; every call
    names a user, most a feature, some a project."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        family = rng.choices((_openai, _anthropic, _gemini), weights=(2, 1, 1))[0]
        call = family(rng, rng.choice(QUESTIONS))
        headers = {"x-user-id": rng.choice(USERS), "x-feature": rng.choice(FEATURES)}
        if rng.random() < 0.5:
            headers["x-project"] = rng.choice(PROJECTS)
        out.append(DemoCall(call.path, call.body, headers))
    return out


async def send_calls(base: str, calls: Sequence[DemoCall], concurrency: int = 16) -> list[int]:
    """Send every call (any API key: the simulator takes any); the HTTP statuses, in order."""
    gate = asyncio.Semaphore(concurrency)
    auth = {
        "openai": {"Authorization": "Bearer demo-key"},
        "anthropic": {"x-api-key": "demo-key"},
        "gemini": {"x-goog-api-key": "demo-key"},
    }

    async def one(http: aiohttp.ClientSession, call: DemoCall) -> int:
        headers = {**auth.get(call.path.split("/")[1], {}), **call.headers}
        async with gate, http.post(base + call.path, json=call.body, headers=headers) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        return list(await asyncio.gather(*(one(http, c) for c in calls)))


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_demo(
    config: Config,
    log_path: str,
    proxy_socks: Sequence[socket.socket],
    sim_sock: socket.socket,
    calls: Sequence[DemoCall],
    after_calls: Callable[[list[int], bool], Awaitable[None]],
    *,
    error_rate: float = 0.04,
    keep_serving: bool = True,
    console: bool = False,
) -> None:
    """Serve the simulator and the proxy, send ``calls``, then ``after_calls(statuses,
    stopped)``: with ``keep_serving`` the proxy still runs meanwhile and until SIGINT or
    SIGTERM; without, it has been stopped first, so every record is on disk."""
    sim = await start_simulator(SimSettings(error_rate=error_rate, seed=11), sim_sock)
    proxy: web.AppRunner | None = None
    try:
        proxy = web.AppRunner(create_app(config, log_path, console=console), handler_cancellation=True, access_log=None, shutdown_timeout=5)
        await proxy.setup()
        for sock in proxy_socks:
            await web.SockSite(proxy, sock).start()
        host, port = proxy_socks[0].getsockname()[:2]
        statuses = await send_calls(f"http://{host}:{port}", calls)
        if not keep_serving:
            await proxy.cleanup()  # flushes the log writer
            proxy = None
        await after_calls(statuses, proxy is None)
        if keep_serving:
            await _until_stopped()
    finally:
        if proxy is not None:
            await proxy.cleanup()
        await sim.cleanup()
