"""The simulated provider: an aiohttp app that answers like OpenAI, Anthropic and
Gemini (docs/providers.md §1-5), with realistic, deterministic usage
(``web/sim_replies.py``), so the proxy can be tried, demonstrated and tested without
a provider key. It accepts any API key and never contacts anything.

Routes: OpenAI ``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``,
``GET /v1/models``; Anthropic ``POST /v1/messages``; Gemini ``POST
/v1beta/models/{model}:generateContent`` and ``:streamGenerateContent`` (SSE with
``?alt=sse``, else one JSON array). ``error_rate`` answers that share of calls with a
429 or 500 in the family's own error shape; the header ``x-simulator-error: 429``
(or 500) forces one.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from aiohttp import web

from proxy.web.sim_replies import (
    ERROR_STATUSES,
    Plan,
    PromptCache,
    chat_chunks,
    chat_reply,
    embeddings_reply,
    error_body,
    gemini_chunks,
    gemini_reply,
    message_events,
    message_reply,
    plan_anthropic,
    plan_gemini,
    plan_openai,
    response_object,
    responses_events,
)

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini", "o3", "o4-mini", "text-embedding-3-small")
FORCE_ERROR_HEADER = "x-simulator-error"


@dataclass(frozen=True, slots=True)
class SimSettings:
    error_rate: float = 0.0  # share of calls answered 429 or 500
    chunk_delay: float = 0.002  # seconds between stream events
    seed: int = 0  # which calls the error rate picks


def sse_bytes(events: Iterable[tuple[str | None, Any]], sep: str = "\n\n") -> bytes:
    nl = "\r\n" if sep == "\r\n\r\n" else "\n"
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        out.append((f"event: {name}{nl}" if name else "") + f"data: {text}{sep}")
    return "".join(out).encode()


class Simulator:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.cache = PromptCache()
        self.rng = random.Random(settings.seed)
        self.calls = 0

    def injected_error(self, request: web.Request) -> int | None:
        forced = request.headers.get(FORCE_ERROR_HEADER, "")
        if forced.isdigit() and int(forced) in ERROR_STATUSES:
            return int(forced)
        if self.settings.error_rate > 0 and self.rng.random() < self.settings.error_rate:
            return self.rng.choice(ERROR_STATUSES)
        return None

    async def body(self, request: web.Request, family: str) -> dict[str, Any] | web.Response:
        self.calls += 1
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return bad_request(family, "the request body must be a JSON object")
        for cap in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(cap)
            # As the real APIs: a cap that is not a positive integer is the caller's error.
            if value is not None and (type(value) is not int or value < 1):
                return bad_request(family, f"{cap}: expected an integer of at least 1, got {value!r}"[:200])
        status = self.injected_error(request)
        if status is not None:
            headers = {"retry-after": "1"} if status == 429 else None
            return web.json_response(error_body(family, status), status=status, headers=headers)
        return body

    async def stream(self, request: web.Request, chunks: Sequence[bytes], content_type: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, chunk in enumerate(chunks):
            if i and self.settings.chunk_delay:
                await asyncio.sleep(self.settings.chunk_delay)
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    # --- OpenAI ---

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, "openai")
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list):
            return bad_request("openai", "'messages' is a required property")
        plan = plan_openai(body, self.cache, "chat")
        if body.get("stream") is not True:
            return web.json_response(chat_reply(plan))
        options = body.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        events = [sse_bytes([(None, c)]) for c in chat_chunks(plan, include)] + [sse_bytes([(None, "[DONE]")])]
        return await self.stream(request, events, "text/event-stream")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, "openai")
        if isinstance(body, web.Response):
            return body
        plan = plan_openai(body, self.cache, "responses")
        if body.get("stream") is not True:
            return web.json_response(response_object(plan))
        return await self.stream(request, [sse_bytes([e]) for e in responses_events(plan)], "text/event-stream")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, "openai")
        if isinstance(body, web.Response):
            return body
        plan = plan_openai(body, self.cache, "embeddings")
        inputs = body.get("input")
        return web.json_response(embeddings_reply(plan, len(inputs) if isinstance(inputs, list) else 1))

    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "simulator"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    # --- Anthropic ---

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, "anthropic")
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list) or not isinstance(body.get("max_tokens"), int):
            return bad_request("anthropic", "messages and max_tokens are required")
        plan = plan_anthropic(body, self.cache)
        if body.get("stream") is not True:
            return web.json_response(message_reply(plan))
        return await self.stream(request, [sse_bytes([e]) for e in message_events(plan)], "text/event-stream")

    # --- Gemini ---

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, verb = request.match_info["call"].partition(":")
        if verb not in ("generateContent", "streamGenerateContent"):
            return bad_request("gemini", f"unknown method {verb or '(none)'}", status=404)
        body = await self.body(request, "gemini")
        if isinstance(body, web.Response):
            return body
        plan = plan_gemini(model, body, self.cache)
        if verb == "generateContent":
            return web.json_response(gemini_reply(plan))
        return await self.gemini_stream(request, plan)

    async def gemini_stream(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        chunks = gemini_chunks(plan)
        if request.query.get("alt") == "sse":  # Gemini frames SSE with CRLF
            return await self.stream(request, [sse_bytes([(None, c)], "\r\n\r\n") for c in chunks], "text/event-stream")
        # Without alt=sse: one JSON array, written element by element as it grows.
        parts = [("[" if i == 0 else ",\r\n") + json.dumps(c) for i, c in enumerate(chunks)]
        return await self.stream(request, [p.encode() for p in parts] + [b"]"], "application/json; charset=UTF-8")


def bad_request(family: str, message: str, status: int = 400) -> web.Response:
    if family == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    elif family == "gemini":
        body = {"error": {"code": status, "message": message, "status": "INVALID_ARGUMENT" if status == 400 else "NOT_FOUND"}}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.json_response(body, status=status)


def create_simulator(settings: SimSettings | None = None) -> web.Application:
    sim = Simulator(settings or SimSettings())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/v1/messages", sim.messages)
    # Gemini answers on both API versions; the google-genai SDK picks one by release.
    app.router.add_post("/v1beta/models/{call}", sim.gemini)
    app.router.add_post("/v1/models/{call}", sim.gemini)
    return app


async def start_simulator(settings: SimSettings, sock: socket.socket) -> web.AppRunner:
    """Serve the simulator on ``sock`` (already listening); the caller cleans up the runner."""
    runner = web.AppRunner(create_simulator(settings), access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def loopback_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def run_simulator(settings: SimSettings, sockets: Sequence[socket.socket]) -> None:
    """Serve the simulator on listening ``sockets`` until SIGINT or SIGTERM."""
    web.run_app(create_simulator(settings), sock=list(sockets), print=None, access_log=None, shutdown_timeout=1, handler_cancellation=True)
