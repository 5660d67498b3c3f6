"""The aiohttp shell: forward each call, tap its reply, price it, log one record."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from .analytics import RollingWindow, cost_units, records_since, units_to_usd
from .attribution import attribute, is_proxy_header
from .budgets import BudgetState, Subject, ledger_for, money, refusal_message, replay_log, worst_case_usage
from .config import Config, ProviderConfig
from .logwriter import JsonlWriter
from .catalog import pricebook_for
from .estimate import estimate_input_tokens, warm_up
from .keys import KeyStore
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
        # aiohttp has already decoded a compressed request body: it goes upstream plain.
        "content-encoding",
    }
)
# With a configured provider key, a client credential in any family's key header stays
# here (a proxy key sent in the "wrong" header must not reach the provider either).
_ANY_KEY_HEADER = frozenset(h for a in ADAPTERS.values() for h in a.key_headers)
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
    keys: KeyStore | None = None  # with auth: configured
    budgets: Any = None  # budgets.BudgetLedger, with budgets: or auth: configured
    tasks: set[asyncio.Task[None]] | None = None  # webhook posts in flight


def load_window(path: Path, window: RollingWindow, now: float) -> int:
    """Rebuild the 24-hour window from the log so /health survives restarts."""
    n = 0
    for rec in records_since(path, now - window.seconds):
        window.add(rec)
        n += 1
    return n


def create_app(config: Config, log_path: str | os.PathLike[str] | None = None, *, clock: Any = time.time) -> web.Application:
    """``clock`` (epoch seconds) drives budget periods; tests move it across boundaries."""
    app = web.Application(client_max_size=config.max_body_mb * 1024 * 1024)
    path = Path(log_path or os.environ.get("COST_TRACKING_FILE") or DEFAULT_LOG)
    window = RollingWindow()
    writer = None
    if config.cost_tracking:
        load_window(path, window, time.time())
        writer = JsonlWriter(path)
    state = ProxyState(config, pricebook_for(config), writer, window, warned_unpriced=set())
    app[APP_STATE] = state
    _setup_access(state, path, clock)
    if state.budgets is not None:  # a signal per response costs; only when there are budgets
        app.on_response_prepare.append(_add_budget_headers)

    async def on_startup(app: web.Application) -> None:
        # The tokenizer's vocabulary takes ~1 s and ~140 MB to load, holding the
        # interpreter meanwhile: load it before listening rather than stall live calls.
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.read_timeout),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def on_cleanup(app: web.Application) -> None:
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=3)  # webhook posts time out after 2 s
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
    if state.budgets is not None:
        body["budgets"] = _budget_health(state, request)
    return web.Response(body=dumps_json(body), content_type="application/json")


def dumps_json(obj: Any) -> bytes:
    return orjson.dumps(obj, default=json_default)


def _error_response(adapter: Adapter, status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(adapter.error_body(status, message)), content_type="application/json")


class _Call:
    """Per-call bookkeeping shared by the buffered and streamed paths."""

    __slots__ = ("state", "provider", "adapter", "endpoint", "ctx", "t0", "ttft", "status", "error", "secrets", "body", "hold")

    def __init__(self, state: ProxyState, provider: ProviderConfig, adapter: Adapter, endpoint: Endpoint, ctx: CallContext, secrets: tuple[str | None, ...]) -> None:
        self.state, self.provider, self.adapter, self.endpoint, self.ctx = state, provider, adapter, endpoint, ctx
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.status = 0
        self.error: str | None = None
        self.secrets = secrets
        self.body: Any = None
        self.hold: Any = None  # a budget reservation, settled in finish()

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
                    log.warning("%s/%s Cost: Not calculated (no pricing configured)", ctx.provider, _printable(model))
        if self.hold is not None:
            # Release the worst-case reservation and add the real cost (unknown or unpriced: 0).
            hold, self.hold = self.hold, None
            state.budgets.settle(hold, cost_units(cost.total_cost) if cost is not None else None)
        latency = (time.perf_counter() - self.t0) * 1000
        ttft = (self.ttft - self.t0) * 1000 if self.ttft is not None else None
        record = build_record(
            ctx, info, usage=usage, status=self.status, error=error, latency_ms=latency, ttft_ms=ttft,
            usage_source=source, price=price, cost=cost, price_variant=variant,
        )
        console = None
        if ctx.metered or usage is not None:
            # Unpriced: the once-per-model warning above carries the full explanation.
            total = record["total_cost"]  # 0 for calls nobody bills, None when unpriced
            cost_text = f"${format(total.normalize(), 'f')}" if total is not None else "unpriced"
            console = (
                f"{_console_time()} INFO 💵 Cost Tracking: {ctx.provider}/{_printable(record['response_model'] or ctx.model)} | "
                f"tokens in={record['input_tokens']} out={record['output_tokens']} "
                f"(cache read={record['cache_read_tokens']} write={record['cache_write_tokens']}) | "
                f"Cost: {cost_text} | {self.status} {latency:.0f}ms"
            )
        state.writer.write(dumps_record(record), console)
        state.window.add(record, ctx.timestamp)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str | None) -> str:
    """Client-chosen text (a model name) made safe for a terminal line."""
    return _UNPRINTABLE.sub("?", text[:200]) if text else "?"


def _host(url: str) -> str:
    """A webhook URL's host only: Slack-style webhook paths are secrets."""
    return URL(url).host or "?"


_console_second: tuple[int, str] = (0, "")


def _console_time() -> str:
    """The logging module's asctime format, without a LogRecord per call."""
    global _console_second
    now = time.time()
    sec = int(now)
    if _console_second[0] != sec:
        _console_second = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
    return f"{_console_second[1]},{int((now - sec) * 1000):03d}"


_FINGERPRINTS: dict[str, str] = {}


def _key_fingerprint(key: str) -> str:
    # Clients send the same few keys on every call: hash each once.
    fp = _FINGERPRINTS.get(key)
    if fp is None:
        if len(_FINGERPRINTS) > 4096:
            _FINGERPRINTS.clear()
        fp = _FINGERPRINTS[key] = fingerprint(key)
    return fp


def _forward_headers(request: web.Request, provider: ProviderConfig, adapter: Adapter) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        low = name.lower()
        if low in _HOP or (low[:2] == "x-" and is_proxy_header(low)):
            continue
        if provider.api_key and low in _ANY_KEY_HEADER:
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
        # Still one record: a misconfigured client shows up in the log, not only in its own errors.
        unknown = ProviderConfig(name=name, type="openai", base_url="")
        ctx = CallContext(timestamp=time.time(), provider=name, family="unknown",
                          endpoint="/" + request.match_info["tail"], ip_address=request.remote)
        call = _Call(state, unknown, ADAPTERS["openai"], Endpoint(None), ctx, ())
        return _refuse(call, 404, "unknown provider",
                       f"unknown provider '{name}'; configured: {', '.join(state.config.providers)}")
    adapter = ADAPTERS[provider.type]
    # Upstream gets the path as the client encoded it; metering classifies the decoded
    # path, which is what the provider will act on (so `complet%69ons` is still metered).
    raw_tail = "/" + request.rel_url.raw_path[1:].partition("/")[2]
    path = "/" + request.match_info["tail"]
    endpoint = adapter.endpoint(path, request.method)
    started = time.time()

    client_key = adapter.client_key(request.headers, request.query)
    key_id = _key_fingerprint(client_key) if client_key else None
    ctx = CallContext(
        timestamp=started, provider=name, family=provider.type, endpoint=path,
        key_id=key_id, ip_address=request.remote, metered=endpoint.kind is not None,
    )
    call = _Call(state, provider, adapter, endpoint, ctx, (client_key, provider.api_key))

    try:
        body_bytes = await request.read()
    except RequestPayloadError as e:
        # A body that cannot be read (e.g. labelled gzip but not gzip): answer it in the
        # family's words, as the provider would, and record it.
        return _refuse(call, 400, f"unreadable request body: {type(e.__cause__ or e).__name__}",
                       "The request body could not be read (check its Content-Encoding).")
    except asyncio.CancelledError:
        call.status, call.error = 499, "client disconnected while sending its request"
        call.finish(CallInfo())
        raise
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
    denied = _admit(state, request, adapter, endpoint, call, body, client_key)
    if denied is not None:
        return denied
    call.body = body
    prepared = adapter.prepare(endpoint, body, ctx.is_streaming)
    if prepared is not None:
        body_bytes = orjson.dumps(prepared.body)
    hide_usage_chunk = prepared.hide_usage_chunk if prepared else False

    query = request.rel_url.raw_query_string  # as sent: decoding would turn %23 into a fragment
    if provider.api_key and "key=" in query:
        query = "&".join(p for p in query.split("&") if not p.startswith("key="))
    url = provider.base_url + raw_tail + (f"?{query}" if query else "")

    assert state.session is not None
    info = CallInfo()
    # Check-and-reserve against the budgets, then straight into the try whose finally
    # settles it: nothing in between can fail or yield to another call.
    denied = _reserve(state, request, adapter, endpoint, call, body, body_bytes)
    if denied is not None:
        return denied
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
            if upstream.status >= 400 and provider.api_key and provider.api_key.encode() in data:
                data = data.replace(provider.api_key.encode(), b"[redacted]")  # ours, never the client's to see
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
    parser: Any = SSEParser(keep_comments=filtering, keep_raw=filtering) if sse else JSONArrayStreamParser()
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
            # Read the chunk before relaying it: if the client leaves on exactly the
            # chunk that carries the usage, the usage is still ours.
            if sse:
                for ev in parser.feed(chunk):
                    tap.on_event(ev.event, ev.data)
            else:
                for element in parser.feed(chunk):
                    tap.on_element(element)
            await response.write(chunk)
        if sse:
            for ev in parser.flush():
                if tap.on_event(ev.event, ev.data) and filtering:
                    await response.write(ev.raw)
        if not tap.complete and upstream.status < 400:
            call.error = "upstream stream ended before its final event"
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        call.error = "client disconnected mid-stream"
    except aiohttp.ClientPayloadError:
        if not response.prepared:
            raise  # nothing relayed yet: the caller answers 502
        call.error = "upstream closed the stream early"
        # Pass the cut on: ending our reply cleanly would tell the client the stream was
        # complete. Dropping the connection leaves its body unterminated, as upstream's was.
        if request.transport is not None:
            request.transport.abort()
    return response


# --- proxy keys, attribution and budgets (config `auth:` / `budgets:`) -------------------

# Per-request state between the hooks (typed keys where aiohttp has them, 3.12+).
_RequestKey: Any = getattr(web, "RequestKey", None)
_KEY_ENTRY: Any = _RequestKey("lcp_key_entry", object) if _RequestKey else "lcp_key_entry"
_BUDGET_HEADERS: Any = _RequestKey("lcp_budget_headers", dict) if _RequestKey else "lcp_budget_headers"
# One message for a missing, unknown or revoked key: the reply says nothing about which
# (the record's `error` does, for the operator).
_BAD_KEY = "Invalid or missing proxy key. Send a key from `python -m proxy keys create` in this API's usual key header."


def _setup_access(state: ProxyState, log_path: Path, clock: Any) -> None:
    """Key store and budget ledger, the ledger rebuilt from the log's current periods."""
    config = state.config
    if config.auth is not None:
        state.keys = KeyStore(config.auth.keys_file, config.auth.admin_hashes)
        if not state.keys.entries:
            log.warning("auth: no keys in %s yet; create one with `python -m proxy keys create --user NAME`", config.auth.keys_file)
    if not config.cost_tracking or (config.budgets is None and config.auth is None):
        if config.auth is not None and state.keys is not None and state.keys.budget_limits():
            log.warning("budgets: per-key budgets are not enforced with cost tracking off")
        return
    state.budgets = ledger_for(config.budgets, config.auth, clock)
    state.tasks = set()
    t0 = time.perf_counter()
    read, counted = replay_log(state.budgets, log_path)
    if config.budgets is not None or read:
        log.info("budgets: rebuilt from %d records of the current periods in %.2fs", counted, time.perf_counter() - t0)


async def _add_budget_headers(request: web.Request, response: web.StreamResponse) -> None:
    extra = request.get(_BUDGET_HEADERS)
    if extra:
        response.headers.update(extra)


def _refuse(call: _Call, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Answer the call ourselves, in its family's error format, and record it."""
    call.status, call.error = status, error
    call.finish(CallInfo())
    resp = _error_response(call.adapter, status, message)
    if headers:
        resp.headers.update(headers)
    return resp


def _admit(state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: _Call,
           body: Any, client_key: str | None) -> web.Response | None:
    """Authenticate the proxy key (with auth:), attribute the call, check the key's
    model allowlist. A response when the call stops here (401/403)."""
    ctx = call.ctx
    entry = None
    keys = state.keys
    if keys is not None:
        keys.refresh()
        entry = keys.lookup(client_key)
    owner = entry.owner if entry is not None and not entry.revoked else None
    att = attribute(request.headers, adapter.request_user(body), owner, ctx.key_id)
    ctx.user_id, ctx.team, ctx.session_id, ctx.tags = att.user_id, att.team, att.session_id, att.tags
    if keys is None:
        return None
    if entry is None or entry.revoked:
        why = "no proxy key" if not client_key else ("revoked proxy key" if entry is not None else "unknown proxy key")
        return _refuse(call, 401, f"auth: {why}", _BAD_KEY)
    request[_KEY_ENTRY] = entry
    if entry.models is not None:
        if endpoint.kind is None and request.method not in ("GET", "HEAD", "OPTIONS"):
            return _refuse(call, 403, "auth: key limited to models; endpoint not metered",
                           "This key may only call model endpoints (chat, messages, responses, embeddings, generateContent).")
        if endpoint.kind is not None and not entry.allows(ctx.model):
            return _refuse(call, 403, f"auth: model {ctx.model!r} not allowed for this key",
                           f"Model {ctx.model!r} is not allowed for this key; allowed: {', '.join(entry.models)}.")
    return None


def _worst_case_units(state: ProxyState, ctx: CallContext, endpoint: Endpoint, body: Any, raw: bytes) -> int:
    """The most this call can cost: estimated input at the input rate (as a cache write
    if it asks for caching; no cache-read discount) plus its whole output cap at the
    output rate, for the requested service tier. An unpriced model reserves 0."""
    budgets = state.config.budgets
    cap = budgets.default_max_output_tokens if budgets is not None else 4096
    usage = worst_case_usage(body, raw, endpoint.kind, estimate_input_tokens(body, ctx.model), cap)
    tier = body.get("service_tier") if isinstance(body, dict) and isinstance(body.get("service_tier"), str) else None
    priced = price_call(
        state.prices, provider=ctx.provider, family=ctx.family, model=ctx.model, response_model=None,
        usage=usage, when=ctx.timestamp_dt, service_tier=tier,
    )
    return (cost_units(priced.cost.total_cost) or 0) if priced.cost is not None else 0


def _reserve(state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: _Call,
             body: Any, raw: bytes) -> web.Response | None:
    """Check every budget that applies and reserve the call's worst case, in one
    synchronous step (atomic under asyncio). A 429 response when a budget refuses."""
    ledger = state.budgets
    if ledger is None or endpoint.kind is None:
        return None
    ctx = call.ctx
    cfg = state.config.budgets
    override = bool(cfg is not None and cfg.override)
    admin_key = request.headers.get("x-budget-override")
    if admin_key:
        call.secrets = (*call.secrets, admin_key)
        if state.keys is not None and state.keys.is_admin(admin_key):
            override = True
    entry = request.get(_KEY_ENTRY)
    extra = (entry.limit,) if entry is not None and entry.limit is not None else ()
    worst = _worst_case_units(state, ctx, endpoint, body, raw)
    subject = Subject(ctx.user_id, ctx.team, ctx.key_id, ctx.session_id, ctx.tags)
    decision = ledger.reserve(subject, worst, extra, override)  # no await: check + reserve are one step
    if decision.hold is None:
        refused = decision.refused
        assert refused is not None
        return _refuse(call, 429, f"budget exceeded: {refused.name}", refusal_message(refused, worst),
                       {"x-should-retry": "false"})  # the SDKs' retry loop would only hit the same wall
    call.hold = decision.hold
    if decision.overridden:
        ctx.budget_override = True
        if admin_key and not (cfg is not None and cfg.override):
            assert decision.refused is not None
            log.warning("budget override (admin header): %s let through past %s", ctx.user_id or ctx.key_id or "a call", decision.refused.name)
    if decision.warnings:
        top = decision.warnings[0]
        tight = decision.tightest or top
        pct = "over 100%" if top.fraction == float("inf") else f"at {int(top.fraction * 100)}%"
        request[_BUDGET_HEADERS] = {
            "x-budget-remaining": format(units_to_usd(tight.remaining), "f"),
            "x-budget-warning": _header_text(f"{top.name} {pct}"),
        }
    for s in decision.new_warnings:
        _budget_alert(state, s)
    return None


def _header_text(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe=" :=*'@+-._/%,()")


def _budget_alert(state: ProxyState, s: BudgetState) -> None:
    """Once per budget and period: a log line, and a POST to the webhook if configured."""
    pct = "over 100" if s.fraction == float("inf") else f"{int(s.fraction * 100)}"
    log.warning("budget warning: %s at %s%% (%s of %s spent or held), resets %s",
                s.name, pct, money(s.used), money(s.limit.units), s.as_dict()["resets_at"] or "never")
    url = state.config.budgets.webhook if state.config.budgets is not None else None
    if not url or state.session is None or state.tasks is None:
        return
    payload = {**s.as_dict(), "percent": None if s.fraction == float("inf") else round(s.fraction * 100, 1)}
    task = asyncio.get_running_loop().create_task(_post_webhook(state.session, url, payload))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _post_webhook(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> None:
    """Fire and forget: 2 s at most, failures logged, never felt by the call."""
    try:
        async with session.post(url, data=dumps_json(payload), headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=2)) as r:
            if r.status >= 300:
                log.warning("budget webhook at %s answered %s", _host(url), r.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        log.warning("budget webhook at %s failed: %s", _host(url), type(e).__name__)


def _budget_health(state: ProxyState, request: web.Request) -> dict[str, Any]:
    """Counts for everyone; each budget's detail only for an admin key (Authorization: Bearer)."""
    keys = state.keys
    extra = []
    if keys is not None:
        keys.refresh()
        extra = keys.budget_limits()
    out: dict[str, Any] = state.budgets.summary(extra)
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if keys is not None and token and keys.is_admin(token):
        out["detail"] = [s.as_dict() for s in state.budgets.states(extra)]
    return out
