"""Faults, framing and load: what the client gets and what the log says when things go wrong."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY, PROXY_OPENAI_KEY, make_config
from tests.support.mock_upstream import dumps, json_reply, raw_reply, split_bytes, sse, stream_reply, without_cost_comment
from tests.support.ports import free_port
from tests.support.provider_replies import (
    FLASH_USAGE,
    GPT4O_USAGE,
    anthropic_stream_events,
    chat_chunks,
    gemini_response,
    gemini_stream_chunks,
    openai_chat,
    responses_stream_events,
)
from tests.support.records import assert_no_secrets, dec

OPENAI_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

# family -> (provider, path, body, headers)
CALLS = {
    "openai": ("openai", "/v1/chat/completions", OPENAI_BODY, {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}),
    "anthropic": ("anthropic", "/v1/messages", ANTHROPIC_BODY, {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}),
    "gemini": ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GEMINI_BODY, {"x-goog-api-key": CLIENT_GEMINI_KEY}),
}


def assert_family_error(family: str, body: dict, status: int) -> str:
    """The proxy's own errors are in the family's error shape; returns the message."""
    if family == "openai":
        assert set(body["error"]) >= {"message", "type"}
        return body["error"]["message"]
    if family == "anthropic":
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
        return body["error"]["message"]
    assert body["error"]["code"] == status and body["error"]["status"] and body["error"]["message"]
    return body["error"]["message"]


def assert_zero_usage(rec: dict) -> None:
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (0, 0, 0)
    assert dec(rec["total_cost"]) == 0


# --- upstream unreachable / timeouts ------------------------------------------------


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini"])
async def test_upstream_unreachable_is_502(family, start_proxy, http):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = await start_proxy(make_config(dead))
    provider, path, body, headers = CALLS[family]
    async with http.post(f"{proxy.url}/{provider}{path}", json=body, headers=headers) as r:
        assert r.status == 502
        msg = assert_family_error(family, await r.json(), 502)
    assert "unreachable" in msg
    [rec] = await proxy.records()
    assert rec["status"] == 502 and "unreachable" in rec["error"]
    assert rec["provider"] == provider and rec["model"] in ("gpt-4o", "claude-haiku-4-5", "gemini-2.5-flash")
    assert_zero_usage(rec)
    assert_no_secrets(proxy.raw_log())


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini"])
async def test_upstream_timeout_is_504(family, mock, start_proxy, http):
    proxy = await start_proxy(make_config(mock.url, server={"read_timeout": 0.3, "connect_timeout": 1}))
    provider, path, body, headers = CALLS[family]
    mock.on(path, json_reply({"never": "sent"}, delay=3))
    t0 = time.monotonic()
    async with http.post(f"{proxy.url}/{provider}{path}", json=body, headers=headers) as r:
        assert r.status == 504
        msg = assert_family_error(family, await r.json(), 504)
    assert time.monotonic() - t0 < 2
    assert "timed out" in msg
    [rec] = await proxy.records()
    assert rec["status"] == 504 and "timed out" in rec["error"]
    assert_zero_usage(rec)


async def test_upstream_connect_timeout_is_504(start_proxy, http):
    """A listener whose accept queue is full: SYNs are dropped and connect() hangs."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{port}", server={"connect_timeout": 0.3}))
        t0 = time.monotonic()
        provider, path, body, headers = CALLS["anthropic"]
        async with http.post(f"{proxy.url}/{provider}{path}", json=body, headers=headers) as r:
            assert r.status == 504
            assert "timed out" in assert_family_error("anthropic", await r.json(), 504)
        assert time.monotonic() - t0 < 2
        [rec] = await proxy.records()
    finally:
        for c in fillers:
            c.close()
        srv.close()
    assert rec["status"] == 504 and "timed out" in rec["error"]
    assert_zero_usage(rec)


async def test_stream_that_stalls_before_its_first_byte_is_504(mock, start_proxy, http):
    """Headers arrive, then silence: the client must get a clean 504, not a 200 followed
    by a second status line inside the body."""
    proxy = await start_proxy(make_config(mock.url, server={"read_timeout": 0.3}))
    mock.on("/v1/chat/completions", stream_reply(mock, [3.0, b"data: [DONE]\n\n"]))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={**OPENAI_BODY, "stream": True}, headers=CALLS["openai"][3]) as r:
        assert r.status == 504
        assert_family_error("openai", await r.json(), 504)
    [rec] = await proxy.records()
    assert rec["status"] == 504 and "timed out" in rec["error"] and rec["is_streaming"] is True


async def test_stream_that_stalls_mid_reply_is_cut_and_recorded(mock, start_proxy, http):
    proxy = await start_proxy(make_config(mock.url, server={"read_timeout": 0.3}))
    events = sse(anthropic_stream_events())
    mock.on("/v1/messages", stream_reply(mock, [events[0], 3.0, *events[1:]]))
    got = b""
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3]) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):  # the client learns the stream was cut
            async for chunk in r.content.iter_any():
                got += chunk
    assert got == events[0]
    [rec] = await proxy.records()
    assert rec["status"] == 200 and "timed out" in rec["error"]
    assert rec["input_tokens"] == 3100  # known from message_start
    assert rec["ttft_ms"] is not None


# --- upstream errors pass through ---------------------------------------------------


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini"])
async def test_upstream_429_passes_through_with_headers(family, mock, proxy, http):
    provider, path, body, headers = CALLS[family]
    err = {
        "openai": {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
        "anthropic": {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached for gpt-4o"}},
        "gemini": {"error": {"code": 429, "message": "Rate limit reached for gpt-4o", "status": "RESOURCE_EXHAUSTED"}},
    }[family]
    mock.on(path, json_reply(err, status=429, headers={"retry-after": "7", "x-ratelimit-remaining-requests": "0"}))
    async with http.post(f"{proxy.url}/{provider}{path}", json=body, headers=headers) as r:
        assert r.status == 429
        assert r.headers["retry-after"] == "7" and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert await r.json() == err  # unchanged
    [rec] = await proxy.records()
    assert rec["status"] == 429 and rec["error"].startswith("upstream 429")
    assert "Rate limit reached" in rec["error"]
    assert_zero_usage(rec)


async def test_upstream_5xx_non_json_passes_through(mock, proxy, http):
    mock.on("/v1/messages", raw_reply(b"<html>Bad Gateway</html>", status=503, content_type="text/html", headers={"retry-after": "1"}))
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json=ANTHROPIC_BODY, headers=CALLS["anthropic"][3]) as r:
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert r.headers["Content-Type"].startswith("text/html")
        assert await r.read() == b"<html>Bad Gateway</html>"
    [rec] = await proxy.records()
    assert rec["status"] == 503 and rec["error"].startswith("upstream 503")
    assert_zero_usage(rec)


async def test_non_json_200_body_passes_through(mock, proxy, http):
    mock.on("/v1/chat/completions", raw_reply(b"<html>captive portal</html>", content_type="text/html"))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
        assert r.status == 200
        assert await r.read() == b"<html>captive portal</html>"
    [rec] = await proxy.records()
    assert rec["status"] == 200 and rec["error"] == "upstream reply is not JSON"
    assert rec["usage_source"] != "provider" and rec["raw_usage"] is None


@pytest.mark.parametrize("configured", [False, True])
async def test_keys_echoed_in_upstream_errors_never_reach_the_log(configured, mock, proxy, http):
    """OpenAI echoes the key it got ("Incorrect API key provided: sk-..."); this mock
    echoes it whole, and masked the way OpenAI does."""

    async def echo_key(request: web.Request, rec) -> web.Response:
        key = rec.headers["Authorization"][7:]
        masked = key[:8] + "*" * 20 + key[-4:]
        msg = f"Incorrect API key provided: {key} ({masked}). You can find your API key at https://platform.openai.com/account/api-keys."
        return web.json_response(
            {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}, status=401
        )

    mock.on("/v1/chat/completions", echo_key)
    provider = "openai-keyed" if configured else "openai"
    async with http.post(f"{proxy.url}/{provider}/v1/chat/completions", json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_api_key"
    [rec] = await proxy.records()
    assert rec["status"] == 401 and rec["error"].startswith("upstream 401: Incorrect API key provided")
    log = proxy.raw_log()
    assert_no_secrets(log, CLIENT_OPENAI_KEY, PROXY_OPENAI_KEY)
    sent_key = PROXY_OPENAI_KEY if configured else CLIENT_OPENAI_KEY
    assert sent_key[-4:] + "." not in log and sent_key[:12] not in log


async def _raw_upstream(reply: bytes):
    """A bare TCP server that sends ``reply`` to each request, then hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")), b"0"))
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_upstream_closes_mid_body_is_502(start_proxy, http):
    """Content-Length promises 1000 bytes, 19 come, then the connection closes."""
    server, url = await _raw_upstream(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"id":"chatcmpl-1",'
    )
    try:
        proxy = await start_proxy(make_config(url))
        async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
            assert r.status == 502  # was aiohttp's text/plain 500, logged as a clean 200
            assert "broke off" in assert_family_error("openai", await r.json(), 502)
        [rec] = await proxy.records()
    finally:
        server.close()
    assert rec["status"] == 502 and "broke off" in rec["error"]


async def test_upstream_stream_closed_before_any_event_is_502(start_proxy, http):
    server, url = await _raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        proxy = await start_proxy(make_config(url))
        async with http.post(
            f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3]
        ) as r:
            assert r.status == 502
            assert_family_error("anthropic", await r.json(), 502)
        [rec] = await proxy.records()
    finally:
        server.close()
    assert rec["status"] == 502 and rec["error"] and rec["is_streaming"] is True


async def test_upstream_stream_closed_mid_stream_keeps_what_came(start_proxy, http):
    first = sse(anthropic_stream_events())[0]
    chunk = b"%x\r\n%s\r\n" % (len(first), first)
    server, url = await _raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    try:
        proxy = await start_proxy(make_config(url))
        got = b""
        cut_seen = False
        async with http.post(
            f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3]
        ) as r:
            assert r.status == 200
            try:
                async for piece in r.content.iter_any():
                    got += piece
            except aiohttp.ClientPayloadError:
                cut_seen = True
        [rec] = await proxy.records()
    finally:
        server.close()
    assert got == first
    assert cut_seen  # the client can tell the stream was cut, as it could talking direct
    assert rec["status"] == 200 and "early" in rec["error"]
    assert rec["input_tokens"] == 3100  # message_start arrived


# --- the client goes away -------------------------------------------------------------


async def test_client_disconnect_mid_stream_closes_upstream_and_is_recorded(mock, proxy, http):
    events = sse(anthropic_stream_events())
    pieces = [events[0]] + [p for ev in events[1:] for p in (0.2, ev)]
    mock.on("/v1/messages", stream_reply(mock, pieces))
    r = await http.post(f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3])
    assert r.status == 200
    first = await r.content.readuntil(b"\n\n")
    assert b"message_start" in first
    r.close()  # drop the connection mid-stream
    await asyncio.wait_for(mock.disconnected.wait(), 3)  # the proxy closed its upstream call
    assert not mock.stream_done.is_set()
    [rec] = await proxy.records()
    assert rec["is_streaming"] is True and rec["status"] == 200
    assert rec["error"] and "disconnect" in rec["error"]
    assert rec["input_tokens"] == 3100 and rec["cache_write_tokens"] == 3000  # from message_start


async def test_client_disconnect_during_a_filtered_openai_stream(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=3))
    r = await http.post(f"{proxy.url}/openai/v1/chat/completions", json={**OPENAI_BODY, "stream": True}, headers=CALLS["openai"][3])
    assert b"chat.completion.chunk" in await r.content.readuntil(b"\n\n")
    r.close()
    await asyncio.wait_for(mock.disconnected.wait(), 3)
    [rec] = await proxy.records()
    assert rec["status"] == 200 and "disconnect" in rec["error"] and rec["is_streaming"] is True
    assert rec["request_id"] == "chatcmpl-x1" and rec["finish_reason"] is None


async def test_client_gives_up_before_any_reply(mock, proxy, http):
    cancelled = asyncio.Event()

    async def slow(request: web.Request, rec) -> web.Response:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    mock.on("/v1/chat/completions", slow)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json=OPENAI_BODY,
            headers=CALLS["openai"][3],
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as r:
            await r.read()
    await asyncio.wait_for(cancelled.wait(), 3)  # upstream call closed too
    [rec] = await proxy.records()
    assert rec["status"] == 499 and "disconnect" in rec["error"]
    assert rec["model"] == "gpt-4o"


# --- bodies, routing ---------------------------------------------------------------------


async def test_32_mb_request_body_goes_through(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (32 * 1024 * 1024)}]}
    data = json.dumps(big).encode()
    async with http.post(
        f"{proxy.url}/openai/v1/chat/completions", data=data, headers={**CALLS["openai"][3], "Content-Type": "application/json"}
    ) as r:
        assert r.status == 200
        assert (await r.json())["usage"]["prompt_tokens"] == 10000
    assert len(mock.requests[-1].body) == len(data)
    [rec] = await proxy.records()
    assert rec["status"] == 200 and dec(rec["total_cost"]) == Decimal("0.020")


async def test_body_over_the_limit_is_413(mock, start_proxy, http):
    proxy = await start_proxy(make_config(mock.url, server={"max_body_mb": 1}))
    mock.on("/v1/messages", json_reply({}))
    body = {**ANTHROPIC_BODY, "messages": [{"role": "user", "content": "y" * (2 * 1024 * 1024)}]}
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json=body, headers=CALLS["anthropic"][3]) as r:
        assert r.status == 413
        assert_family_error("anthropic", await r.json(), 413)
    assert mock.requests == []  # never forwarded
    t0 = time.monotonic()
    [rec] = await proxy.records()  # with the client's connection still open
    assert time.monotonic() - t0 < 2, "a connection lingering on the unread body held up shutdown"
    assert rec["status"] == 413 and rec["error"]


async def test_unknown_provider_is_404(proxy, http):
    async with http.post(f"{proxy.url}/nosuch/v1/chat/completions", json=OPENAI_BODY) as r:
        assert r.status == 404
        body = await r.json()
    assert "nosuch" in body["error"]["message"]
    # ...and like every call it is one line in the log, with nothing billed.
    [rec] = await proxy.records()
    assert (rec["provider"], rec["status"], rec["error"], rec["total_cost"]) == ("nosuch", 404, "unknown provider", 0)


# --- framing: events split across TCP reads ---------------------------------------------


async def test_openai_stream_split_in_odd_pieces(mock, proxy, http):
    """The usage chunk the proxy asked for arrives 1-11 bytes at a time; it is still
    parsed exactly and still hidden from the client."""
    events = sse([(None, c) for c in chat_chunks("gpt-4o-2024-08-06", ["Hel", "lo", "!"], GPT4O_USAGE, True)] + [(None, "[DONE]")])
    raw = b"".join(events)
    mock.on("/v1/chat/completions", stream_reply(mock, split_bytes(raw, [1, 3, 7, 2, 11], pause=0.0005)))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={**OPENAI_BODY, "stream": True}, headers=CALLS["openai"][3]) as r:
        got = await r.read()
    assert without_cost_comment(got) == b"".join(events[:-2] + events[-1:])  # everything but the choices=[] chunk
    [rec] = await proxy.records()
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"]) == (10000, 8000, 500)
    assert dec(rec["total_cost"]) == Decimal("0.020")


@pytest.mark.parametrize("sizes", [[1], [2, 5, 13]])
async def test_anthropic_and_gemini_streams_split_in_odd_pieces(sizes, mock, proxy, http):
    a_raw = b"".join(sse(anthropic_stream_events()))
    g_raw = b"".join(sse([(None, c) for c in gemini_stream_chunks()], sep="\r\n\r\n"))
    # Byte by byte only around the usage-bearing events; odd pieces elsewhere.
    mock.on("/v1/messages", stream_reply(mock, split_bytes(a_raw, sizes if sizes != [1] else [1, 1, 1, 29], pause=0.0003)))
    mock.on(
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        stream_reply(mock, split_bytes(g_raw, sizes if sizes != [1] else [1, 1, 1, 31], pause=0.0003)),
    )
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3]) as r:
        assert without_cost_comment(await r.read()) == a_raw
    async with http.post(
        f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", json=GEMINI_BODY, headers=CALLS["gemini"][3]
    ) as r:
        assert await r.read() == g_raw
    a, g = await proxy.records()
    assert (a["input_tokens"], a["output_tokens"], dec(a["total_cost"])) == (3100, 200, Decimal("0.00485"))
    assert (g["input_tokens"], g["output_tokens"], dec(g["total_cost"])) == (12000, 1000, Decimal("0.0034"))


async def test_responses_stream_split_byte_by_byte(mock, proxy, http):
    raw = b"".join(sse(responses_stream_events()))
    mock.on("/v1/responses", stream_reply(mock, split_bytes(raw, [1, 1, 1, 1, 1, 1, 1, 64], pause=0.0003)))
    async with http.post(
        f"{proxy.url}/openai/v1/responses", json={"model": "gpt-5", "input": "hi", "stream": True}, headers=CALLS["openai"][3]
    ) as r:
        assert without_cost_comment(await r.read()) == raw
    [rec] = await proxy.records()
    assert (rec["input_tokens"], rec["output_tokens"], dec(rec["total_cost"])) == (40, 210, Decimal("0.00215"))


# --- streams pass through incrementally -----------------------------------------------------

GAP = 0.4


def _incremental_cases(mock) -> dict:
    a = sse(anthropic_stream_events())
    g = sse([(None, c) for c in gemini_stream_chunks()], sep="\r\n\r\n")
    arr = [("[" if i == 0 else ",\r\n") + dumps(c) for i, c in enumerate(gemini_stream_chunks())]
    arr[-1] += "]"
    stream = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    return {
        # the filtered path (the proxy re-frames events to drop the injected usage chunk)
        "openai-filtered": (
            "/v1/chat/completions",
            openai_chat(mock, first_gap=GAP),
            "openai/v1/chat/completions",
            {**OPENAI_BODY, "stream": True},
        ),
        "anthropic": ("/v1/messages", stream_reply(mock, [a[0], GAP, *a[1:]]), "anthropic/v1/messages", {**ANTHROPIC_BODY, "stream": True}),
        "gemini-sse": (stream, stream_reply(mock, [g[0], GAP, *g[1:]]), "gemini" + stream + "?alt=sse", GEMINI_BODY),
        "gemini-array": (
            stream,
            stream_reply(mock, [arr[0].encode(), GAP, *(x.encode() for x in arr[1:])], content_type="application/json"),
            "gemini" + stream,
            GEMINI_BODY,
        ),
    }


@pytest.mark.parametrize("case", ["openai-filtered", "anthropic", "gemini-sse", "gemini-array"])
async def test_stream_passes_through_incrementally(case, mock, proxy, http):
    path, handler, url, body = _incremental_cases(mock)[case]
    mock.on(path, handler)
    family = case.split("-")[0]
    first_at = None
    async with http.post(f"{proxy.url}/{url}", json=body, headers=CALLS[family][3]) as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            if chunk and first_at is None:
                first_at = time.monotonic()
    assert mock.stream_done_at is not None and first_at is not None
    # The first event reached the client while the upstream was still waiting.
    assert mock.stream_done_at - first_at > GAP * 0.75
    [rec] = await proxy.records()
    assert rec["usage_source"] == "provider" and rec["total_cost"] is not None
    assert float(rec["ttft_ms"]) < float(rec["latency_ms"]) - GAP * 1000 * 0.75


# --- load ----------------------------------------------------------------------------------


async def test_200_concurrent_calls_give_200_well_formed_lines(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, unique_ids=True))

    def anthropic_events(rec):
        return sse(anthropic_stream_events(rid=f"msg_{mock.next_id()}"))

    mock.on("/v1/messages", stream_reply(mock, anthropic_events))
    mock.on(
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        stream_reply(mock, lambda rec: sse([(None, c) for c in gemini_stream_chunks()], sep="\r\n\r\n")),
    )

    async def one(i: int) -> int:
        kind = i % 4
        body: dict[str, Any]
        if kind == 0:
            url, body, headers = "openai/v1/chat/completions", OPENAI_BODY, CALLS["openai"][3]
        elif kind == 1:
            url, body, headers = "openai/v1/chat/completions", {**OPENAI_BODY, "stream": True}, CALLS["openai"][3]
        elif kind == 2:
            url, body, headers = "anthropic/v1/messages", {**ANTHROPIC_BODY, "stream": True}, CALLS["anthropic"][3]
        else:
            url, body, headers = ("gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEMINI_BODY, CALLS["gemini"][3])
        async with http.post(f"{proxy.url}/{url}", json=body, headers={**headers, "x-user-id": f"user-{i}"}) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    records = await proxy.records()  # parse_log checks every line's shape
    assert len(proxy.raw_log().splitlines()) == 200 and len(records) == 200
    assert sorted(r["user_id"] for r in records) == sorted(f"user-{i}" for i in range(200))
    openai_ids = [r["request_id"] for r in records if r["provider"] == "openai"]
    anthropic_ids = [r["request_id"] for r in records if r["provider"] == "anthropic"]
    assert len(set(openai_ids)) == 100 and len(set(anthropic_ids)) == 50
    expected = {"openai": Decimal("0.020"), "anthropic": Decimal("0.00485"), "gemini": Decimal("0.0034")}
    for r in records:
        assert dec(r["total_cost"]) == expected[r["provider"]] and r["error"] is None
    assert sum(dec(r["total_cost"]) for r in records) == 50 * (2 * Decimal("0.020") + Decimal("0.00485") + Decimal("0.0034"))


# --- /health -------------------------------------------------------------------------------


def _line(ts: datetime, provider: str, cost: str, tokens: int) -> str:
    stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return (
        f'{{"schema_version":1,"timestamp":"{stamp}","provider":"{provider}","status":200,"error":null,'
        f'"input_tokens":{tokens},"output_tokens":0,"total_tokens":{tokens},"input_cost":{cost},'
        f'"output_cost":0,"total_cost":{cost}}}\n'
    )


async def test_health_includes_records_already_in_the_log(mock, start_proxy, http, tmp_path):
    now = datetime.now(timezone.utc)
    log = tmp_path / "existing.jsonl"
    log.write_text(
        _line(now - timedelta(hours=2), "openai", "0.5", 1000)
        + _line(now - timedelta(minutes=5), "anthropic", "0.25", 300)
        + _line(now - timedelta(hours=30), "openai", "100", 99999)  # older than 24 h
        + "{torn line\n"
    )
    mock.on("/v1beta/models/gemini-2.5-flash:generateContent", json_reply(gemini_response(usage=FLASH_USAGE)))
    proxy = await start_proxy(make_config(mock.url), log_path=log)

    async with http.get(f"{proxy.url}/health") as r:
        assert r.status == 200
        health = json.loads(await r.read(), parse_float=Decimal)
    assert health["status"] == "healthy" and health["features"]["cost_tracking"] is True
    stats = health["cost_stats_24h"]
    assert stats["requests"] == 2 and stats["tokens"] == 1300
    assert stats["total_cost"] == Decimal("0.75")
    assert stats["provider_costs"] == {"anthropic": Decimal("0.25"), "openai": Decimal("0.5")}

    async with http.post(
        f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent", json=GEMINI_BODY, headers=CALLS["gemini"][3]
    ) as r:
        assert r.status == 200
    async with http.get(f"{proxy.url}/health") as r:
        stats = json.loads(await r.read(), parse_float=Decimal)["cost_stats_24h"]
    assert stats["requests"] == 3 and stats["tokens"] == 1300 + 13000
    assert stats["total_cost"] == Decimal("0.7534")
    assert stats["provider_costs"]["gemini"] == Decimal("0.0034")
    await proxy.stop()
    assert log.read_text().count("\n") == 5  # the old lines are kept, one appended


# --- compression, non-metered endpoints -------------------------------------------------------


async def test_gzip_replies_are_decoded_for_metering_and_relayed_plain(mock, proxy, http):
    """§0: the upstream compresses; the proxy must parse the decoded bytes and must not
    forward a Content-Encoding that no longer applies."""
    mock.on("/v1beta/models/gemini-2.5-flash:generateContent", json_reply(gemini_response(usage=FLASH_USAGE), gzip=True))
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events()), gzip=True))
    async with http.post(f"{mock.url}/v1/messages", json={}, auto_decompress=False) as r:  # the mock really compresses
        assert r.headers["Content-Encoding"] == "gzip" and (await r.read())[:2] == b"\x1f\x8b"
    async with http.post(
        f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        json=GEMINI_BODY,
        headers=CALLS["gemini"][3],
        auto_decompress=False,
    ) as r:
        assert "Content-Encoding" not in r.headers
        assert json.loads(await r.read())["usageMetadata"] == FLASH_USAGE
    async with http.post(
        f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=CALLS["anthropic"][3], auto_decompress=False
    ) as r:
        assert "Content-Encoding" not in r.headers
        assert without_cost_comment(await r.read()) == b"".join(sse(anthropic_stream_events()))
    g, a = await proxy.records()
    assert g["error"] is None and a["error"] is None
    assert dec(g["total_cost"]) == Decimal("0.0034") and dec(a["total_cost"]) == Decimal("0.00485")


async def test_non_metered_endpoint_passes_through_with_a_zero_record(mock, proxy, http):
    models = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    mock.on("/v1/models", json_reply(models))
    async with http.get(f"{proxy.url}/openai-keyed/v1/models?limit=5", headers=CALLS["openai"][3]) as r:
        assert r.status == 200 and await r.json() == models
    sent = mock.requests[-1]
    assert sent.method == "GET" and sent.query["limit"] == "5"
    assert sent.headers["Authorization"] == f"Bearer {PROXY_OPENAI_KEY}"
    [rec] = await proxy.records()
    assert rec["endpoint"] == "/openai-keyed/v1/models" and rec["status"] == 200 and rec["error"] is None
    assert rec["ip_address"] == "127.0.0.1"
    assert_zero_usage(rec)  # no tokens used: 0, not null


# --- what the client sends, exactly as sent ---------------------------------------------


async def test_percent_encoded_path_is_metered_like_the_decoded_one(mock, proxy, http):
    """The provider decodes `complet%69ons`; so must metering (or it is a free pass)."""
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/v1beta/models/gemini-2.5-flash:generateContent", json_reply(gemini_response(usage=FLASH_USAGE)))
    url = aiohttp.client.URL(f"{proxy.url}/openai/v1/chat/complet%69ons", encoded=True)
    async with http.post(url, json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
        assert r.status == 200
    url = aiohttp.client.URL(f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent", encoded=True)
    async with http.post(url, json=GEMINI_BODY, headers=CALLS["gemini"][3]) as r:
        assert r.status == 200
    chat, gem = await proxy.records()
    assert chat["endpoint"] == "/openai/v1/chat/completions" and dec(chat["total_cost"]) == Decimal("0.020")
    assert gem["model"] == "gemini-2.5-flash" and dec(gem["total_cost"]) == Decimal("0.0034")


async def test_percent_encoded_provider_name_keeps_the_upstream_path(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    url = aiohttp.client.URL(f"{proxy.url}/%6Fpenai/v1/chat/completions", encoded=True)
    async with http.post(url, json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
        assert r.status == 200
    assert mock.requests[0].path == "/v1/chat/completions"
    [rec] = await proxy.records()
    assert rec["provider"] == "openai" and rec["total_tokens"] == 10500


async def test_query_string_goes_upstream_as_sent(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    url = aiohttp.client.URL(f"{proxy.url}/openai/v1/chat/completions?q=%23frag&z=1", encoded=True)
    async with http.post(url, json=OPENAI_BODY, headers=CALLS["openai"][3]) as r:
        assert r.status == 200
    assert dict(mock.requests[0].query) == {"q": "#frag", "z": "1"}


async def test_gzip_request_body_is_forwarded_decoded_and_labelled_so(mock, proxy, http):
    import gzip as gz

    mock.on("/v1/chat/completions", openai_chat(mock))
    headers = {**CALLS["openai"][3], "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with http.post(
        f"{proxy.url}/openai/v1/chat/completions", data=gz.compress(json.dumps(OPENAI_BODY).encode()), headers=headers
    ) as r:
        assert r.status == 200
    sent = mock.requests[0]
    assert "Content-Encoding" not in sent.headers and sent.json == OPENAI_BODY
    [rec] = await proxy.records()
    assert rec["model"] == "gpt-4o" and dec(rec["total_cost"]) == Decimal("0.020")


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini"])
async def test_unreadable_request_body_is_400_in_family_format_and_recorded(family, mock, proxy, http):
    provider, path, body, headers = CALLS[family]
    async with http.post(
        f"{proxy.url}/{provider}{path}",
        data=json.dumps(body).encode(),
        headers={**headers, "Content-Encoding": "gzip", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400
        assert_family_error(family, await r.json(), 400)
    assert mock.requests == []  # never forwarded
    [rec] = await proxy.records()
    assert rec["status"] == 400 and "unreadable request body" in rec["error"] and rec["total_cost"] == 0
