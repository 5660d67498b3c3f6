"""This week's hardening, end to end: the real proxy on 127.0.0.1 in front of a real
aiohttp mock upstream, raw sockets where a client library would tidy the request up.

1. the configured provider key never reaches a client (bodies, streams, headers) nor
   the log, the console or /health;
2. a ``key`` query parameter is stripped however its name is encoded;
3. dot segments in any encoding are refused (400, in the family's format, recorded);
4. client-chosen strings are capped in records, memory and /health;
5. control, bidi and line-separator characters never reach a console line and never
   split a log line;
6. refused and cut uploads keep their caller; calls cut by our own shutdown say so;
7. odd upstream replies reach the client byte for byte, with one honest record.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import parse_config
from proxy.keys import KeyEntry, key_hash, new_key
from proxy.storage.keyfile import save_keys
from proxy.web.app import create_app
from tests.support.config import (
    ALL_KEYS,
    ANTHROPIC_MODELS,
    CLIENT_ANTHROPIC_KEY,
    CLIENT_GEMINI_KEY,
    CLIENT_OPENAI_KEY,
    GEMINI_MODELS,
    OPENAI_MODELS,
    PROXY_ANTHROPIC_KEY,
    PROXY_GEMINI_KEY,
    PROXY_OPENAI_KEY,
    make_config,
)
from tests.support.mock_upstream import json_reply, raw_reply, split_bytes, sse, stream_reply, without_cost_comment
from tests.support.provider_replies import (
    FLASH_USAGE,
    GPT4O_USAGE,
    anthropic_message,
    anthropic_stream_events,
    chat_chunks,
    chat_completion,
    gemini_response,
    gemini_stream_chunks,
    openai_chat,
)
from tests.support.records import assert_no_secrets, check_record, dec, parse_log

OPENAI_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
GEMINI_GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"

CLIENT_HEADERS = {
    "openai": {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"},
    "anthropic": {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
    "gemini": {"x-goog-api-key": CLIENT_GEMINI_KEY},
}
CONFIGURED_KEY = {"openai": PROXY_OPENAI_KEY, "anthropic": PROXY_ANTHROPIC_KEY, "gemini": PROXY_GEMINI_KEY}
# family -> (path, non-streamed body, streamed body, streamed path)
CALLS = {
    "openai": (
        "/v1/chat/completions",
        OPENAI_BODY,
        {**OPENAI_BODY, "stream": True, "stream_options": {"include_usage": True}},
        "/v1/chat/completions",
    ),
    "anthropic": ("/v1/messages", ANTHROPIC_BODY, {**ANTHROPIC_BODY, "stream": True}, "/v1/messages"),
    "gemini": (GEMINI_GEN, GEMINI_BODY, GEMINI_BODY, GEMINI_STREAM),
}
FAMILIES = ("openai", "anthropic", "gemini")
R = b"[redacted]"


def family_error(family: str, body: Any, status: int) -> str:
    """The proxy's own errors are in the family's error shape; returns the message."""
    if family == "openai":
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
    elif family == "anthropic":
        assert body["type"] == "error" and {"type", "message"} <= set(body["error"])
    else:
        assert body["error"]["code"] == status and body["error"]["status"] and body["error"]["message"]
    return body["error"]["message"]


async def raw_http(
    base: str, target: str, method: str = "POST", body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with ``target`` sent exactly as given (no client normalizes it)."""
    u = URL(base)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    head = [f"{method} {target} HTTP/1.1", f"Host: {u.host}:{u.port}", "Connection: close", f"Content-Length: {len(body)}"]
    if body:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, payload = rest.partition(b"\r\n\r\n")
    hdrs = {}
    for line in raw_headers.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        hdrs[name.strip().lower()] = value.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        out, pos = b"", 0
        while True:
            end = payload.index(b"\r\n", pos)
            size = int(payload[pos:end], 16)
            if size == 0:
                break
            out += payload[end + 2 : end + 2 + size]
            pos = end + 4 + size
        payload = out
    return int(status_line.split()[1]), hdrs, payload


async def get_health(http: aiohttp.ClientSession, url: str) -> tuple[str, dict]:
    async with http.get(f"{url}/health") as r:
        assert r.status == 200
        text = await r.text()
    return text, json.loads(text)


def keyed_auth_config(upstream: str, tmp_path: Path, **server: Any) -> tuple[dict, str, str]:
    """Every family with its configured key, and `auth:` on, with one proxy key made
    through the KeyStore API. Returns (config, proxy key, its key id)."""
    key = new_key()
    kid = key_hash(key)[:12]
    save_keys(tmp_path / "keys.yml", [KeyEntry(kid, key_hash(key), "alice", "research")])
    cfg: dict[str, Any] = {
        "providers": {
            "openai": {"base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
            "anthropic": {"base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
            "gemini": {"base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
        },
        "catalog": {"enabled": False},
        "auth": {"keys_file": str(tmp_path / "keys.yml")},
    }
    if server:
        cfg["server"] = server
    return cfg, key, kid


def all_encodings(secret: str) -> list[str]:
    """The secret as it could be spelled in a query string."""
    return [
        secret,
        quote(secret, safe=""),
        "".join(f"%{b:02X}" for b in secret.encode()),
        "".join(f"%{b:02x}" for b in secret.encode()),
        secret[4:],
    ]


# === 1. the configured key never reaches a client ======================================


def _echo_body(family: str, status: int, key: str) -> bytes:
    """A reply that echoes the configured key, twice, in the family's own shape."""
    msg = f"Incorrect API key provided: {key}. Key was {key}"
    if status >= 400:
        obj: Any = {
            "openai": {"error": {"message": msg, "type": "invalid_request_error", "code": "invalid_api_key"}},
            "anthropic": {"type": "error", "error": {"type": "authentication_error", "message": msg}},
            "gemini": {"error": {"code": status, "message": msg, "status": "UNAUTHENTICATED"}},
        }[family]
    else:
        obj = {
            "openai": chat_completion(text=msg),
            "anthropic": {**anthropic_message(), "content": [{"type": "text", "text": msg}]},
            "gemini": gemini_response(text=msg, usage={"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}),
        }[family]
    return json.dumps(obj, indent=1).encode()


@pytest.mark.parametrize("status", [200, 401, 500])
@pytest.mark.parametrize("family", FAMILIES)
async def test_configured_key_is_redacted_from_whole_replies_and_headers(family, status, mock, proxy, http, capfd, caplog):
    key = CONFIGURED_KEY[family]
    path, body, _, _ = CALLS[family]
    raw = _echo_body(family, status, key)
    mock.on(
        path,
        raw_reply(raw, status=status, content_type="application/json", headers={"x-debug-auth": f"Bearer {key}", "x-request-id": "req_1"}),
    )
    async with http.post(f"{proxy.url}/{family}-keyed{path}", json=body, headers=CLIENT_HEADERS[family]) as r:
        got = await r.read()
        assert r.status == status
        assert r.headers["x-debug-auth"] == "Bearer [redacted]" and r.headers["x-request-id"] == "req_1"
        assert all(key not in v for v in r.headers.values())
    assert key.encode() not in got
    assert got == raw.replace(key.encode(), R)
    assert mock.requests[0].headers.get(_auth_header(family), "").endswith(key)  # upstream did get it
    text, _ = await get_health(http, proxy.url)
    [rec] = await proxy.records()
    assert rec["status"] == status
    for out in (proxy.raw_log(), capfd.readouterr().err, caplog.text, text):
        assert_no_secrets(out, *ALL_KEYS)


def _auth_header(family: str) -> str:
    return {"openai": "Authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[family]


def _stream_with_key(family: str, key: str) -> tuple[bytes, str, str]:
    """(stream bytes with an error event echoing the key, streamed path, content type)."""
    msg = f"upstream auth failed for {key}; retry"
    if family.startswith("openai"):
        chunks = chat_chunks("gpt-4o-2024-08-06", ["Hel", "lo"], GPT4O_USAGE, True)
        evs = [(None, c) for c in chunks[:2]] + [(None, {"error": {"message": msg, "type": "server_error"}})]
        return b"".join(sse(evs)), "/v1/chat/completions", "text/event-stream"
    if family == "anthropic":
        events = anthropic_stream_events(error=True)
        events[-1] = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": msg}})
        return b"".join(sse(events)), "/v1/messages", "text/event-stream"
    if family == "gemini":
        chunks = gemini_stream_chunks()[:2] + [{"error": {"code": 500, "message": msg, "status": "INTERNAL"}}]
        return b"".join(sse((None, c) for c in chunks)), GEMINI_STREAM + "?alt=sse", "text/event-stream"
    # Gemini without alt=sse: one JSON array, written as it is produced.
    chunks = gemini_stream_chunks()[:2] + [{"error": {"code": 500, "message": msg, "status": "INTERNAL"}}]
    return ("[" + ",\r\n".join(json.dumps(c) for c in chunks) + "]").encode(), GEMINI_STREAM, "application/json"


@pytest.mark.parametrize("family", ["openai", "openai-reframed", "anthropic", "gemini", "gemini-array"])
async def test_key_split_across_stream_chunks_is_redacted_at_every_split_point(family, mock, proxy, http, capfd):
    """An error event inside a 200 stream echoes the key; the stream is cut at every
    point in and around the key (two pieces), and into pieces of 1..len(key)+1 bytes.
    ``openai-reframed``: the client did not ask for usage, so the proxy re-frames the
    stream at event boundaries (to hide the usage chunk it asked for)."""
    fam = family.partition("-")[0]
    key = CONFIGURED_KEY[fam].encode()
    data, path, ctype = _stream_with_key(family, key.decode())
    start = data.index(key)
    cuts: list[list[Any]] = [[data[:i], 0.002, data[i:]] for i in range(start - 2, start + len(key) + 3)]
    # Around the key, pieces of n bytes (the key in many chunks); the rest whole.
    a, b = start - 3, start + len(key) + 3
    cuts += [
        [data[:a], *split_bytes(data[a:b], [n], pause=0.0005), data[b:]] for n in (1, 2, 3, 5, 8, 13, len(key) - 1, len(key), len(key) + 1)
    ]
    cuts.append([data])
    pieces = iter(cuts)
    mock.on(path.partition("?")[0], stream_reply(mock, lambda rec: next(pieces), content_type=ctype, headers={"x-echo": key.decode()}))
    body = OPENAI_BODY | {"stream": True} if family == "openai-reframed" else CALLS[fam][2]
    expected = data.replace(key, R)
    for _ in range(len(cuts)):
        async with http.post(f"{proxy.url}/{fam}-keyed{path}", json=body, headers=CLIENT_HEADERS[fam]) as r:
            assert r.status == 200
            assert r.headers["x-echo"] == "[redacted]"
            got = await r.read()
        assert without_cost_comment(got, None) == expected
    records = await proxy.records()
    assert len(records) == len(cuts)
    for rec in records:
        assert rec["status"] == 200 and rec["is_streaming"] is True
        assert "[redacted]" in rec["error"]
    assert_no_secrets(proxy.raw_log() + capfd.readouterr().err, *ALL_KEYS)


@pytest.mark.parametrize("status", [400, 401, 429, 503])
@pytest.mark.parametrize("family", FAMILIES)
async def test_key_in_sse_error_streams_of_any_status(family, status, mock, proxy, http):
    key = CONFIGURED_KEY[family]
    data = b"".join(sse([("error", {"type": "error", "error": {"message": f"bad key {key}", "code": status}})]))
    _, _, body, spath = CALLS[family]
    path = spath + ("?alt=sse" if family == "gemini" else "")
    mid = data.index(key.encode()) + 7
    mock.on(spath, stream_reply(mock, [data[:mid], 0.01, data[mid:]], status=status))
    async with http.post(f"{proxy.url}/{family}-keyed{path}", json=body, headers=CLIENT_HEADERS[family]) as r:
        assert r.status == status
        got = await r.read()
    assert without_cost_comment(got, None) == data.replace(key.encode(), R)
    [rec] = await proxy.records()
    assert rec["status"] == status
    assert_no_secrets(proxy.raw_log(), *ALL_KEYS)


@pytest.mark.parametrize("family", FAMILIES)
async def test_key_in_compressed_replies_is_redacted_after_decoding(family, mock, proxy, http):
    """gzip on the wire would hide the key from a byte search: the proxy relays the
    decoded reply, and redacts that (whole replies and streams alike)."""
    key = CONFIGURED_KEY[family]
    path, body, sbody, spath = CALLS[family]
    whole = json.loads(_echo_body(family, 200, key))
    stream, stream_path, ctype = _stream_with_key(family, key)
    mock.on(path, json_reply(whole, gzip=True))
    results = []
    async with http.post(f"{proxy.url}/{family}-keyed{path}", json=body, headers=CLIENT_HEADERS[family]) as r:
        assert r.status == 200 and "Content-Encoding" not in r.headers
        results.append((await r.read(), json.dumps(whole).encode()))
    mock.on(stream_path.partition("?")[0], stream_reply(mock, split_bytes(stream, [40]), content_type=ctype, gzip=True))
    async with http.post(f"{proxy.url}/{family}-keyed{stream_path}", json=sbody, headers=CLIENT_HEADERS[family]) as r:
        assert r.status == 200
        results.append((await r.read(), stream))
    for got, sent in results:
        assert key.encode() in sent and without_cost_comment(got, None) == sent.replace(key.encode(), R)
    assert len(await proxy.records()) == 2
    assert_no_secrets(proxy.raw_log(), *ALL_KEYS)


@pytest.mark.parametrize("priced", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
async def test_key_echoed_in_reply_fields_stays_out_of_log_console_and_health(family, priced, mock, proxy, http, capfd, caplog):
    """An upstream that puts the key it was called with into the fields a record keeps
    (model, id, finish reason, tier, usage): the record keeps them redacted, and so
    does the once-per-model "no pricing" warning of an unpriced call."""
    key = CONFIGURED_KEY[family]
    path, body, _, _ = CALLS[family]
    if not priced:
        if family == "gemini":
            path = path.replace("gemini-2.5-flash", "gemini-9-unpriced")
        else:
            body = {**body, "model": "no-such-model"}
    if family == "openai":
        reply = {**chat_completion(model=key, rid=key), "service_tier": key}
        reply["choices"][0]["finish_reason"] = key
    elif family == "anthropic":
        reply = {**anthropic_message(model=key, rid=key), "stop_reason": key}
    else:
        reply = {
            **gemini_response(
                model=key, finish=key, usage={"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7, "trafficType": key}
            ),
            "responseId": key,
        }
    mock.on(path, json_reply(reply))
    async with http.post(f"{proxy.url}/{family}-keyed{path}", json=body, headers=CLIENT_HEADERS[family]) as r:
        assert r.status == 200
        got = await r.read()
    assert key.encode() not in got
    text, _ = await get_health(http, proxy.url)
    # Without a configured key the client's own key goes upstream; echoed back, it
    # stays out of the log too. A placeholder key ("EMPTY", as local servers take) is
    # no secret: a model name containing it is kept as it is.
    client_key = next(iter(CLIENT_HEADERS[family].values())).removeprefix("Bearer ")
    echo = json.loads(json.dumps(reply).replace(key, client_key))
    mock.on(path, json_reply(echo))
    async with http.post(f"{proxy.url}/{family}{path}", json=body, headers=CLIENT_HEADERS[family]) as r:
        assert r.status == 200
    placeholder = {"openai": {"Authorization": "Bearer EMPTY"}, "anthropic": {"x-api-key": "EMPTY"}, "gemini": {"x-goog-api-key": "EMPTY"}}[
        family
    ]
    mock.on(path, json_reply(json.loads(json.dumps(reply).replace(key, "EMPTY-model"))))
    async with http.post(f"{proxy.url}/{family}{path}", json=body, headers=placeholder) as r:
        assert r.status == 200
    records = await proxy.records()
    assert [r["status"] for r in records] == [200, 200, 200]
    assert records[0]["response_model"] == records[1]["response_model"] == "[redacted]"
    assert records[2]["response_model"] == "EMPTY-model" and records[2]["request_id"] == "EMPTY-model"
    assert (records[0]["total_cost"] is not None) == priced
    if not priced:
        assert "Not calculated" in caplog.text
    for out in (proxy.raw_log(), capfd.readouterr().err, caplog.text, text):
        assert_no_secrets(out, *ALL_KEYS)


# === 2. a `key` query parameter never leaves the proxy ================================


def _query_cases(key: str) -> list[tuple[str, bool, str]]:
    """(raw query, authenticates by it, the raw query upstream must get)."""
    enc = quote(key, safe="")
    return [
        (f"key={key}", True, ""),
        (f"%6Bey={key}", True, ""),
        (f"ke%79={key}", True, ""),
        (f"%6b%65%79={enc}", True, ""),
        ("key=" + "".join(f"%{b:02X}" for b in key.encode()), True, ""),
        (f"alt=json&k%65y={key}&x=1", True, "alt=json&x=1"),
        (f"key={key}&key={key}", True, ""),
        (f"key={key}&key=other", True, ""),
        (f"a=%2B1&key={key}&b=c%26d&%6Bey={enc}&z=&q=a+b", True, "a=%2B1&b=c%26d&z=&q=a+b"),
        # Spellings the proxy does not read as its key (nor Google as its own): the key
        # comes in the header, and they are still taken out.
        (f"KEY={key}&alt=json", False, "alt=json"),
        (f"key+={key}&alt=json", False, "alt=json"),
        (f"alt=json&Key={enc}", False, "alt=json"),
        (f"key%20={key}&alt=json", False, "alt=json"),
    ]


async def test_proxy_key_in_any_spelling_of_the_key_parameter_stays_in_the_proxy(mock, start_proxy, http, tmp_path):
    cfg, key, kid = keyed_auth_config(mock.url, tmp_path)
    proxy = await start_proxy(cfg)
    reply = gemini_response(usage={"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7})
    raw_queries: list[str] = []

    async def handler(request: web.Request, rec: Any) -> web.StreamResponse:
        raw_queries.append(request.rel_url.raw_query_string)
        return web.json_response(reply)

    mock.on(GEMINI_GEN, handler)
    cases = _query_cases(key)
    for query, authenticates, _ in cases:
        # Those that do not authenticate by query carry the key in the header too.
        headers = {} if authenticates else {"x-goog-api-key": key}
        async with http.post(URL(f"{proxy.url}/gemini{GEMINI_GEN}?{query}", encoded=True), json=GEMINI_BODY, headers=headers) as r:
            assert r.status == 200, (query, await r.text())
    assert len(mock.requests) == len(cases)
    spellings = all_encodings(key)
    for (query, _, forwarded), raw, got in zip(cases, raw_queries, mock.requests):
        assert raw == forwarded, query  # the other params byte for byte, in order
        assert got.headers["x-goog-api-key"] == PROXY_GEMINI_KEY
        seen = f"{raw} {got.path} {list(got.query.items())} {list(got.headers.items())} {got.body!r}"
        assert not any(s in seen for s in spellings), query
    records = await proxy.records()
    assert [(r["status"], r["user_id"], r["key_id"]) for r in records] == [(200, "alice", kid)] * len(cases)
    assert not any(s in proxy.raw_log() for s in spellings)

    # The other side of the rule: without a configured key (and without auth) the
    # provider needs the client's own ``?key=``: it goes upstream exactly as sent.
    plain = await start_proxy(make_config(mock.url))
    raw_queries.clear()
    for query in (f"%6Bey={CLIENT_GEMINI_KEY}&alt=json", f"key={CLIENT_GEMINI_KEY}"):
        async with http.post(URL(f"{plain.url}/gemini{GEMINI_GEN}?{query}", encoded=True), json=GEMINI_BODY) as r:
            assert r.status == 200
    assert raw_queries == [f"%6Bey={CLIENT_GEMINI_KEY}&alt=json", f"key={CLIENT_GEMINI_KEY}"]
    records = await plain.records()
    assert [r["key_id"] for r in records] == [_kid(CLIENT_GEMINI_KEY)] * 2
    assert_no_secrets(plain.raw_log())


# === 3. paths stay under the provider's base path =====================================

DOT_PATHS = {
    "openai": [
        "/v1/chat/completions/x/..",
        "/v1/chat/completions/x/../",
        "/v1/../v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/%2e%2e/v1/chat/completions",
        "/v1/%2E%2e/admin",
        "/v1/.%2E/chat/completions",
        "/v1/%2e./chat/completions",
        "/v1/%2e/chat/completions",
        "/v1/%252e%252e/chat/completions",
        "/v1/%25252e%25252e/chat/completions",
        "/v1/chat/completions%2f..",
        "/v1/chat/completions%2F%2e%2e%2Fembeddings",
        "/v1\\..\\chat/completions",
        "/v1/chat/completions%5c..%5cx",
        "/v1/chat%5C%2e%2e%5Ccompletions",
        "/..",
        "/%2e%2e/%2e%2e/etc/passwd",
    ],
    "anthropic": [
        "/v1/messages/x/..",
        "/v1/%2e%2e/v1/messages",
        "/v1/.%2e/messages",
        "/v1/%252E%252E/messages",
        "/v1\\..\\messages",
    ],
    "gemini": [
        "/v1beta/models/gemini-2.5-flash:generateContent/x/..",
        "/v1beta/models/%2e%2e/models/gemini-2.5-flash:generateContent",
        "/v1beta/models/.%2E/gemini-2.5-flash:generateContent",
        "/v1beta/%252e%252e/models/gemini-2.5-flash:generateContent",
        "/v1beta/models\\..\\x/models/gemini-2.5-flash:generateContent",
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
async def test_dot_segments_in_any_encoding_are_400_in_family_format_and_recorded(family, mock, proxy, http):
    for route in ("/v1/chat/completions", "/v1/messages", GEMINI_GEN, "/v1/embeddings", "/etc/passwd", "/admin"):
        mock.on(route, json_reply({"should": "never be reached"}))
    paths = DOT_PATHS[family]
    body = json.dumps(CALLS[family][1]).encode()
    for tail in paths:
        for provider in (family, f"{family}-keyed"):
            status, headers, payload = await raw_http(proxy.url, f"/{provider}{tail}", body=body, headers=CLIENT_HEADERS[family])
            assert status == 400, (provider, tail, payload)
            assert headers["content-type"].startswith("application/json")
            msg = family_error(family, json.loads(payload), 400)
            assert "segment" in msg
    assert mock.requests == []  # nothing reached the upstream
    # Dots inside a segment (versions, file names) and in the query are not dot segments.
    ordinary = {
        "openai": ["/v1/models/gpt-4.1..x", "/v1/files/a.b..c/content?x=../.."],
        "anthropic": ["/v1/models/claude-3.5..x", "/v1/files/...x?p=%2e%2e"],
        "gemini": ["/v1beta/models/gemini-2.5..x", "/v1beta/files/..a?y=.."],
    }[family]
    for target in ordinary:
        mock.on(target.partition("?")[0], json_reply({"ok": True}))
        status, _, _ = await raw_http(proxy.url, f"/{family}{target}", method="GET", headers=CLIENT_HEADERS[family])
        assert status == 200, target
    assert [r.path for r in mock.requests] == [t.partition("?")[0] for t in ordinary]
    records = await proxy.records()
    assert len(records) == 2 * len(paths) + len(ordinary)
    assert [r["status"] for r in records[-len(ordinary) :]] == [200] * len(ordinary)
    for rec in records[: 2 * len(paths)]:
        assert (rec["status"], rec["provider_type"]) == (400, family)
        assert rec["error"] == "path has dot segments"
        assert rec["total_cost"] == 0 and rec["total_tokens"] == 0
        assert (
            rec["key_id"] == hashlib.sha256(next(iter(CLIENT_HEADERS[family].values())).removeprefix("Bearer ").encode()).hexdigest()[:12]
        )


# === 4. client-chosen strings are capped in records, memory and /health ==================


def assert_capped(kept: str, name: str) -> None:
    """A cut name: at most ~200 characters of it, and a marker with its real length."""
    if len(name) <= 200:
        assert kept == name
        return
    marker = f"…[{len(name)} chars]"
    assert kept.endswith(marker) and len(kept) <= 200 + len(marker), kept[-40:]
    head = kept[: -len(marker)]
    assert len(head) >= 150 and name.startswith(head)


async def test_huge_client_strings_on_refused_calls_add_only_kilobytes_to_the_log(mock, start_proxy, http, tmp_path):
    cfg, key, kid = keyed_auth_config(mock.url, tmp_path)
    proxy = await start_proxy(cfg)
    mb39 = 3_900_000
    calls = [
        # (provider, path, model name, body); no key, an unknown key: 401 either way
        ("openai", "/v1/chat/completions", "gpt-4o" + "x" * mb39, None),
        ("anthropic", "/v1/messages", "claude-" + "y" * mb39, None),
        ("openai", "/v1/embeddings", "text-embedding-" + "é" * 900_000, None),
        ("openai", "/v1/responses", "o4-" + "\u2028" * 400_000, None),
        ("gemini", "/v1beta/models/{m}:generateContent", "gemini-" + "z" * 7000, GEMINI_BODY),
    ]
    for i, (provider, path, model, body) in enumerate(calls):
        if body is None:
            body = {
                "model": model,
                "max_tokens": 5,
                "user": "u" * 1_000_000,
                "metadata": {"user_id": "v" * 500_000},
                "messages": [{"role": "user", "content": "hi"}],
            }
        headers = {"x-user-id": "w" * 7000, "x-feature": "f" * 7000, "x-tag-team": "t" * 7000}
        if i % 2:
            headers[_auth_header(provider)] = "lcp-" + "Q" * 43  # unknown
        async with http.post(
            f"{proxy.url}/{provider}{path.format(m=model)}",
            data=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 401
            family_error(provider, await r.json(), 401)
    assert mock.requests == []
    records = await proxy.records()
    size = proxy.log_path.stat().st_size
    assert size < len(calls) * 3000, size  # was 18 MB
    for rec, (_, path, model, _) in zip(records, calls):
        assert rec["status"] == 401 and rec["error"].startswith("auth:")
        if "{m}" in path:
            assert_capped(rec["model"], model)
        else:
            # An unauthenticated call's body is never read: its model is unknown.
            assert rec["model"] is None
        assert len(rec["user_id"] or "") <= 128 and all(len(v) <= 128 for v in rec["tags"].values())
        assert len(rec["endpoint"]) <= 250


async def test_many_distinct_huge_model_names_do_not_stay_in_memory(mock, start_proxy, http):
    """400 distinct 1 MB model names, to a priced reply and to unpriced ones (some
    echoing the name back): the proxy keeps none of them (was ~400 MB: price lookup
    memo and the once-per-model warnings keyed by the whole names)."""
    proxy = await start_proxy(make_config(mock.url))
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    mock.on("/v1/chat/completions", json_reply(chat_completion(usage=usage)))

    async def unpriced(request: web.Request, rec: Any) -> web.Response:
        model = orjson.loads(rec.body)["model"]
        reply = chat_completion(model=model if int(model[1:5]) % 4 == 0 else "no-price", usage=usage)
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    mock.on("/compat/v1/chat/completions", unpriced)
    filler = b"n" * 1_000_000

    async def call(i: int) -> None:
        data = b'{"model":"m%04d-%s","messages":[{"role":"user","content":"hi"}]}' % (i, filler)
        route = "/openai" if i % 2 else "/compat"
        async with http.post(
            f"{proxy.url}{route}/v1/chat/completions", data=data, headers={**CLIENT_HEADERS["openai"], "Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
            await r.read()

    async def batch(ids: range) -> None:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                await call(i)

        await asyncio.gather(*(one(i) for i in ids))
        mock.requests.clear()  # the mock's own copies of the bodies

    # Traced from before the warm-up: each keep-alive connection holds on to its last
    # request (and its 1 MB body) until the next one; those must count in the base.
    tracemalloc.start()
    try:
        await batch(range(10))  # warm up: connections, caches, the tokenizer
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        await batch(range(10, 410))
        await asyncio.sleep(0.2)  # let the log writer drain
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 40 * 2**20, f"{grown / 2**20:.0f} MB kept"
    records = await proxy.records()
    assert len(records) == 410
    assert sum(r["total_cost"] is None for r in records) == 205  # the compat half is unpriced
    assert all(len(r["model"]) < 250 and len(r["response_model"]) < 250 for r in records)
    assert proxy.log_path.stat().st_size < 410 * 4000


UNKNOWN = "(unknown)"


async def test_invented_provider_names_are_one_name_in_health_and_capped_in_records(mock, start_proxy, http, tmp_path):
    mock.on("/v1/chat/completions", openai_chat(mock))
    log_path = tmp_path / "cost.jsonl"
    cfg = make_config(mock.url)
    configured = set(cfg["providers"])
    proxy = await start_proxy(cfg, log_path)
    invented = [f"nosuch{i}" for i in range(30)] + ["p" * 5000, "x%20y", "%00zz", "n\u202eame"]
    for name in invented:
        async with http.post(
            URL(f"{proxy.url}/{quote(name, safe='%')}/v1/chat/completions", encoded=True),
            json=OPENAI_BODY,
            headers=CLIENT_HEADERS["openai"],
        ) as r:
            assert r.status == 404
            msg = family_error("openai", await r.json(), 404)
        for p in configured:
            assert p not in msg  # the configured names are not told to whoever asks
        assert "\u202e" not in msg
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=OPENAI_BODY, headers=CLIENT_HEADERS["openai"]) as r:
        assert r.status == 200
    assert len(mock.requests) == 1
    text, health = await get_health(http, proxy.url)
    costs = health["cost_stats_24h"]["provider_costs"]
    assert set(costs) == {"openai", UNKNOWN} and costs[UNKNOWN] == 0
    assert health["cost_stats_24h"]["requests"] == len(invented) + 1
    assert "nosuch" not in text and "ppppp" not in text
    records = await proxy.records()
    assert len(records) == len(invented) + 1
    for rec, name in zip(records, invented):
        decoded = unquote(name)
        assert_capped(rec["provider"], decoded)
        assert (rec["status"], rec["error"], rec["provider_type"]) == (404, "unknown provider", "unknown")
    # After a restart the window is rebuilt from the log: still one name for them all.
    again = await start_proxy(cfg, log_path)
    text2, health2 = await get_health(http, again.url)
    costs2 = health2["cost_stats_24h"]["provider_costs"]
    assert set(costs2) == {"openai", UNKNOWN} and health2["cost_stats_24h"]["requests"] == len(invented) + 1
    assert "nosuch" not in text2 and "ppppp" not in text2


# === 5. control characters never reach a console line nor split a log line ===============

NASTY = [
    "\x1b[2J",
    "\x1b]0;pwned\x07",
    "\u202e",
    "\u2066",
    "\u200f",
    "\u2028",
    "\u2029",
    "\x85",
    "\x9b",
    "\r\n",
    "\x00",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x7f",
]
NASTY_MODELS = [f"gpt-4o{c}evil" for c in NASTY] + ["".join(NASTY) * 30, "\u2028" * 300, "\U0001f600\u202egpt"]


@pytest.mark.parametrize("family", FAMILIES)
async def test_control_characters_in_model_names_are_neutralised_on_console_and_escaped_in_json(family, mock, proxy, http, capfd, caplog):
    usage = {
        "openai": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        "anthropic": {"input_tokens": 10, "output_tokens": 2},
        "gemini": {"promptTokenCount": 10, "candidatesTokenCount": 2, "totalTokenCount": 12},
    }[family]

    def reply(rec: Any) -> Any:
        # The upstream echoes the (possibly odd) model name back, as OpenAI does.
        model = rec.json["model"] if family != "gemini" else rec.json["echo"]
        if family == "openai":
            return chat_completion(model=model, usage=usage)
        if family == "anthropic":
            return anthropic_message(model=model, usage=usage)
        return gemini_response(model=model, usage=usage)

    path, body, _, _ = CALLS[family]
    mock.on(path, json_reply(reply))
    for model in NASTY_MODELS:
        mock.on(f"/v1beta/models/{model}:generateContent", json_reply(reply))
    for model in NASTY_MODELS:
        if family == "gemini":
            # The model is in the path (encoded); the reply's modelVersion echoes it.
            target = f"{proxy.url}/gemini/v1beta/models/{quote(model, safe='')}:generateContent"
            req = {**body, "echo": model}
        else:
            target, req = (
                f"{proxy.url}/{family}{path}",
                {**body, "model": model, "user": f"bob{model}", "metadata": {"user_id": f"bob{model}"}},
            )
        data = json.dumps(req).encode()
        async with http.post(
            URL(target, encoded=True), data=data, headers={**CLIENT_HEADERS[family], "Content-Type": "application/json"}
        ) as r:
            assert r.status in (200, 404), await r.text()
    sent = [m for m in NASTY_MODELS]
    records = await proxy.records()
    raw = proxy.log_path.read_bytes()
    # Every splitter sees one record per line.
    assert len(raw.decode().splitlines()) == len(raw.splitlines()) == len(records) == len(sent)
    assert raw.count(b"\n") == len(records)
    for line in raw.splitlines():
        assert len(line.splitlines()) == 1
    for rec, model in zip(records, sent):
        assert rec["status"] in (200, 404)
        assert_capped(rec["model"], model)  # the JSON value decodes back to what was sent
        if rec["status"] == 200:
            assert rec["response_model"] == model[:200]
        for v in (rec["user_id"], *rec["tags"].values()):
            assert v is None or v.isprintable()
    err = capfd.readouterr().err + caplog.text
    console = [line for line in err.splitlines() if "Cost Tracking" in line]
    assert len(console) >= len(sent) - 2
    for ch in (
        "\x1b",
        "\u202e",
        "\u2066",
        "\u200f",
        "\u2028",
        "\u2029",
        "\x85",
        "\x9b",
        "\r",
        "\x00",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x7f",
        "\x07",
    ):
        assert ch not in err, repr(ch)
    # str.splitlines() of the console output: one line per call, nothing split.
    assert all("Cost Tracking" in line or "Not calculated" in line for line in err.splitlines() if line.strip()), err[:2000]


# === 6. refused and cut uploads keep their caller; our own shutdown says so ==============

WHO = {"x-user-id": "carol", "x-feature": "search", "x-tag-env": "prod", "x-session-id": "s-1"}
WHO_TAGS = {"feature": "search", "env": "prod"}


def _kid(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("family", FAMILIES)
async def test_413_record_keeps_user_key_and_tags(family, framing, mock, start_proxy, http):
    proxy = await start_proxy(make_config(mock.url, server={"max_body_mb": 1}))
    path, body, _, _ = CALLS[family]
    big = json.dumps({**body, "pad": "y" * (2 * 1024 * 1024)}).encode()

    async def chunks():  # no Content-Length: the limit is found while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with http.post(
        f"{proxy.url}/{family}{path}",
        data=big if framing == "length" else chunks(),
        headers={**CLIENT_HEADERS[family], **WHO, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
        family_error(family, await r.json(), 413)
    assert mock.requests == []
    [rec] = await proxy.records()
    client_key = next(iter(CLIENT_HEADERS[family].values())).removeprefix("Bearer ")
    assert rec["status"] == 413
    assert (rec["user_id"], rec["key_id"], rec["tags"], rec["session_id"]) == ("carol", _kid(client_key), WHO_TAGS, "s-1")


async def test_413_under_auth_keeps_the_key_owner(mock, start_proxy, http, tmp_path):
    cfg, key, kid = keyed_auth_config(mock.url, tmp_path, max_body_mb=1)
    proxy = await start_proxy(cfg)
    big = json.dumps({**ANTHROPIC_BODY, "pad": "y" * (2 * 1024 * 1024)}).encode()
    async with http.post(
        f"{proxy.url}/anthropic/v1/messages", data=big, headers={"x-api-key": key, **WHO, "Content-Type": "application/json"}
    ) as r:
        assert r.status == 413
    [rec] = await proxy.records()
    assert (rec["status"], rec["user_id"], rec["team"], rec["key_id"], rec["tags"]) == (413, "alice", "research", kid, WHO_TAGS)


async def _cut_upload(url: str, target: str, headers: dict[str, str], sent: bytes, length: int, until_server_closes: bool = False) -> None:
    """Headers promising ``length`` bytes, ``sent`` of them, then the connection closes
    (or, ``until_server_closes``, waits for the server to close it)."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    head = [
        f"POST {target} HTTP/1.1",
        f"Host: {u.host}",
        f"Content-Length: {length}",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + sent)
    await writer.drain()
    if until_server_closes:
        await asyncio.wait_for(reader.read(), 5)
    else:
        await asyncio.sleep(0.2)
    writer.close()


@pytest.mark.parametrize("size", [100_000, 3_000_000])
@pytest.mark.parametrize("family", FAMILIES)
async def test_upload_cut_mid_body_is_recorded_with_its_caller(family, size, mock, proxy):
    path, body, _, _ = CALLS[family]
    data = json.dumps({**body, "pad": "z" * size}).encode()
    await _cut_upload(proxy.url, f"/{family}{path}", {**CLIENT_HEADERS[family], **WHO}, data[:50_000], len(data))
    [rec] = await proxy.wait_records(1)
    assert mock.requests == []
    client_key = next(iter(CLIENT_HEADERS[family].values())).removeprefix("Bearer ")
    assert rec["status"] == 499 and "client disconnected while sending" in rec["error"]
    assert (rec["user_id"], rec["key_id"], rec["tags"], rec["session_id"]) == ("carol", _kid(client_key), WHO_TAGS, "s-1")
    assert len(await proxy.records()) == 1


async def _start_like_cli(cfg: dict, log_path: Path) -> tuple[web.AppRunner, str]:
    """The proxy with the runner settings ``python -m proxy`` uses, shutdown_timeout included."""
    config = parse_config(cfg, "test-config.yml")
    runner = web.AppRunner(
        create_app(config, log_path), handler_cancellation=True, shutdown_timeout=config.shutdown_timeout, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def test_calls_cut_by_our_own_shutdown_say_so(mock, http, tmp_path):
    log_path = tmp_path / "cost.jsonl"
    runner, url = await _start_like_cli(make_config(mock.url, server={"shutdown_timeout": 0.5}), log_path)
    events = sse(anthropic_stream_events())
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=5))  # long calls, no reply yet
    mock.on("/v1/messages", stream_reply(mock, [events[0], 5.0, *events[1:]]))  # a stream, mid-reply
    stalled, shutting_down = asyncio.Event(), asyncio.Event()

    async def call_waiting(path: str, body: dict, headers: dict) -> Any:
        try:
            async with http.post(url + path, json=body, headers={**headers, **WHO}) as r:
                if r.content_type == "text/event-stream":
                    await r.content.readuntil(b"\n\n")
                    stalled.set()
                return r.status, await r.read()
        except aiohttp.ClientError as e:
            return e

    async def gives_up_during_the_grace_period() -> None:
        u = URL(url)
        reader, writer = await asyncio.open_connection(u.host, u.port)
        data = json.dumps(OPENAI_BODY).encode()
        head = [
            "POST /openai-keyed/v1/chat/completions HTTP/1.1",
            f"Host: {u.host}",
            f"Content-Length: {len(data)}",
            "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in {**CLIENT_HEADERS["openai"], **WHO}.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        await shutting_down.wait()
        await asyncio.sleep(0.2)  # the client's own doing, well inside the 0.5 s grace period
        writer.close()

    tasks = [
        asyncio.create_task(call_waiting("/openai/v1/chat/completions", OPENAI_BODY, CLIENT_HEADERS["openai"])),
        asyncio.create_task(call_waiting("/anthropic/v1/messages", {**ANTHROPIC_BODY, "stream": True}, CLIENT_HEADERS["anthropic"])),
        asyncio.create_task(gives_up_during_the_grace_period()),
        asyncio.create_task(
            _cut_upload(url, f"/gemini{GEMINI_GEN}", {**CLIENT_HEADERS["gemini"], **WHO}, b'{"contents": [', 1000, until_server_closes=True)
        ),
    ]
    await asyncio.wait_for(stalled.wait(), 3)
    while len(mock.requests) < 3:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    shutting_down.set()
    await runner.cleanup()  # what SIGTERM does: stop listening, wait shutdown_timeout, cancel the rest
    assert time.monotonic() - t0 < 3
    await asyncio.gather(*tasks)
    records = parse_log(log_path.read_text())
    assert len(records) == 4
    by_provider = {r["provider"]: r for r in records}
    assert by_provider["openai"]["status"] == 499
    assert by_provider["openai"]["error"] == "proxy shut down before the reply finished"
    assert by_provider["anthropic"]["status"] == 200
    assert by_provider["anthropic"]["error"] == "proxy shut down before the reply finished"
    assert by_provider["anthropic"]["input_tokens"] == 3100  # known from message_start
    assert by_provider["gemini"]["status"] == 499
    assert by_provider["gemini"]["error"] == "proxy shut down while the client was sending its request"
    # ...and the one whose client left during the grace period is still the client's.
    assert by_provider["openai-keyed"]["status"] == 499
    assert by_provider["openai-keyed"]["error"] == "client disconnected before the reply finished"
    for rec in records:
        assert (rec["user_id"], rec["tags"]) == ("carol", WHO_TAGS)


# === 7. odd upstream replies: the client's bytes untouched, one honest record ===============

OK_OPENAI = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
OK_ANTHROPIC = {"input_tokens": 10, "output_tokens": 2}
OK_GEMINI = {"promptTokenCount": 10, "candidatesTokenCount": 2, "totalTokenCount": 12}
OK, BAD, NONE = "provider", "implausible", "estimated"
# name -> (usage field, value): counts no real reply carries
GARBAGE_COUNTS = {
    "negative": -5,
    "fractional": 10.5,
    "string": "12",
    "huge_float": 1e308,
    "huge_int": 10**30,
    "list": [3],
    "object": {"n": 3},
    "bool": True,
}


def _odd_nonstream(family: str) -> list[tuple[str, bytes, str]]:
    """(case, reply bytes, what the record's usage must be: OK, BAD or NONE)"""
    out: list[tuple[str, str | bytes, str]] = []
    if family == "openai":
        base = chat_completion(usage=OK_OPENAI)
        out += [
            ("model_int", json.dumps({**base, "model": 123}), OK),
            ("tier_object", json.dumps({**base, "service_tier": {"tier": "flex"}}), OK),
            ("choices_object", json.dumps({**base, "choices": {"0": {"finish_reason": "stop"}}}), OK),
            ("message_list", json.dumps({**base, "choices": [{"message": [], "finish_reason": ["stop"]}]}), OK),
            ("details_list", json.dumps({**base, "usage": {**OK_OPENAI, "prompt_tokens_details": [1]}}), OK),
            ("whole_floats", json.dumps({**base, "usage": {"prompt_tokens": 10.0, "completion_tokens": 2.0, "total_tokens": 12}}), OK),
            ("usage_list", json.dumps({**base, "usage": [OK_OPENAI]}), BAD),
            ("usage_string", json.dumps({**base, "usage": "lots"}), BAD),
        ]
        out += [(f"prompt_{n}", json.dumps({**base, "usage": {**OK_OPENAI, "prompt_tokens": v}}), BAD) for n, v in GARBAGE_COUNTS.items()]
        out += [("cached_negative", json.dumps({**base, "usage": {**OK_OPENAI, "prompt_tokens_details": {"cached_tokens": -1}}}), BAD)]
    elif family == "anthropic":
        base = anthropic_message(usage=OK_ANTHROPIC)
        out += [
            ("model_int", json.dumps({**base, "model": 123}), OK),
            ("content_object", json.dumps({**base, "content": {"type": "text"}, "stop_reason": 7}), OK),
            ("cache_creation_list", json.dumps({**base, "usage": {**OK_ANTHROPIC, "cache_creation": [1]}}), OK),
            ("tier_object", json.dumps({**base, "usage": {**OK_ANTHROPIC, "service_tier": {"x": 1}}}), OK),
            ("usage_list", json.dumps({**base, "usage": [1, 2]}), BAD),
        ]
        out += [(f"input_{n}", json.dumps({**base, "usage": {**OK_ANTHROPIC, "input_tokens": v}}), BAD) for n, v in GARBAGE_COUNTS.items()]
        out += [("output_huge", json.dumps({**base, "usage": {**OK_ANTHROPIC, "output_tokens": 10**30}}), BAD)]
    else:
        base = gemini_response(usage=OK_GEMINI)
        out += [
            ("model_int", json.dumps({**base, "modelVersion": 123, "responseId": [1]}), OK),
            ("candidates_object", json.dumps({**base, "candidates": {"0": {}}}), OK),
            ("parts_object", json.dumps({**base, "candidates": [{"content": {"parts": {"text": "x"}}, "finishReason": 3}]}), OK),
            ("traffic_object", json.dumps({**base, "usageMetadata": {**OK_GEMINI, "trafficType": {"a": 1}}}), OK),
            ("usage_list", json.dumps({**base, "usageMetadata": [OK_GEMINI]}), BAD),
        ]
        out += [
            (f"prompt_{n}", json.dumps({**base, "usageMetadata": {**OK_GEMINI, "promptTokenCount": v}}), BAD)
            for n, v in GARBAGE_COUNTS.items()
        ]
        out += [("thoughts_negative", json.dumps({**base, "usageMetadata": {**OK_GEMINI, "thoughtsTokenCount": -700}}), BAD)]
    # Not even an object: no usage at all, so the accepted call is estimated from the request.
    out += [
        ("top_list", json.dumps([1, "a", None]), NONE),
        ("top_null", "null", NONE),
        ("top_number", "1e999", NONE),
        ("top_string", json.dumps("usage"), NONE),
    ]
    return [(name, body.encode() if isinstance(body, str) else body, ok) for name, body, ok in out]


def _odd_streams(family: str) -> list[tuple[str, bytes, str]]:
    out: list[tuple[str, Any, str]] = []
    if family == "openai":

        def chat(usage: Any, model: Any = "gpt-4o-2024-08-06") -> bytes:
            chunks = chat_chunks("gpt-4o-2024-08-06", ["Hel", "lo"], OK_OPENAI, True)
            for c in chunks:
                c["model"] = model
            chunks[-1]["usage"] = usage
            return b"".join(sse([(None, c) for c in chunks] + [(None, "[DONE]")]))

        out += [
            ("model_int", chat(OK_OPENAI, 123), OK),
            ("model_object", chat(OK_OPENAI, {"m": 1}), OK),
            ("usage_list", chat([1]), BAD),
            ("usage_number", chat(12), BAD),
        ]
        out += [(f"prompt_{n}", chat({**OK_OPENAI, "prompt_tokens": v}), BAD) for n, v in GARBAGE_COUNTS.items()]
    elif family == "anthropic":

        def msgs(start_usage: Any = None, delta_usage: Any = None, model: Any = "claude-haiku-4-5-20251001") -> bytes:
            evs = anthropic_stream_events()
            evs[0][1]["message"]["model"] = model
            if start_usage is not None:
                evs[0][1]["message"]["usage"] = start_usage
            # The last message_delta: as given, else only the output count (as is usual).
            evs[-2][1]["usage"] = {"output_tokens": 200} if delta_usage is None else delta_usage
            return b"".join(sse(evs))

        out += [
            ("model_int", msgs(model=123), OK),
            ("message_list", msgs(start_usage=None, model=[1]), OK),
            # message_start's usage is garbage, but the last message_delta carries the
            # whole cumulative usage, and the last value wins.
            (
                "start_usage_list_then_whole_delta",
                msgs(
                    start_usage=[1],
                    delta_usage=dict(input_tokens=100, cache_creation_input_tokens=3000, cache_read_input_tokens=0, output_tokens=200),
                ),
                OK,
            ),
            ("delta_input_string", msgs(delta_usage={"input_tokens": "100", "output_tokens": 200}), BAD),
            ("delta_output_huge", msgs(delta_usage={"output_tokens": 1e308}), BAD),
            ("delta_output_negative", msgs(delta_usage={"output_tokens": -200}), BAD),
        ]
        out += [(f"start_input_{n}", msgs(start_usage={"input_tokens": v, "output_tokens": 1}), BAD) for n, v in GARBAGE_COUNTS.items()]
    else:

        def gem(last_usage: Any, model: Any = "gemini-2.5-flash", array: bool = False) -> bytes:
            chunks = gemini_stream_chunks()
            for c in chunks:
                c["modelVersion"] = model
            chunks[-1]["usageMetadata"] = last_usage  # running totals: the last one stands
            if array:
                return ("[" + ",\r\n".join(json.dumps(c) for c in chunks) + "]").encode()
            return b"".join(sse((None, c) for c in chunks))

        for array in (False, True):
            tag = "array_" if array else "sse_"
            out += [(tag + "model_int", gem(FLASH_USAGE, 123, array), OK), (tag + "usage_list", gem([1], array=array), BAD)]
            out += [(tag + f"prompt_{n}", gem({**FLASH_USAGE, "promptTokenCount": v}, array=array), BAD) for n, v in GARBAGE_COUNTS.items()]
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("family", FAMILIES)
async def test_odd_upstream_replies_pass_through_byte_for_byte_with_one_honest_record(family, stream, mock, proxy, http):
    cases = _odd_streams(family) if stream else _odd_nonstream(family)
    path, body, sbody, spath = CALLS[family]
    current: dict[str, Any] = {}

    async def handler(request: web.Request, rec: Any) -> web.StreamResponse:
        name, data, _ = current["case"]
        if not stream:
            return web.Response(body=data, content_type="application/json")
        array = name.startswith("array_")
        pieces = split_bytes(data, [97, 13, 250], pause=0.0005)
        return await mock.write_pieces(request, pieces, content_type="application/json" if array else "text/event-stream")

    mock.on(spath if stream else path, handler)
    for case in cases:
        current["case"] = case
        name, data, _ = case
        target = spath if stream else path
        if stream and family == "gemini" and not name.startswith("array_"):
            target += "?alt=sse"
        async with http.post(f"{proxy.url}/{family}{target}", json=sbody if stream else body, headers=CLIENT_HEADERS[family]) as r:
            assert r.status == 200, name
            got = await r.read()
        assert without_cost_comment(got, None) == data, name  # the upstream's bytes, unchanged but for the cost line
    records = await proxy.records()  # parse_log runs check_record on every line
    assert len(records) == len(cases)  # exactly one record per call, none lost
    for rec, (name, _, usage) in zip(records, cases):
        check_record(rec)
        assert rec["status"] == 200 and rec["is_streaming"] is stream, name
        if usage in (OK, NONE):
            assert rec["usage_error"] is None, (name, rec["usage_error"])
            assert rec["usage_source"] == usage and rec["total_cost"] is not None and dec(rec["total_cost"]) > 0, name
            assert rec["response_model"] is None or isinstance(rec["response_model"], str)
        else:
            assert rec["total_cost"] is None and rec["input_cost"] is None, (name, rec["total_cost"])
            assert rec["input_tokens"] is None and rec["usage_source"] is None, name
            assert isinstance(rec["usage_error"], str) and 0 < len(rec["usage_error"]) <= 120, (name, rec["usage_error"])
            assert rec["usage_error"].startswith("implausible usage"), (name, rec["usage_error"])
            assert rec["raw_usage"] is not None, name  # what was sent, kept for the record
        for f in ("service_tier", "finish_reason", "request_id", "response_model"):
            assert rec[f] is None or isinstance(rec[f], str), (name, f)


# === a proxy key never leaves the proxy, whatever carries it ==========================


async def test_proxy_key_in_any_header_param_or_body_is_not_forwarded(mock, start_proxy, http, tmp_path):
    cfg, key, kid = keyed_auth_config(mock.url, tmp_path)
    proxy = await start_proxy(cfg)
    mock.on("/v1/chat/completions", json_reply(chat_completion()))
    cases = [
        ({"api-key": key}, ""),  # Azure OpenAI's key header
        ({"Cookie": f"session=abc; token={key}"}, ""),
        ({"x-trace": f"caller {key}"}, ""),
        ({}, f"trace={key}&keep=1"),
        ({}, f"trace={quote(key, safe='')}&keep=1"),
    ]
    for extra, query in cases:
        url = f"{proxy.url}/openai/v1/chat/completions" + (f"?{query}" if query else "")
        body = {**OPENAI_BODY, "user": f"copied {key} here"}
        async with http.post(URL(url, encoded=True), json=body, headers={"Authorization": f"Bearer {key}", **extra}) as r:
            assert r.status == 200, await r.text()
    assert len(mock.requests) == len(cases)
    spellings = all_encodings(key)
    for (extra, query), got in zip(cases, mock.requests):
        seen = f"{got.path} {list(got.query.items())} {list(got.headers.items())} {got.body!r}"
        assert not any(s in seen for s in spellings), (extra, query)
        if query:
            assert got.query.get("keep") == "1"  # the other parameters still go
    records = await proxy.records()
    assert [(r["status"], r["key_id"]) for r in records] == [(200, kid)] * len(cases)


async def test_an_unauthenticated_caller_s_huge_body_is_never_parsed(mock, start_proxy, http, tmp_path):
    cfg, key, _ = keyed_auth_config(mock.url, tmp_path)
    proxy = await start_proxy(cfg)
    from proxy.web.state import APP_STATE

    big = orjson.dumps({**OPENAI_BODY, "messages": [{"role": "user", "content": "x" * 1000}] * 3000})
    assert len(big) > 2_000_000
    async with http.post(
        f"{proxy.url}/openai/v1/chat/completions",
        data=big,
        headers={"Authorization": "Bearer lcp-wrong", "Content-Type": "application/json", "x-user-id": "mallory"},
    ) as r:
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"
    # The digest worker (which parses bodies over 1 MiB) was never started for it.
    assert proxy.runner.app[APP_STATE]._pool is None
    [rec] = await proxy.records()
    assert (rec["status"], rec["user_id"], rec["error"]) == (401, "mallory", "auth: unknown proxy key")
    assert not mock.requests
