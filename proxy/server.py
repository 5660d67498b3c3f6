"""The aiohttp shell: forward each call, tap its reply, price it, log one record."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .analytics import RollingWindow, iter_jsonl, parse_timestamp
from .config import Config, ProviderConfig
from .logwriter import JsonlWriter
from .catalog import pricebook_for
from .estimate import estimate_input_tokens
from .pricing import PriceBook, price_call
from .providers import ADAPTERS, Adapter, Endpoint
from .records import CallContext, build_record, dumps_record, fingerprint, json_default, redact
from .sse import JSONArrayStreamParser, SSEParser
from .usage import CallInfo, Usage

log = logging.getLogger("proxy")

DEFAULT_LOG = "logs/cost-tracking.jsonl"

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes.
_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
    }
)
# Attribution headers are for the proxy, not the provider.
_OURS = frozenset({"x-user-id"})
# aiohttp's client decompresses replies, so the encoding headers no longer apply.
_RESPONSE_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection", "keep-alive"})

APP_STATE = web.AppKey("proxy_state", "ProxyState")


@dataclass(slots=True)
class ProxyState:
    config: Config
    prices: PriceBook
    writer: JsonlWriter | None
    window: RollingWindow
    session: aiohttp.ClientSession | None = None
    warned_unpriced: set[tuple[str, str]] | None = None


def build_pricebook(config: Config) -> PriceBook:
    return pricebook_for(config)


def load_window(path: Path, window: RollingWindow, now: float) -> int:
    """Rebuild the 24-hour window from the log so /health survives restarts."""
    if not path.exists():
        return 0
    cutoff = now - window.seconds
    n = 0
    with path.open("rb") as f:
        for rec in iter_jsonl(f):
            ts_text = rec.get("timestamp")
            if not isinstance(ts_text, str):
                continue
            try:
                ts = parse_timestamp(ts_text)
            except ValueError:
                continue
            if ts >= cutoff:
                window.add(rec, ts)
                n += 1
    return n


def create_app(config: Config, log_path: str | os.PathLike[str] | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_mb * 1024 * 1024)
    path = Path(log_path or os.environ.get("COST_TRACKING_FILE") or DEFAULT_LOG)
    window = RollingWindow()
    writer = None
    if config.cost_tracking:
        load_window(path, window, time.time())
        writer = JsonlWriter(path)
    state = ProxyState(config, build_pricebook(config), writer, window, warned_unpriced=set())
    app[APP_STATE] = state

    async def on_startup(app: web.Application) -> None:
        state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.read_timeout),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def on_cleanup(app: web.Application) -> None:
        if state.session is not None:
            await state.session.close()
        if state.writer is not None:
            # Runs after in-flight calls finished: every record is on disk.
            await asyncio.get_running_loop().run_in_executor(None, state.writer.close)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/health", handle_health)
    app.router.add_route("*", "/{provider}/{tail:.*}", handle_proxy)
    return app


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    overall, by_provider = state.window.totals()
    body = {
        "status": "healthy",
        "features": {"cost_tracking": state.config.cost_tracking},
        "cost_stats_24h": {
            "total_cost": overall.total_cost,
            "provider_costs": {p: t.total_cost for p, t in sorted(by_provider.items())},
            "requests": overall.requests,
            "errors": overall.errors,
            "unpriced_requests": overall.unpriced,
            "tokens": overall.tokens["total_tokens"],
            "input_tokens": overall.tokens["input_tokens"],
            "output_tokens": overall.tokens["output_tokens"],
        },
    }
    return web.Response(body=dumps_json(body), content_type="application/json")


def dumps_json(obj: Any) -> bytes:
    return orjson.dumps(obj, default=json_default)


def _error_response(adapter: Adapter, status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(adapter.error_body(status, message)), content_type="application/json")


class _Call:
    """Per-call bookkeeping shared by the buffered and streamed paths."""

    __slots__ = ("state", "provider", "adapter", "endpoint", "ctx", "t0", "ttft", "status", "error", "secrets", "body")

    def __init__(self, state: ProxyState, provider: ProviderConfig, adapter: Adapter, endpoint: Endpoint, ctx: CallContext, secrets: tuple[str | None, ...]) -> None:
        self.state, self.provider, self.adapter, self.endpoint, self.ctx = state, provider, adapter, endpoint, ctx
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.status = 0
        self.error: str | None = None
        self.secrets = secrets
        self.body: Any = None

    def _usage(self, info: CallInfo, error: str | None) -> tuple[Usage | None, str | None]:
        """The reply's usage; or, when it never came, an estimate from the request and
        the text relayed so far (the provider bills a call it accepted either way)."""
        usage, text = info.usage, info.output_text
        accepted = 200 <= self.status < 400 or self.status == 499
        if not (self.ctx.metered and accepted):
            return usage, "provider" if usage is not None else None
        if usage is None:
            if self.body is None:
                return None, None
            model = info.response_model or self.ctx.model
            output = text.tokens() if text is not None else 0
            return Usage(input_tokens=estimate_input_tokens(self.body, model), output_tokens=output), "estimated"
        if error and text is not None and not text.empty and info.finish_reason is None:
            # Cut short after usage began (Anthropic's message_start has only a
            # placeholder output count): the relayed text is the better output figure.
            relayed = text.tokens()
            if relayed > usage.output_tokens:
                usage.output_tokens = relayed
                return usage, "estimated"
        return usage, "provider"

    def finish(self, info: CallInfo) -> None:
        state = self.state
        if state.writer is None:
            return
        error = self.error or info.error
        if error:
            error = redact(error, self.secrets)[:300]
        ctx = self.ctx
        usage, source = self._usage(info, error)
        price = cost = variant = None
        if usage is not None:
            priced = price_call(
                state.prices, provider=ctx.provider, family=ctx.family, model=ctx.model,
                response_model=info.response_model, usage=usage, when=ctx.timestamp_dt,
                service_tier=info.service_tier, speed=info.speed,
            )
            price, cost, variant = priced.price, priced.cost, priced.variant
            if price is None:
                model = info.response_model or ctx.model or "?"
                warned = state.warned_unpriced
                if warned is not None and (ctx.provider, model) not in warned:
                    warned.add((ctx.provider, model))
                    log.warning("%s/%s Cost: Not calculated (no pricing configured)", ctx.provider, model)
        latency = (time.perf_counter() - self.t0) * 1000
        ttft = (self.ttft - self.t0) * 1000 if self.ttft is not None else None
        record = build_record(
            ctx, info, usage=usage, status=self.status, error=error, latency_ms=latency, ttft_ms=ttft,
            usage_source=source, price=price, cost=cost, price_variant=variant,
        )
        state.writer.write(dumps_record(record))
        state.window.add(record, ctx.timestamp)
        if ctx.metered or usage is not None:
            cost_text = f"${format(cost.total_cost.normalize(), 'f')}" if cost is not None else "not calculated"
            log.info(
                "💵 Cost Tracking: %s/%s | tokens in=%s out=%s (cache read=%s write=%s) | cost %s | %s %.0fms",
                ctx.provider, record["response_model"] or ctx.model, record["input_tokens"], record["output_tokens"],
                record["cache_read_tokens"], record["cache_write_tokens"], cost_text, self.status, latency,
            )


def _forward_headers(request: web.Request, provider: ProviderConfig, adapter: Adapter) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        low = name.lower()
        if low in _HOP or low in _OURS:
            continue
        if provider.api_key and low in adapter.key_headers:
            continue
        headers.add(name, value)
    if provider.api_key:
        name, value = adapter.auth_header(provider.api_key)
        headers[name] = value
    return headers


def _response_headers(resp: aiohttp.ClientResponse) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in resp.headers.items():
        if name.lower() not in _RESPONSE_DROP:
            out.add(name, value)
    return out


async def handle_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[APP_STATE]
    name = request.match_info["provider"]
    provider = state.config.providers.get(name)
    if provider is None:
        return web.json_response(
            {"error": {"message": f"unknown provider '{name}'; configured: {', '.join(state.config.providers)}", "type": "not_found_error"}},
            status=404,
        )
    adapter = ADAPTERS[provider.type]
    raw_path = request.rel_url.raw_path
    tail = raw_path[len(name) + 1 :]  # keeps the leading "/" and the percent-encoding
    endpoint = adapter.endpoint(tail, request.method)
    started = time.time()

    client_key = adapter.client_key(request.headers, request.query)
    key_id = fingerprint(client_key) if client_key else None
    ctx = CallContext(
        timestamp=started, provider=name, family=provider.type, endpoint=request.rel_url.path[len(name) + 1 :],
        key_id=key_id, ip_address=request.remote, metered=endpoint.kind is not None,
    )
    call = _Call(state, provider, adapter, endpoint, ctx, (client_key, provider.api_key))

    try:
        body_bytes = await request.read()
    except web.HTTPRequestEntityTooLarge:
        call.status, call.error = 413, f"request body over {state.config.max_body_mb} MB"
        call.finish(CallInfo())
        too_large = _error_response(adapter, 413, call.error)
        # Close rather than linger reading the unwanted rest of the body: a lingering
        # connection also holds up graceful shutdown for its whole timeout.
        too_large.force_close()
        return too_large

    body: Any = None
    if body_bytes and endpoint.kind is not None:
        try:
            body = orjson.loads(body_bytes)
        except orjson.JSONDecodeError:
            body = None  # not ours to judge: the provider answers it in its own words
    ctx.model = adapter.requested_model(endpoint, body)
    ctx.is_streaming = adapter.wants_stream(endpoint, body)
    ctx.user_id = (
        request.headers.get("x-user-id")
        or adapter.request_user(body)
        or (f"key:{key_id}" if key_id else None)
    )
    call.body = body
    prepared = adapter.prepare(endpoint, body, ctx.is_streaming)
    if prepared is not None:
        body_bytes = orjson.dumps(prepared.body)
    hide_usage_chunk = prepared.hide_usage_chunk if prepared else False

    query = request.query_string
    if provider.api_key and "key=" in query:
        query = "&".join(p for p in query.split("&") if not p.startswith("key="))
    url = provider.base_url + tail + (f"?{query}" if query else "")

    assert state.session is not None
    info = CallInfo()
    try:
        try:
            upstream = await state.session.request(
                request.method, URL(url, encoded=True),
                headers=_forward_headers(request, provider, adapter),
                data=body_bytes if body_bytes else None, allow_redirects=False,
            )
        except asyncio.TimeoutError:
            call.status, call.error = 504, "upstream timed out"
            return _error_response(adapter, 504, f"upstream {provider.name} timed out")
        except aiohttp.ClientError as e:
            call.status, call.error = 502, f"upstream unreachable: {type(e).__name__}"
            return _error_response(adapter, 502, f"upstream {provider.name} unreachable ({type(e).__name__})")
        async with upstream:
            call.status = upstream.status
            ctype = upstream.headers.get("Content-Type", "")
            sse = ctype.startswith("text/event-stream")
            json_array_stream = endpoint.stream and not sse and upstream.status < 400
            if sse or json_array_stream:
                tap = adapter.stream_tap(endpoint, hide_usage_chunk)
                try:
                    return await _relay_stream(request, upstream, call, tap, sse, hide_usage_chunk)
                finally:
                    info = tap.result()
            data = await upstream.read()
            call.ttft = time.perf_counter()
            if endpoint.kind is not None or upstream.status >= 400:
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    payload = None
                    if upstream.status < 400 and endpoint.kind is not None and data:
                        call.error = "upstream reply is not JSON"
                if upstream.status < 400:
                    info = adapter.parse_reply(endpoint, payload)
                else:
                    err = payload.get("error") if isinstance(payload, dict) else None
                    msg = (err.get("message") if isinstance(err, dict) else None) or data[:200].decode("utf-8", "replace")
                    call.error = f"upstream {upstream.status}: {msg}"
            return web.Response(status=upstream.status, body=data, headers=_response_headers(upstream))
    except asyncio.TimeoutError:
        call.error = call.error or "upstream timed out mid-reply"
        if call.ttft is None:
            call.status = 504
            return _error_response(adapter, 504, f"upstream {provider.name} timed out")
        raise
    except aiohttp.ClientError as e:
        # The upstream broke off while sending its reply (e.g. fewer bytes than its
        # Content-Length). Nothing sent to the client yet: answer 502, not aiohttp's 500.
        call.error = call.error or f"upstream broke off its reply: {type(e).__name__}"
        if call.ttft is None:
            call.status = 502
            return _error_response(adapter, 502, f"upstream {provider.name} broke off its reply ({type(e).__name__})")
        raise
    except asyncio.CancelledError:
        # handler_cancellation: the client went away; the upstream call is closed above.
        call.error = call.error or "client disconnected before the reply finished"
        if call.ttft is None:
            call.status = 499  # nginx's "client closed request": it got no reply at all
        raise
    finally:
        call.finish(info)


async def _relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: _Call,
    tap: Any,
    sse: bool,
    hide_usage_chunk: bool,
) -> web.StreamResponse:
    """Pass the stream through as it arrives; the tap reads a copy of every event."""
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream))
    filtering = sse and hide_usage_chunk
    # When re-framing, comment blocks (keep-alives) must be re-emitted too.
    parser: Any = SSEParser(keep_comments=filtering) if sse else JSONArrayStreamParser()
    try:
        async for chunk in upstream.content.iter_any():
            if call.ttft is None:
                call.ttft = time.perf_counter()
                # Headers go out with the first bytes: an upstream that stalls or breaks
                # before sending any still gets the client a clean 504/502, not a 200
                # followed by a second status line inside the body.
                await response.prepare(request)
            if filtering:
                # Re-frame at event boundaries so the extra usage chunk can be left out.
                out = [ev.raw for ev in parser.feed(chunk) if tap.on_event(ev.event, ev.data)]
                if out:
                    await response.write(b"".join(out))
                continue
            await response.write(chunk)
            if sse:
                for ev in parser.feed(chunk):
                    tap.on_event(ev.event, ev.data)
            else:
                for element in parser.feed(chunk):
                    tap.on_element(element)
        if sse:
            for ev in parser.flush():
                if tap.on_event(ev.event, ev.data) and filtering:
                    await response.write(ev.raw)
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        call.error = "client disconnected mid-stream"
    except aiohttp.ClientPayloadError:
        if not response.prepared:
            raise  # nothing relayed yet: the caller answers 502
        call.error = "upstream closed the stream early"
    return response
