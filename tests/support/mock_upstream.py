"""A real aiohttp server on 127.0.0.1 that plays OpenAI / Anthropic / Gemini.

Tests register a handler per path (``mock.on(path, handler)``); the factories here make
handlers (a JSON reply, a stream of pieces, raw bytes, a cut stream) and the wire
formats (SSE events, bytes split with pauses); provider_replies.py builds the
provider-shaped replies of docs/providers.md §1-5. Every request the mock receives is
kept in ``mock.requests`` (method, path, query, headers, body), so tests can check what
the proxy sent upstream. ThreadedUpstream serves from threads, off the test's loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import web
from multidict import CIMultiDictProxy, MultiMapping

Handler = Callable[[web.Request, "Received"], Awaitable[web.StreamResponse]]
Piece = bytes | float  # bytes to write, or seconds to sleep


@dataclass
class Received:
    method: str
    path: str
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class MockUpstream:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.routes: dict[str, Handler] = {}
        self.url = ""
        self.received = asyncio.Event()  # set at each request
        self.disconnected = asyncio.Event()  # a streamed reply lost its reader
        self.stream_done = asyncio.Event()  # a streamed reply was written to its end
        self.stream_done_at: float | None = None
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    def next_id(self) -> int:
        return next(self._ids)

    def on(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Received(request.method, request.path, request.query, request.headers, body)
        self.requests.append(rec)
        self.received.set()
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": {"message": f"mock: no route for {request.path}"}}, status=404)
        return await handler(request, rec)

    async def start(self) -> "MockUpstream":
        app = web.Application(client_max_size=128 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- reply helpers (bound to this mock so streams can report disconnects) ---

    async def write_pieces(
        self,
        request: web.Request,
        pieces: Iterable[Piece],
        *,
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
        gzip: bool = False,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type, **(headers or {})})
        if gzip:
            resp.enable_compression(web.ContentCoding.gzip)
        await resp.prepare(request)
        try:
            for piece in pieces:
                if isinstance(piece, (int, float)):
                    await asyncio.sleep(piece)
                else:
                    await resp.write(piece)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        self.stream_done_at = time.monotonic()
        self.stream_done.set()
        return resp


# --- handler factories ----------------------------------------------------------


def json_reply(
    payload: Any | Callable[[Received], Any],
    status: int = 200,
    headers: dict[str, str] | None = None,
    delay: float = 0,
    gzip: bool = False,
) -> Handler:
    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        body = payload(rec) if callable(payload) else payload
        resp = web.json_response(body, status=status, headers=headers)
        if gzip:
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    return handler


def raw_reply(body: bytes, status: int = 200, content_type: str = "text/plain", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type, **(headers or {})})

    return handler


def stream_reply(
    mock: MockUpstream,
    pieces: Iterable[Piece] | Callable[[Received], Iterable[Piece]],
    content_type: str = "text/event-stream",
    status: int = 200,
    headers: dict[str, str] | None = None,
    gzip: bool = False,
) -> Handler:
    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        items = pieces(rec) if callable(pieces) else pieces
        return await mock.write_pieces(request, list(items), status=status, content_type=content_type, headers=headers, gzip=gzip)

    return handler


# --- wire formats -----------------------------------------------------------------


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def sse(events: Iterable[tuple[str | None, Any]], sep: str = "\n\n") -> list[bytes]:
    """One bytes item per event: ``event: name`` (if any) and ``data: json``."""
    nl = "\r\n" if sep == "\r\n\r\n" else "\n"
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else dumps(data)
        out.append(((f"event: {name}{nl}" if name else "") + f"data: {text}{sep}").encode())
    return out


def without_cost_comment(raw: bytes, expected: int | None = 1) -> bytes:
    """A stream as the proxy relayed it, without the cost comment line it adds to
    OpenAI-family and Anthropic streams (docs/replies.md): the upstream's own bytes.
    Checks there were ``expected`` such lines (0 for Gemini, cut or switched-off
    streams; None: at most one)."""
    lines = raw.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(b": llm-cost {")]
    removed = len(lines) - len(kept)
    assert removed == expected if expected is not None else removed <= 1, (removed, raw[-400:])
    return b"".join(kept)


def split_bytes(data: bytes, sizes: Iterable[int], pause: float = 0.002) -> list[Piece]:
    """Cut ``data`` into pieces of the given sizes (cycled), with a pause after each."""
    out: list[Piece] = []
    pos = 0
    for size in itertools.cycle(list(sizes)):
        if pos >= len(data):
            break
        out.append(data[pos : pos + size])
        out.append(pause)
        pos += size
    return out


def cut_stream(pieces: Iterable[Piece], content_type: str = "text/event-stream") -> Handler:
    """A streamed reply that writes ``pieces`` and then drops the connection, with no
    end of the chunked body: the upstream cut mid-stream."""

    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await resp.prepare(request)
        for piece in pieces:
            if isinstance(piece, (int, float)):
                await asyncio.sleep(piece)
            else:
                await resp.write(piece)
        await asyncio.sleep(0.01)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more to send on a dropped connection

    return handler


class ThreadedUpstream:
    """A plain HTTP/1.1 upstream served by threads, off the test's event loop: a huge
    body read there (or a client's huge body sent from the loop) would stall the very
    loop the proxy under test runs on, and measure the harness instead of the proxy.
    ``respond(path, body)`` runs in the connection's thread and returns (status, JSON)."""

    def __init__(self, respond: Callable[[str, bytes], tuple[int, Any]]) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's connection pool expects
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall between header and body

            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.received.append((self.path, len(body)))
                status, payload = respond(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.received: list[tuple[str, int]] = []  # (path, body length), in arrival order
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
