"""A call forwarded: ``handle_proxy`` takes it from the request to the upstream and
back, through the checks before forwarding; the path and query sent upstream; a whole
(non-streamed) reply read for its usage."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from typing import Any
from urllib.parse import unquote, unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from proxy.config import ProviderConfig
from proxy.core.records import CallContext, cap_name, fingerprint
from proxy.core.redaction import redact_bytes
from proxy.core.usage import CallInfo
from proxy.providers import ADAPTERS, Endpoint
from proxy.storage.redis_ledger import RedisLedger
from proxy.web.access import admit, authenticate, identify, reserve, reserve_shared
from proxy.web.bodies import BodyDigest, UnreadableBody, parse_json
from proxy.web.calls import Call, console_safe, error_response, refuse
from proxy.web.headers import forward_headers, response_headers
from proxy.web.relay import relay_stream, tap_result
from proxy.web.state import APP_STATE, ProxyState
from proxy.web.upload import digest_request, read_body, upload_body


def _cut_by_us(state: ProxyState, request: web.Request) -> bool:
    """A cancelled call was cut by our shutdown, not by its client. aiohttp marks the
    request before cancelling its handler: with the connection's error (an OSError) when
    the client left, with CancelledError when its shutdown grace period ran out. So a
    client that gives up during the grace period is still the client's doing."""
    if not state.shutting_down:
        return False
    return not isinstance(request.content.exception(), OSError)


_FINGERPRINTS: dict[str, str] = {}


def _key_fingerprint(key: str) -> str:
    # Clients send the same few keys on every call: hash each once.
    fp = _FINGERPRINTS.get(key)
    if fp is None:
        if len(_FINGERPRINTS) > 4096:
            _FINGERPRINTS.clear()
        fp = _FINGERPRINTS[key] = fingerprint(key)
    return fp


def has_dot_segment(raw_path: str) -> bool:
    """True if any decoding of the path (upstreams differ in how often they decode)
    has a ``.`` or ``..`` segment, with ``/`` or ``\\`` as separator: such a path can
    climb out of the provider's base path, and metering could not classify it."""
    if "." not in raw_path and "%" not in raw_path:
        return False  # no dot, and none encoded: every call's path but a few
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
    call, raw_tail, client_key = _start_call(state, request, name, provider)
    denied = _check_before_body(state, request, call, raw_tail, client_key)
    if denied is not None:
        return await call.done(denied)
    body_bytes = await _read_request_body(state, request, call, client_key)
    if isinstance(body_bytes, web.StreamResponse):
        return await call.done(body_bytes)
    digest = await _digest_call(state, call, body_bytes)
    body = digest.body if digest is not None else None
    denied = _check_body(state, request, call, digest, body, client_key)
    if denied is not None:
        return await call.done(denied)
    url, body_bytes, hide_usage_chunk = _upstream_request(state, request, call, digest, body, body_bytes, raw_tail, client_key)

    # Check-and-reserve against the budgets, then straight into the try that settles
    # it: nothing in between can fail. In process, check and reserve are one synchronous
    # step (no other call runs between them); with the ledger in Redis (budgets.backend)
    # they are one script there, awaited: a client that leaves meanwhile has its hold
    # released when the script answers; a worker that dies leaves one that expires.
    if isinstance(state.budgets, RedisLedger):
        denied = await reserve_shared(state, request, call.adapter, call.endpoint, call, body, digest)
    else:
        denied = reserve(state, request, call.adapter, call.endpoint, call, body, digest)
    if denied is not None:
        return await call.done(denied)
    try:
        response = await _forward(request, call, URL(url, encoded=True), body_bytes, hide_usage_chunk)
    except BaseException:
        call.finish()
        raise
    return await call.done(response)


def _start_call(state: ProxyState, request: web.Request, name: str, provider: ProviderConfig) -> tuple[Call, str, str | None]:
    """The call's bookkeeping, from the request line and headers: the call, the path
    to send upstream, and the key the client presented."""
    adapter = ADAPTERS[provider.type]
    # Upstream gets the path as the client encoded it; metering classifies the decoded
    # path, which is what the provider will act on (so `complet%69ons` is still metered).
    raw_tail = "/" + request.rel_url.raw_path[1:].partition("/")[2]
    path = "/" + request.match_info["tail"]
    endpoint = adapter.endpoint(path, request.method)
    client_key = adapter.client_key(request.headers, request.query)
    ctx = CallContext(
        timestamp=time.time(),
        provider=name,
        family=provider.type,
        # The path the client called on the proxy, as the user guide has it (schema 2),
        # not the path sent upstream, which depends on how base_url is written.
        endpoint=cap_name(f"/{name}{path}"),
        key_id=_key_fingerprint(client_key) if client_key else None,
        ip_address=request.remote,
        metered=endpoint.kind is not None,
        billable=endpoint.billable,
        model=cap_name(endpoint.model),
    )
    return Call(state, provider, adapter, endpoint, ctx, (client_key, provider.api_key)), raw_tail, client_key


def _check_before_body(state: ProxyState, request: web.Request, call: Call, raw_tail: str, client_key: str | None) -> web.Response | None:
    """The checks the path and headers settle (dot segments, the proxy key): a
    response when the call stops here (400/401)."""
    if has_dot_segment(raw_tail):
        identify(state, request, call, client_key, None)
        return refuse(call, 400, "path has dot segments", "The request path must not contain '.' or '..' segments, in any encoding.")
    if state.keys is not None:
        # Authenticate before reading the body: an unknown caller's 64 MB is not ours to parse.
        return authenticate(state, request, call, client_key)
    return None


async def _read_request_body(state: ProxyState, request: web.Request, call: Call, client_key: str | None) -> bytes | web.Response:
    """The request body, or the response refusing it (400 unreadable, 413 too large)."""
    try:
        return await read_body(request, state.config.max_body_mb * 1024 * 1024)
    except RequestPayloadError as e:
        # A body that cannot be read (e.g. labelled gzip but not gzip): answer it in the
        # family's words, as the provider would, and record it.
        identify(state, request, call, client_key, None)
        return refuse(
            call,
            400,
            f"unreadable request body: {type(e.__cause__ or e).__name__}",
            "The request body could not be read (check its Content-Encoding).",
        )
    except asyncio.CancelledError:
        identify(state, request, call, client_key, None)
        call.status = 499
        call.error = (
            "proxy shut down while the client was sending its request"
            if _cut_by_us(state, request)
            else "client disconnected while sending its request"
        )
        call.finish()
        raise
    except web.HTTPRequestEntityTooLarge:
        identify(state, request, call, client_key, None)
        too_large = refuse(
            call, 413, f"request body over {state.config.max_body_mb} MB", f"request body over {state.config.max_body_mb} MB"
        )
        # Close rather than linger reading the unwanted rest of the body: a lingering
        # connection also holds up graceful shutdown for its whole timeout.
        too_large.force_close()
        return too_large


async def _digest_call(state: ProxyState, call: Call, body_bytes: bytes) -> BodyDigest | None:
    """The body digested for metering (metered endpoints only); the call learns the
    model it asks for and whether it streams."""
    adapter, endpoint, ctx = call.adapter, call.endpoint, call.ctx
    digest: BodyDigest | None = None
    if body_bytes and endpoint.kind is not None:
        digest = await digest_request(state, call.provider.type, endpoint, body_bytes)
    body = digest.body if digest is not None else None
    ctx.model = cap_name(adapter.requested_model(endpoint, body))
    ctx.is_streaming = adapter.wants_stream(endpoint, body)
    return digest


def _check_body(
    state: ProxyState, request: web.Request, call: Call, digest: BodyDigest | None, body: Any, client_key: str | None
) -> web.Response | None:
    """The checks that need the body (the key's model allowlist, a body that cannot
    be priced under budgets): a response when the call stops here (400/401/403)."""
    if state.keys is None and state.budgets is None:
        # No key to check, no budget to hold: nothing before forwarding needs to know
        # who is calling. The call is attributed as it is recorded (Call.finish), not on
        # the way upstream: code and objects cold at the start of every call, ~40 us
        # between a call's arrival and its request upstream (sequential streams, bench/).
        call.attribute = functools.partial(identify, state, request, call, client_key, body)
        return None
    denied = admit(state, request, call.adapter, call.endpoint, call, body, client_key)
    if denied is not None:
        return denied
    if digest is not None and digest.unreadable and state.budgets is not None:
        # A body we cannot read is a call we cannot price: under budgets, not sent.
        return refuse(call, 400, f"request body is not JSON: {digest.unreadable}", "The request body is not valid JSON.")
    return None


def _upstream_request(
    state: ProxyState,
    request: web.Request,
    call: Call,
    digest: BodyDigest | None,
    body: Any,
    body_bytes: bytes,
    raw_tail: str,
    client_key: str | None,
) -> tuple[str, bytes, bool]:
    """What goes upstream: the URL (encoded), the body, and whether the reply's usage
    chunk is ours alone. The call keeps the body for estimates."""
    provider = call.provider
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
    return url, body_bytes, hide_usage_chunk


async def _forward(request: web.Request, call: Call, url: URL, body_bytes: bytes, hide_usage_chunk: bool) -> web.StreamResponse:
    """Send the call upstream and relay the reply; ``call.info`` gets what the reply says."""
    state, provider, adapter, endpoint = call.state, call.provider, call.adapter, call.endpoint
    assert state.session is not None
    secret = provider.api_key
    try:
        try:
            upstream = await state.session.request(
                request.method,
                url,
                headers=forward_headers(request, provider, adapter, call.secrets[0] if state.keys is not None else None),
                data=upload_body(body_bytes),
                allow_redirects=False,
            )
        except asyncio.TimeoutError:
            call.status, call.error = 504, "upstream timed out"
            return error_response(adapter, 504, f"upstream {provider.name} timed out")
        except aiohttp.ClientError as e:
            call.status, call.error = 502, f"upstream unreachable: {type(e).__name__}"
            return error_response(adapter, 502, f"upstream {provider.name} unreachable ({type(e).__name__})")
        async with upstream:
            call.status = upstream.status
            ctype = upstream.headers.get("Content-Type", "")
            sse = ctype.startswith("text/event-stream")
            json_array_stream = endpoint.stream and not sse and upstream.status < 400
            if sse or json_array_stream:
                tap = adapter.stream_tap(endpoint, hide_usage_chunk)
                try:
                    return await relay_stream(request, upstream, call, tap, sse, hide_usage_chunk)
                finally:
                    call.info = tap_result(tap, call)
            data = await upstream.read()
            call.ttft = time.perf_counter()
            if endpoint.kind is not None or upstream.status >= 400:
                _read_reply(call, upstream.status, data)
            if secret:
                data = redact_bytes(data, secret.encode())  # ours, never the client's to see
            return web.Response(status=upstream.status, body=data, headers=response_headers(upstream, secret))
    except asyncio.TimeoutError:
        call.error = call.error or "upstream timed out mid-reply"
        if call.ttft is None:
            call.status = 504
            return error_response(adapter, 504, f"upstream {provider.name} timed out")
        raise
    except aiohttp.ClientError as e:
        # The upstream broke off while sending its reply (e.g. fewer bytes than its
        # Content-Length). Nothing sent to the client yet: answer 502, not aiohttp's 500.
        call.error = call.error or f"upstream broke off its reply: {type(e).__name__}"
        if call.ttft is None:
            call.status = 502
            return error_response(adapter, 502, f"upstream {provider.name} broke off its reply ({type(e).__name__})")
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


def _read_reply(call: Call, status: int, data: bytes) -> None:
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


async def _unknown_provider(state: ProxyState, request: web.Request, name: str) -> web.StreamResponse:
    # Still one record: a misconfigured client shows up in the log, not only in its own errors.
    unknown = ProviderConfig(name=name, type="openai", base_url="")
    ctx = CallContext(
        timestamp=time.time(),
        provider=cap_name(name) or name,
        family="unknown",
        endpoint=cap_name(f"/{name}/{request.match_info['tail']}"),
        ip_address=request.remote,
    )
    call = Call(state, unknown, ADAPTERS["openai"], Endpoint(None), ctx, ())
    identify(state, request, call, None, None)
    # The names of the configured providers are not the business of an unauthenticated caller.
    return await call.done(
        refuse(
            call,
            404,
            "unknown provider",
            f"Unknown provider {console_safe(name[:64])!r}: the first path segment must name a provider configured on this proxy.",
        )
    )
