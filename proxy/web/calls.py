"""One call's bookkeeping (``Call``): its record built, priced, settled against its
budget hold and handed to the log writer, once; console lines; ``refuse``."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from typing import Any, Callable

import orjson
from aiohttp import web

from proxy.budgets import Hold
from proxy.config import ProviderConfig
from proxy.core.estimate import estimate_input_tokens
from proxy.core.money import cost_units, format_usd
from proxy.core.policy import billed_usage
from proxy.core.records import CallContext, build_record, dumps_record, json_default, new_record_id, redact
from proxy.core.reply_cost import cost_headers
from proxy.core.usage import CallInfo, Usage
from proxy.pricing import price_call
from proxy.providers import Adapter, Endpoint
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")

UNKNOWN_PROVIDER = "(unknown)"  # /health counts calls to providers clients invent under this
_MAX_WARNED = 1024
# How long a reply waits for its record while the disk is slow before going out anyway.
_WRITE_WAIT = 2.0

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def console_safe(text: str | None) -> str:
    """Client-chosen text (a model name) made safe for a terminal line."""
    return _UNPRINTABLE.sub("?", text[:200]) if text else "?"


_console_second: tuple[int, str] = (0, "")


def _console_time() -> str:
    """The logging module's asctime format, without a LogRecord per call."""
    global _console_second
    now = time.time()
    sec = int(now)
    if _console_second[0] != sec:
        _console_second = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
    return f"{_console_second[1]},{int((now - sec) * 1000):03d}"


def dumps_json(obj: Any) -> bytes:
    return orjson.dumps(obj, default=json_default)


def error_response(adapter: Adapter, status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(adapter.error_body(status, message)), content_type="application/json")


class Call:
    """Per-call bookkeeping shared by the buffered and streamed paths."""

    __slots__ = (
        "state",
        "provider",
        "adapter",
        "endpoint",
        "ctx",
        "t0",
        "ttft",
        "status",
        "error",
        "secrets",
        "body",
        "input_estimate",
        "hold",
        "info",
        "finished",
        "pending",
        "record_id",
        "record",
        "attribute",
    )

    def __init__(
        self,
        state: ProxyState,
        provider: ProviderConfig,
        adapter: Adapter,
        endpoint: Endpoint,
        ctx: CallContext,
        secrets: tuple[str | None, ...],
    ) -> None:
        self.state, self.provider, self.adapter, self.endpoint, self.ctx = state, provider, adapter, endpoint, ctx
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.status = 0
        self.error: str | None = None
        self.secrets = secrets
        self.body: Any = None
        self.input_estimate: int | None = None  # precomputed for bodies digested off the loop
        self.hold: Hold | None = None  # a budget reservation, settled in finish()
        self.info = CallInfo()
        self.finished = False
        self.pending: asyncio.Future[bool] | None = None  # the record on its way to the kernel
        # Known from the start: a stream's headers (sent before its record exists) name it.
        self.record_id = new_record_id()
        self.record: dict[str, Any] | None = None  # as built (exact Decimals), once finished
        # Who made the call, when nothing needed to know before forwarding: worked out
        # as the call is recorded (web/forward.py _check_body).
        self.attribute: Callable[[], object] | None = None

    def input_tokens(self, model: str | None) -> int:
        if self.input_estimate is not None:
            return self.input_estimate
        return estimate_input_tokens(self.body, model)

    def _usage(self, info: CallInfo, error: str | None) -> tuple[Usage | None, str | None]:
        return billed_usage(
            info,
            model=self.ctx.model,
            status=self.status,
            metered=self.ctx.metered,
            error=error,
            input_tokens=self.input_tokens if self.body is not None else None,
        )

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
                if self.attribute is not None:
                    attribute, self.attribute = self.attribute, None
                    attribute()
                record, console, units = self._record(info)
                line = dumps_record(record)
            except Exception as e:
                log.error("metering failed on a %s call (%s): recorded without its cost", self.ctx.provider, type(e).__name__)
                record, console = self._bare_record(f"metering failed: {type(e).__name__}"), None
                line = dumps_record(record)
        finally:
            if self.hold is not None and state.budgets is not None:
                hold, self.hold = self.hold, None
                state.budgets.settle(hold, units)
        if state.writer is None:
            return None
        scrubbed, console = _scrub(line, console, self.secrets)
        self.pending = state.writer.write(scrubbed, console)
        self.record = record
        if scrubbed is not line:
            # A key echoed into a field: everything else sees the record as the log has it.
            record = orjson.loads(scrubbed)
        window_rec = record if self.ctx.family != "unknown" else {**record, "provider": UNKNOWN_PROVIDER}
        state.window.add(window_rec, self.ctx.timestamp)
        state.publish(window_rec, scrubbed)
        state.changes.notify()
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
        """The reply, once its record is written, with the call's cost in its headers
        (a stream's went out with its first bytes: its cost is in its last line)."""
        await self.written()
        if self.record is not None and not response.prepared and self.state.config.replies.cost_headers:
            response.headers.update(cost_headers(self.record))
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
                state.prices,
                provider=ctx.provider,
                family=ctx.family,
                model=ctx.model,
                response_model=info.response_model,
                usage=usage,
                when=ctx.timestamp_dt,
                service_tier=info.service_tier,
                speed=info.speed,
            )
            price, cost, variant = priced.price, priced.cost, priced.variant
            if price is None:
                self._warn_unpriced(info.response_model or ctx.model or "?")
        latency = (time.perf_counter() - self.t0) * 1000
        ttft = (self.ttft - self.t0) * 1000 if self.ttft is not None else None
        record = build_record(
            ctx,
            info,
            usage=usage,
            status=self.status,
            error=error,
            latency_ms=latency,
            ttft_ms=ttft,
            usage_source=source,
            price=price,
            cost=cost,
            price_variant=variant,
            record_id=self.record_id,
        )
        console = None
        writer = state.writer
        if (ctx.metered or usage is not None) and writer is not None and writer.console:
            # Unpriced: the once-per-model warning carries the full explanation.
            total = record["total_cost"]  # 0 for calls nobody bills, None when unpriced
            cost_text = format_usd(total, exact=True) if total is not None else "unpriced"
            console = (
                f"{_console_time()} INFO 💵 Cost Tracking: {ctx.provider}/{console_safe(record['response_model'] or ctx.model)} | "
                f"tokens in={record['input_tokens']} out={record['output_tokens']} "
                f"(cache read={record['cache_read_tokens']} write={record['cache_write_tokens']}) | "
                f"Cost: {cost_text} | {self.status} {latency:.0f}ms"
            )
        units = cost_units(cost.total_cost) if cost is not None else None
        return record, console, units

    def _bare_record(self, error: str) -> dict[str, Any]:
        """The record of a call whose metering failed: who, what, when, and why no cost."""
        latency = (time.perf_counter() - self.t0) * 1000
        return build_record(
            self.ctx,
            CallInfo(usage_error=error),
            usage=None,
            status=self.status,
            error=redact(self.error or error, self.secrets)[:300],
            latency_ms=latency,
            ttft_ms=None,
            usage_source=None,
            price=None,
            cost=None,
            record_id=self.record_id,
        )

    def _warn_unpriced(self, model: str) -> None:
        warned = self.state.warned_unpriced
        key = (self.ctx.provider, model)
        if warned is None or key in warned or len(warned) >= _MAX_WARNED:
            return  # bounded: client-chosen names must not grow memory
        warned.add(key)
        log.warning(
            "%s/%s Cost: Not calculated (no pricing configured)", console_safe(self.ctx.provider), console_safe(redact(model, self.secrets))
        )


def refuse(call: Call, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Answer the call ourselves, in its family's error format, and record it."""
    call.status, call.error = status, error
    call.finish(CallInfo())
    resp = error_response(call.adapter, status, message)
    if headers:
        resp.headers.update(headers)
    return resp


@functools.lru_cache(maxsize=1024)
def _json_escaped(secret: str) -> bytes:
    """The key as it appears inside a JSON string; the same few keys on every call."""
    return orjson.dumps(secret)[1:-1]


def _scrub(line: bytes, console: str | None, secrets: tuple[str | None, ...]) -> tuple[bytes, str | None]:
    """An upstream may echo a key into any field a record keeps (model, id, tier,
    usage), not only into its error: no key goes to the log or the console. Short
    placeholder keys ("EMPTY", "ollama") are no secret, and may be part of a model name."""
    for s in secrets:
        if s and len(s) >= 16:
            escaped = _json_escaped(s)
            if escaped in line:
                line = line.replace(escaped, b"[redacted]")
            if console is not None and s in console:
                console = console.replace(s, "[redacted]")
    return line, console
