"""The aiohttp shell: forward each call, tap its reply, price it, log one record."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from .analytics import RollingWindow, cost_units, records_since, units_to_usd
from .attribution import attribute, is_proxy_header
from .bodies import OFFLOAD_BYTES, BodyDigest, UnreadableBody, digest_offloaded, parse_json
from .bodies import digest as digest_body
from .budgets import BudgetState, Subject, ledger_for, money, refusal_message, replay_log, unpriced_refusal_message, worst_case_usage
from .catalog import model_output_limit, pricebook_for
from .config import Config, ProviderConfig
from .estimate import estimate_input_tokens, warm_up
from .keys import KeyStore
from .logwriter import JsonlWriter
from .pricing import PriceBook, price_call
from .providers import ADAPTERS, Adapter, Endpoint
from .records import CallContext, build_record, cap_name, dumps_record, fingerprint, json_default, redact
from .redaction import StreamRedactor, redact_bytes, redact_headers
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
    shutting_down: bool = False  # set at SIGTERM: calls cut from here on were cut by us
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def body_pool(self) -> ProcessPoolExecutor:
        """One worker process for digesting huge request bodies, started on first need."""
        if self._pool is None:
            import multiprocessing

            # spawn: a fork of a process with threads (the log writer) is not safe.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool


APP_STATE = web.AppKey("proxy_state", ProxyState)


def load_window(path: Path, window: RollingWindow, now: float) -> int:
    """Rebuild the 24-hour window from the log so /health survives restarts."""
    n = 0
    for rec in records_since(path, now - window.seconds):
        if rec.get("provider_type") == "unknown":
            rec = {**rec, "provider": UNKNOWN_PROVIDER}
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

    async def on_shutdown(app: web.Application) -> None:
        state.shutting_down = True

    async def on_cleanup(app: web.Application) -> None:
        if state._pool is not None:
            state._pool.shutdown(wait=False, cancel_futures=True)
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=3)  # webhook posts time out after 2 s
        if state.session is not None:
            await state.session.close()
        if state.writer is not None:
            # Runs after in-flight calls finished: every record is on disk.
            await asyncio.get_running_loop().run_in_executor(None, state.writer.close)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/health", handle_health)
    # [\s\S], not ".": a path with an encoded line break (%0A) is a call like any other.
    app.router.add_route("*", r"/{provider}/{tail:[\s\S]*}", handle_proxy)
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

    __slots__ = ("state", "provider", "adapter", "endpoint", "ctx", "t0", "ttft", "status", "error", "secrets",
                 "body", "input_estimate", "hold", "info", "finished", "pending")

    def __init__(self, state: ProxyState, provider: ProviderConfig, adapter: Adapter, endpoint: Endpoint, ctx: CallContext,
                 secrets: tuple[str | None, ...]) -> None:
        self.state, self.provider, self.adapter, self.endpoint, self.ctx = state, provider, adapter, endpoint, ctx
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.status = 0
        self.error: str | None = None
        self.secrets = secrets
        self.body: Any = None
        self.input_estimate: int | None = None  # precomputed for bodies digested off the loop
        self.hold: Any = None  # a budget reservation, settled in finish()
        self.info = CallInfo()
        self.finished = False
        self.pending: asyncio.Future[bool] | None = None  # the record on its way to the kernel

    def _input_tokens(self, model: str | None) -> int:
        if self.input_estimate is not None:
            return self.input_estimate
        return estimate_input_tokens(self.body, model)

    def _usage(self, info: CallInfo, error: str | None) -> tuple[Usage | None, str | None]:
        """The reply's usage; or, when it never came, an estimate from the request and
        the text relayed so far (the provider bills a call it accepted either way)."""
        usage, text = info.usage, info.output_text
        if info.usage_error:
            return None, None  # the reply reported usage we cannot believe: cost unknown
        accepted = 200 <= self.status < 400 or self.status == 499
        if not (self.ctx.metered and accepted):
            return usage, "provider" if usage is not None else None
        if usage is None:
            if self.body is None:
                return None, None
            model = info.response_model or self.ctx.model
            output = text.tokens() if text is not None else 0
            return Usage(input_tokens=self._input_tokens(model), output_tokens=output), "estimated"
        if error and text is not None and not text.empty and info.finish_reason is None:
            # Cut short after usage began (Anthropic's message_start has only a
            # placeholder output count): the relayed text is the better output figure.
            relayed = text.tokens()
            if relayed > usage.output_tokens:
                usage.output_tokens = relayed
                return usage, "estimated"
        return usage, "provider"

    def finish(self, info: CallInfo | None = None) -> asyncio.Future[bool] | None:
        """Record the call, once: price it, settle its budget hold, hand the record to
        the writer. Returns a future while the record waits for a slow disk. Nothing
        raised in here may cost the client its reply, or the call its record."""
        if self.finished:
            return self.pending
        self.finished = True
        info = self.info if info is None else info
        state = self.state
        units: int | None = None
        line = console = None
        try:
            try:
                record, console, units = self._record(info)
                line = dumps_record(record)
            except Exception as e:
                log.error("metering failed on a %s call (%s): recorded without its cost", self.ctx.provider, type(e).__name__)
                record, console = self._bare_record(f"metering failed: {type(e).__name__}"), None
                line = dumps_record(record)
        finally:
            if self.hold is not None:
                hold, self.hold = self.hold, None
                state.budgets.settle(hold, units)
        if state.writer is None:
            return None
        line, console = _scrub(line, console, self.secrets)
        self.pending = state.writer.write(line, console)
        window_rec = record if self.ctx.family != "unknown" else {**record, "provider": UNKNOWN_PROVIDER}
        state.window.add(window_rec, self.ctx.timestamp)
        return self.pending

    async def written(self) -> None:
        """Finish the call and wait (briefly) until its record is in the kernel: called
        before the reply's last byte goes out, so a SIGKILL after the client has its
        reply loses no record."""
        pending = self.finish()
        if pending is not None and not pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(pending), _WRITE_WAIT)
            except asyncio.TimeoutError:
                pass  # the disk is stuck: the record waits in memory, the reply need not

    async def done(self, response: web.StreamResponse) -> web.StreamResponse:
        await self.written()
        return response

    def _record(self, info: CallInfo) -> tuple[dict[str, Any], str | None, int | None]:
        state = self.state
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
                self._warn_unpriced(info.response_model or ctx.model or "?")
        latency = (time.perf_counter() - self.t0) * 1000
        ttft = (self.ttft - self.t0) * 1000 if self.ttft is not None else None
        record = build_record(
            ctx, info, usage=usage, status=self.status, error=error, latency_ms=latency, ttft_ms=ttft,
            usage_source=source, price=price, cost=cost, price_variant=variant,
        )
        console = None
        if ctx.metered or usage is not None:
            # Unpriced: the once-per-model warning carries the full explanation.
            total = record["total_cost"]  # 0 for calls nobody bills, None when unpriced
            cost_text = f"${format(total.normalize(), 'f')}" if total is not None else "unpriced"
            console = (
                f"{_console_time()} INFO 💵 Cost Tracking: {ctx.provider}/{_printable(record['response_model'] or ctx.model)} | "
                f"tokens in={record['input_tokens']} out={record['output_tokens']} "
                f"(cache read={record['cache_read_tokens']} write={record['cache_write_tokens']}) | "
                f"Cost: {cost_text} | {self.status} {latency:.0f}ms"
            )
        units = cost_units(cost.total_cost) if cost is not None else None
        return record, console, units

    def _bare_record(self, error: str) -> dict[str, Any]:
        """The record of a call whose metering failed: who, what, when, and why no cost."""
        latency = (time.perf_counter() - self.t0) * 1000
        return build_record(self.ctx, CallInfo(usage_error=error), usage=None, status=self.status,
                            error=redact(self.error or error, self.secrets)[:300], latency_ms=latency,
                            ttft_ms=None, usage_source=None, price=None, cost=None)

    def _warn_unpriced(self, model: str) -> None:
        warned = self.state.warned_unpriced
        key = (self.ctx.provider, model)
        if warned is None or key in warned or len(warned) >= _MAX_WARNED:
            return  # bounded: client-chosen names must not grow memory
        warned.add(key)
        log.warning("%s/%s Cost: Not calculated (no pricing configured)", _printable(self.ctx.provider),
                    _printable(redact(model, self.secrets)))


def _cut_by_us(state: ProxyState, request: web.Request) -> bool:
    """A cancelled call was cut by our shutdown, not by its client. aiohttp marks the
    request before cancelling its handler: with the connection's error (an OSError) when
    the client left, with CancelledError when its shutdown grace period ran out. So a
    client that gives up during the grace period is still the client's doing."""
    if not state.shutting_down:
        return False
    return not isinstance(request.content.exception(), OSError)


def _scrub(line: bytes, console: str | None, secrets: tuple[str | None, ...]) -> tuple[bytes, str | None]:
    """An upstream may echo a key into any field a record keeps (model, id, tier,
    usage), not only into its error: no key goes to the log or the console. Short
    placeholder keys ("EMPTY", "ollama") are no secret, and may be part of a model name."""
    for s in secrets:
        if s and len(s) >= 16:
            escaped = orjson.dumps(s)[1:-1]  # the key as it appears inside a JSON string
            if escaped in line:
                line = line.replace(escaped, b"[redacted]")
            if console is not None and s in console:
                console = console.replace(s, "[redacted]")
    return line, console


UNKNOWN_PROVIDER = "(unknown)"  # /health counts calls to providers clients invent under this
_MAX_WARNED = 1024
# How long a reply waits for its record while the disk is slow before going out anyway.
_WRITE_WAIT = 2.0
# After a stream's final event, how long to wait for the upstream to end it before
# writing the record and sending the rest (normally the end follows at once).
_TAIL_WAIT = 1.0

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


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


def _forward_headers(request: web.Request, provider: ProviderConfig, adapter: Adapter, proxy_key: str | None = None) -> CIMultiDict[str]:
    """``proxy_key``: the proxy key the client presented (with auth:). It never goes
    upstream, whatever header carries it (Azure's ``api-key``, a cookie)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        low = name.lower()
        if low in _HOP or (low[:2] == "x-" and is_proxy_header(low)):
            continue
        if provider.api_key and low in _ANY_KEY_HEADER:
            continue
        if proxy_key and proxy_key in value:
            continue
        headers.add(name, value)
    if provider.api_key:
        name, value = adapter.auth_header(provider.api_key)
        headers[name] = value
    return headers


def _response_headers(resp: aiohttp.ClientResponse, secret: str | None) -> CIMultiDict[str]:
    return redact_headers(((n, v) for n, v in resp.headers.items() if n.lower() not in _RESPONSE_DROP), secret)


def has_dot_segment(raw_path: str) -> bool:
    """True if any decoding of the path (upstreams differ in how often they decode)
    has a ``.`` or ``..`` segment, with ``/`` or ``\\`` as separator: such a path can
    climb out of the provider's base path, and metering could not classify it."""
    path = raw_path
    for _ in range(4):
        if any(seg in (".", "..") for seg in _SEGMENT_SPLIT.split(path)):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # still encoded after four rounds: no honest client sends that


_SEGMENT_SPLIT = re.compile(r"[/\\]")


def forwarded_query(raw: str, strip_keys: bool, proxy_key: str | None = None) -> str:
    """The query string for upstream. With a configured provider key, every ``key``
    parameter goes, however its name is encoded (``%6Bey``, ``ke%79``, ``key+``):
    the upstream decodes names before reading them, so this must too. A parameter
    holding the client's proxy key (with auth:) goes whatever its name."""
    if not raw or not (strip_keys or proxy_key):
        return raw
    if "%" not in raw and "key" not in raw.lower() and not (proxy_key and proxy_key in raw):
        return raw

    def keep(param: str) -> bool:
        name, _, value = param.partition("=")
        if strip_keys and unquote_plus(name).strip().lower() == "key":
            return False
        return not (proxy_key and proxy_key in unquote_plus(param))

    return "&".join(p for p in raw.split("&") if keep(p))


async def handle_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[APP_STATE]
    name = request.match_info["provider"]
    provider = state.config.providers.get(name)
    if provider is None:
        return await _unknown_provider(state, request, name)
    adapter = ADAPTERS[provider.type]
    # Upstream gets the path as the client encoded it; metering classifies the decoded
    # path, which is what the provider will act on (so `complet%69ons` is still metered).
    raw_tail = "/" + request.rel_url.raw_path[1:].partition("/")[2]
    path = "/" + request.match_info["tail"]
    endpoint = adapter.endpoint(path, request.method)
    client_key = adapter.client_key(request.headers, request.query)
    ctx = CallContext(
        timestamp=time.time(), provider=name, family=provider.type, endpoint=cap_name(path) or path,
        key_id=_key_fingerprint(client_key) if client_key else None, ip_address=request.remote,
        metered=endpoint.kind is not None, billable=endpoint.billable, model=cap_name(endpoint.model),
    )
    call = _Call(state, provider, adapter, endpoint, ctx, (client_key, provider.api_key))
    if has_dot_segment(raw_tail):
        _identify(state, request, call, client_key, None)
        return await call.done(_refuse(call, 400, "path has dot segments",
                                       "The request path must not contain '.' or '..' segments, in any encoding."))
    if state.keys is not None:
        # Authenticate before reading the body: an unknown caller's 64 MB is not ours to parse.
        denied = _authenticate(state, request, call, client_key)
        if denied is not None:
            return await call.done(denied)

    try:
        body_bytes = await _read_body(request, state.config.max_body_mb * 1024 * 1024)
    except RequestPayloadError as e:
        # A body that cannot be read (e.g. labelled gzip but not gzip): answer it in the
        # family's words, as the provider would, and record it.
        _identify(state, request, call, client_key, None)
        return await call.done(_refuse(call, 400, f"unreadable request body: {type(e.__cause__ or e).__name__}",
                                       "The request body could not be read (check its Content-Encoding)."))
    except asyncio.CancelledError:
        _identify(state, request, call, client_key, None)
        call.status = 499
        call.error = ("proxy shut down while the client was sending its request" if _cut_by_us(state, request)
                      else "client disconnected while sending its request")
        call.finish()
        raise
    except web.HTTPRequestEntityTooLarge:
        _identify(state, request, call, client_key, None)
        too_large = _refuse(call, 413, f"request body over {state.config.max_body_mb} MB",
                            f"request body over {state.config.max_body_mb} MB")
        # Close rather than linger reading the unwanted rest of the body: a lingering
        # connection also holds up graceful shutdown for its whole timeout.
        too_large.force_close()
        return await call.done(too_large)

    digest: BodyDigest | None = None
    if body_bytes and endpoint.kind is not None:
        digest = await _digest(state, provider.type, endpoint, body_bytes)
    body = digest.body if digest is not None else None
    ctx.model = cap_name(adapter.requested_model(endpoint, body))
    ctx.is_streaming = adapter.wants_stream(endpoint, body)
    denied = _admit(state, request, adapter, endpoint, call, body, client_key)
    if denied is not None:
        return await call.done(denied)
    if digest is not None and digest.unreadable and state.budgets is not None:
        # A body we cannot read is a call we cannot price: under budgets, not sent.
        return await call.done(_refuse(call, 400, f"request body is not JSON: {digest.unreadable}",
                                       "The request body is not valid JSON."))
    call.body = body
    if digest is not None:
        call.input_estimate = digest.input_tokens
        if digest.prepared is not None:
            body_bytes = digest.prepared
    hide_usage_chunk = digest.hide_usage_chunk if digest is not None else False
    proxy_key = client_key if state.keys is not None else None
    query = forwarded_query(request.rel_url.raw_query_string, bool(provider.api_key), proxy_key)
    if proxy_key and body_bytes and proxy_key.encode() in body_bytes:
        body_bytes = redact_bytes(body_bytes, proxy_key.encode())  # a proxy key never leaves the proxy
    url = provider.base_url + raw_tail + (f"?{query}" if query else "")

    # Check-and-reserve against the budgets, then straight into the try that settles
    # it: nothing in between can fail or yield to another call.
    denied = _reserve(state, request, adapter, endpoint, call, body, digest)
    if denied is not None:
        return await call.done(denied)
    try:
        response = await _forward(request, call, URL(url, encoded=True), body_bytes, hide_usage_chunk)
    except BaseException:
        call.finish()
        raise
    return await call.done(response)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body. A huge one is read as it arrives and joined once, in a thread
    (``bytes.join`` releases the interpreter lock for big joins): aiohttp's ``read()``
    copies it whole three times on the event loop (~25 ms a copy for 28 MB)."""
    size = request.content_length
    if size is None or size <= OFFLOAD_BYTES:
        return await request.read()
    if size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    chunks: list[bytes] = []
    got = 0
    while chunk := await request.content.readany():
        got += len(chunk)
        if got > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=got)
        chunks.append(chunk)
    return await asyncio.get_running_loop().run_in_executor(None, b"".join, chunks)


async def _digest(state: ProxyState, family: str, endpoint: Endpoint, raw: bytes) -> BodyDigest:
    if len(raw) <= OFFLOAD_BYTES:
        return digest_body(family, endpoint, raw)
    spilled = None
    try:
        pool = state.body_pool()
        loop = asyncio.get_running_loop()
        # Handed over through shared memory, written from a thread: pickling the body into
        # the worker's pipe copies it with the interpreter lock held (~40 ms for 28 MB),
        # stalling every other call; a file write releases the lock.
        spilled = await loop.run_in_executor(None, _spill, raw)
        if spilled is not None:
            return await loop.run_in_executor(pool, _digest_spilled, family, endpoint, spilled)
        return await loop.run_in_executor(pool, digest_offloaded, family, endpoint, raw)
    except (OSError, RuntimeError, BrokenProcessPool) as e:
        log.warning("body digest worker unavailable (%s): digesting on the event loop", type(e).__name__)
        return digest_body(family, endpoint, raw)
    finally:
        if spilled is not None:
            try:
                os.unlink(spilled)
            except OSError:
                pass


_SHM = "/dev/shm"


def _spill(raw: bytes) -> str | None:
    """``raw`` in a new file in shared memory (never on disk); None when there is none
    or it is full (the body is then pickled to the worker as before)."""
    if not os.path.isdir(_SHM):
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="lcp-body-", dir=_SHM)  # 0600: the caller's prompt
    except OSError:
        return None
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return path


def _digest_spilled(family: str, endpoint: Endpoint, path: str) -> BodyDigest:
    """The worker-process entry point for a spilled body."""
    with open(path, "rb") as f:
        raw = f.read()
    return digest_offloaded(family, endpoint, raw)


def _upload(body: bytes) -> Any:
    """The body as sent upstream. A huge one is written in slices: handed over as bytes
    (or as io.BytesIO), aiohttp copies it whole on the event loop (~25 ms a copy for
    28 MB), stalling every other call."""
    if not body:
        return None
    return _SlicedBody(body) if len(body) > OFFLOAD_BYTES else body


class _SlicedBody(aiohttp.payload.Payload):
    """Bytes written to the connection a slice at a time, flow-controlled (each write
    waits for the socket to drain); a Content-Length like plain bytes, and replayable
    if aiohttp retries on a stale pooled connection."""

    _autoclose = True  # memory only, nothing to close
    _SLICE = 1 << 18

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/octet-stream")
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for i in range(0, len(view), self._SLICE):
            await writer.write(view[i : i + self._SLICE])


async def _forward(request: web.Request, call: _Call, url: URL, body_bytes: bytes, hide_usage_chunk: bool) -> web.StreamResponse:
    """Send the call upstream and relay the reply; ``call.info`` gets what the reply says."""
    state, provider, adapter, endpoint = call.state, call.provider, call.adapter, call.endpoint
    assert state.session is not None
    secret = provider.api_key
    try:
        try:
            upstream = await state.session.request(
                request.method, url,
                headers=_forward_headers(request, provider, adapter, call.secrets[0] if state.keys is not None else None),
                data=_upload(body_bytes), allow_redirects=False,
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
                    call.info = _tap_result(tap, call)
            data = await upstream.read()
            call.ttft = time.perf_counter()
            if endpoint.kind is not None or upstream.status >= 400:
                _read_reply(call, upstream.status, data)
            if secret:
                data = redact_bytes(data, secret.encode())  # ours, never the client's to see
            return web.Response(status=upstream.status, body=data, headers=_response_headers(upstream, secret))
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
        # handler_cancellation: the client went away (or our shutdown ran out of time).
        if _cut_by_us(state, request):
            call.error = call.error or "proxy shut down before the reply finished"
        else:
            call.error = call.error or "client disconnected before the reply finished"
        if call.ttft is None:
            call.status = 499  # nginx's "client closed request": it got no reply at all
        raise


def _read_reply(call: _Call, status: int, data: bytes) -> None:
    """Usage and errors of a whole (non-streamed) reply; odd JSON never raises here."""
    try:
        payload = parse_json(data) if data else None
    except UnreadableBody:
        payload = None
        if status < 400 and call.endpoint.kind is not None and data:
            call.error = "upstream reply is not JSON"
    try:
        if status < 400:
            call.info = call.adapter.parse_reply(call.endpoint, payload)
        else:
            err = payload.get("error") if isinstance(payload, dict) else None
            msg = err.get("message") if isinstance(err, dict) else None
            if not isinstance(msg, str) or not msg:
                msg = data[:200].decode("utf-8", "replace")
            call.error = f"upstream {status}: {msg}"
    except Exception as e:
        call.info = CallInfo(usage_error=f"unreadable reply: {type(e).__name__}")


def _tap_result(tap: Any, call: _Call) -> CallInfo:
    try:
        info: CallInfo = tap.result()
        return info
    except Exception as e:
        return CallInfo(usage_error=f"unreadable stream: {type(e).__name__}")


class _Relay:
    """Feeds each chunk to the stream's parser and tap; returns the bytes to relay.
    A tap that raises loses its metering for the call, never the client's bytes."""

    __slots__ = ("parser", "tap", "sse", "filtering", "broken")

    def __init__(self, tap: Any, sse: bool, filtering: bool) -> None:
        # When re-framing, comment blocks (keep-alives) must be re-emitted too.
        self.parser: Any = SSEParser(keep_comments=filtering, keep_raw=filtering) if sse else JSONArrayStreamParser()
        self.tap, self.sse, self.filtering = tap, sse, filtering
        self.broken: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        tap = self.tap
        if self.filtering:
            out = []
            for ev in self.parser.feed(chunk):
                keep = True
                try:
                    keep = tap.on_event(ev.event, ev.data)
                except Exception as e:
                    self.broken = type(e).__name__
                if keep:
                    out.append(ev.raw)
            return b"".join(out)
        try:
            if self.sse:
                for ev in self.parser.feed(chunk):
                    tap.on_event(ev.event, ev.data)
            else:
                for element in self.parser.feed(chunk):
                    tap.on_element(element)
        except Exception as e:
            self.broken = type(e).__name__
        return chunk

    def flush(self) -> bytes:
        if not self.sse:
            return b""
        out = []
        for ev in self.parser.flush():
            keep = True
            try:
                keep = self.tap.on_event(ev.event, ev.data)
            except Exception as e:
                self.broken = type(e).__name__
            if keep and self.filtering:
                out.append(ev.raw)
        return b"".join(out)


async def _relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: _Call,
    tap: Any,
    sse: bool,
    hide_usage_chunk: bool,
) -> web.StreamResponse:
    """Pass the stream through as it arrives; the tap reads a copy of every event.

    Once the stream's final event is in, what is left is held until the upstream ends
    the stream, the record is written, and only then do the last bytes go out: a client
    never holds a complete reply whose record could still be lost."""
    secret = call.provider.api_key
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream, secret))
    relay = _Relay(tap, sse, sse and hide_usage_chunk)
    redactor = StreamRedactor(secret.encode()) if secret else None
    content = upstream.content
    held: list[bytes] | None = None
    try:
        while True:
            if held is None:
                chunk = await content.readany()
            else:
                try:
                    chunk = await asyncio.wait_for(content.readany(), _TAIL_WAIT)
                except asyncio.TimeoutError:
                    # An upstream that lingers after its final event: record, release, go on.
                    await _record_stream(call, tap, relay)
                    await response.write(b"".join(held))
                    held = None
                    continue
            if not chunk:
                break
            if call.ttft is None:
                call.ttft = time.perf_counter()
                # Headers go out with the first bytes: an upstream that stalls or breaks
                # before sending any still gets the client a clean 504/502, not a 200
                # followed by a second status line inside the body.
                await response.prepare(request)
            # Read the chunk before relaying it: if the client leaves on exactly the
            # chunk that carries the usage, the usage is still ours.
            out = relay.feed(chunk)
            if redactor is not None:
                out = redactor.feed(out)
            if held is not None:
                held.append(out)
            elif tap.complete and not call.finished:
                held = [out]
            elif out:
                await response.write(out)
        tail = relay.flush()
        if redactor is not None:
            tail = redactor.feed(tail) + redactor.flush()
        if not tap.complete and upstream.status < 400:
            call.error = "upstream stream ended before its final event"
        if not response.prepared:
            await response.prepare(request)
        await _record_stream(call, tap, relay)
        if held:
            await response.write(b"".join(held))
        if tail:
            await response.write(tail)
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


async def _record_stream(call: _Call, tap: Any, relay: _Relay) -> None:
    if call.finished:
        return
    info = _tap_result(tap, call)
    if relay.broken and info.usage_error is None:
        info = CallInfo(usage_error=f"unreadable stream event: {relay.broken}", request_id=info.request_id)
    call.info = info
    await call.written()


async def _unknown_provider(state: ProxyState, request: web.Request, name: str) -> web.StreamResponse:
    # Still one record: a misconfigured client shows up in the log, not only in its own errors.
    unknown = ProviderConfig(name=name, type="openai", base_url="")
    ctx = CallContext(timestamp=time.time(), provider=cap_name(name) or name, family="unknown",
                      endpoint=cap_name("/" + request.match_info["tail"]) or "/", ip_address=request.remote)
    call = _Call(state, unknown, ADAPTERS["openai"], Endpoint(None), ctx, ())
    _identify(state, request, call, None, None)
    # The names of the configured providers are not the business of an unauthenticated caller.
    return await call.done(_refuse(call, 404, "unknown provider",
                                   f"Unknown provider {_printable(name[:64])!r}: "
                                   "the first path segment must name a provider configured on this proxy."))


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


def _identify(state: ProxyState, request: web.Request, call: _Call, client_key: str | None, body: Any) -> Any:
    """Who is calling: the proxy key's entry (with auth:) and the call's attribution.
    Also run for calls refused before their body is read (413, aborted uploads), so
    their records still say whose they were."""
    ctx = call.ctx
    entry = None
    keys = state.keys
    if keys is not None:
        keys.refresh()
        entry = keys.lookup(client_key)
    owner = entry.owner if entry is not None and not entry.revoked else None
    att = attribute(request.headers, call.adapter.request_user(body), owner, ctx.key_id)
    ctx.user_id, ctx.team, ctx.session_id, ctx.tags = att.user_id, att.team, att.session_id, att.tags
    return entry


def _authenticate(state: ProxyState, request: web.Request, call: _Call, client_key: str | None) -> web.Response | None:
    """With auth: a 401 for a missing, unknown or revoked proxy key, from the headers alone."""
    entry = _identify(state, request, call, client_key, None)
    if entry is None or entry.revoked:
        why = "no proxy key" if not client_key else ("revoked proxy key" if entry is not None else "unknown proxy key")
        return _refuse(call, 401, f"auth: {why}", _BAD_KEY)
    return None


def _admit(state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: _Call,
           body: Any, client_key: str | None) -> web.Response | None:
    """Authenticate the proxy key (with auth:), attribute the call, check the key's
    model allowlist. A response when the call stops here (401/403)."""
    ctx = call.ctx
    entry = _identify(state, request, call, client_key, body)
    if state.keys is None:
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
                           f"Model {_printable(ctx.model)!r} is not allowed for this key; allowed: {', '.join(entry.models)}.")
    return None


def _worst_case_units(state: ProxyState, call: _Call, body: Any, digest: BodyDigest | None) -> int | None:
    """The most this call can cost: estimated input at the input rate (as a cache write
    if it asks for caching; no cache-read discount) plus its whole output cap at the
    output rate, for the requested service tier. None: the model has no price."""
    ctx, endpoint = call.ctx, call.endpoint
    budgets = state.config.budgets
    cap = budgets.default_max_output_tokens if budgets is not None else 4096
    flags = b""
    if digest is not None and digest.asks_cache:
        flags = b'cache_control "1h"' if digest.asks_cache_1h else b"cache_control"
    n_in = call._input_tokens(ctx.model)
    limit = model_output_limit(state.config, ctx.provider, ctx.family, ctx.model, n_in)
    usage = worst_case_usage(body, flags, endpoint.kind, n_in, cap, limit)
    tier = body.get("service_tier") if isinstance(body, dict) and isinstance(body.get("service_tier"), str) else None
    priced = price_call(
        state.prices, provider=ctx.provider, family=ctx.family, model=ctx.model, response_model=None,
        usage=usage, when=ctx.timestamp_dt, service_tier=tier,
    )
    if priced.cost is None:
        return None
    return cost_units(priced.cost.total_cost) or 0


def _reserve(state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: _Call,
             body: Any, digest: BodyDigest | None) -> web.Response | None:
    """Check every budget that applies and reserve the call's worst case, in one
    synchronous step (atomic under asyncio). A response when the call stops here:
    429 over budget, 403 for a model that cannot be priced under a budget.

    Endpoints that cost money but report no usage (images, audio, batches) reserve
    nothing but are still refused once a budget is spent."""
    ledger = state.budgets
    if ledger is None or not (endpoint.kind is not None or endpoint.billable):
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
    worst = _worst_case_units(state, call, body, digest) if endpoint.kind is not None else 0
    subject = Subject(ctx.user_id, ctx.team, ctx.key_id, ctx.session_id, ctx.tags)
    decision = ledger.reserve(subject, worst or 0, extra, override)  # no await: check + reserve are one step
    if decision.hold is None:
        refused = decision.refused
        assert refused is not None
        return _refuse(call, 429, f"budget exceeded: {refused.name}", refusal_message(refused, worst or 0),
                       {"x-should-retry": "false"})  # the SDKs' retry loop would only hit the same wall
    if worst is None and decision.tightest is not None and not override and not (cfg is not None and cfg.allow_unpriced):
        # A budget applies and this model has no price: its cost could not be held
        # against the budget, nor counted after. Refused unless configured otherwise.
        ledger.settle(decision.hold, 0)
        return _refuse(call, 403, f"unpriced model under a budget: {ctx.model!r}",
                       unpriced_refusal_message(ctx.provider, _printable(ctx.model)), {"x-should-retry": "false"})
    call.hold = decision.hold
    if decision.overridden:
        ctx.budget_override = True
        if admin_key and not (cfg is not None and cfg.override):
            assert decision.refused is not None
            log.warning("budget override (admin header): %s let through past %s",
                        ctx.user_id or ctx.key_id or "a call", decision.refused.name)
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
