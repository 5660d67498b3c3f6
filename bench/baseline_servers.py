#!/usr/bin/env python3
"""The two baseline servers of ``bench_proxy.py``, each run as its own process:

* mock - an OpenAI-shaped upstream (``/v1/chat/completions``: JSON or SSE, honours
         ``stream_options.include_usage``; header ``x-mock-big-bytes`` asks for a large
         SSE reply sent in many writes, ``x-mock-gap-ms`` for a pause after the first
         SSE event);
* bare - the minimal aiohttp reverse proxy (read body, forward with one shared
         ClientSession, stream the reply back chunk by chunk; no parsing, no log): the
         baseline for "what does metering cost".

The published figures were measured against these two exactly as they are: a change
here moves every baseline. (tests/support/mock_upstream.py is the tests' upstream, a
scriptable in-process server; it is not a baseline.)

    python bench/baseline_servers.py --serve mock --port 8001
    python bench/baseline_servers.py --serve bare --port 8002 --upstream http://127.0.0.1:8001

Only stdlib + aiohttp + orjson (multidict and yarl ship with aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict  # ships with aiohttp
from yarl import URL  # ships with aiohttp

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
RESPONSE_MODEL = "gpt-4o-mini-2024-07-18"


# --------------------------------------------------------------------------- mock upstream


def _chunk(i: int, content: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1763800000,
        "model": RESPONSE_MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 9,
    "total_tokens": 21,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
JSON_REPLY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1763800000,
        "model": RESPONSE_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": None, "annotations": []},
            }
        ],
        "usage": USAGE,
    }
)
FIRST_EVENT = _chunk(0, "", role=True)
CONTENT_EVENTS = [_chunk(i, w) for i, w in enumerate(["Hello", "!", " How", " can", " I", " help", " you", " today", "?"])]
FINISH_EVENT = _chunk(0, None, finish="stop")
USAGE_EVENT = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1763800000,
            "model": RESPONSE_MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": USAGE,
        }
    )
    + b"\n\n"
)
DONE_EVENT = b"data: [DONE]\n\n"
BIG_EVENT = _chunk(0, "x" * 1000)  # ~1.2 KB per event
BIG_EVENTS_PER_WRITE = 8  # ~10 KB per write


def mock_app() -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            req = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            req = {}
        if not isinstance(req, dict):
            req = {}
        if req.get("stream") is not True:
            return web.Response(body=JSON_REPLY, content_type="application/json")
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        gap = float(request.headers.get("x-mock-gap-ms", "0")) / 1000
        big = int(request.headers.get("x-mock-big-bytes", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(FIRST_EVENT)
        if gap:
            await asyncio.sleep(gap)
        if big:
            block = BIG_EVENT * BIG_EVENTS_PER_WRITE
            for _ in range(max(1, big // len(block))):
                await resp.write(block)
        else:
            for ev in CONTENT_EVENTS:
                await resp.write(ev)
        await resp.write(FINISH_EVENT)
        if include_usage:
            await resp.write(USAGE_EVENT)
        await resp.write(DONE_EVENT)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/ping", _pong)
    return app


async def _pong(request: web.Request) -> web.Response:
    return web.Response(text="ok")


# --------------------------------------------------------------------------- bare forwarder

_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)
_RESP_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection", "keep-alive"})


def bare_app(upstream: str) -> web.Application:
    """The least a reverse proxy can do: no parsing, no metering, no log."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def on_startup(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=600),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        name = request.match_info["provider"]
        tail = request.rel_url.raw_path[len(name) + 1 :]
        qs = request.query_string
        url = upstream + tail + (f"?{qs}" if qs else "")
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        async with request.app[session_key].request(
            request.method,
            URL(url, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers=CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in _RESP_DROP),
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/ping", _pong)
    app.router.add_route("*", "/{provider}/{tail:.*}", forward)
    return app


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401  (only: is it installed?)
    except ImportError:
        return "asyncio"
    return "uvloop"


def serve(role: str, port: int, upstream: str | None) -> int:
    # The same event loop the proxy picks (uvloop when installed), so the baselines
    # differ from the proxy only by what the proxy does.
    loop = None
    if event_loop_name() == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    app = mock_app() if role == "mock" else bare_app(upstream or "")
    web.run_app(app, host=HOST, port=port, handler_cancellation=True, access_log=None, print=None, shutdown_timeout=2, loop=loop)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", choices=("mock", "bare"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", help="bare: the mock's base URL")
    args = ap.parse_args(argv)
    return serve(args.serve, args.port, args.upstream)


if __name__ == "__main__":
    raise SystemExit(main())
