"""Gemini end to end over raw HTTP (aiohttp client) -> proxy -> mock upstream (docs/providers.md §5)."""

from __future__ import annotations

import json
from decimal import Decimal

from proxy.core.records import fingerprint
from tests.support.config import CLIENT_GEMINI_KEY, PROXY_GEMINI_KEY
from tests.support.mock_upstream import dumps, json_reply, sse, stream_reply
from tests.support.provider_replies import FLASH_USAGE, gemini_response, gemini_stream_chunks
from tests.support.records import assert_no_secrets, dec

BODY = {"contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}]}
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
KEY_HEADER = {"x-goog-api-key": CLIENT_GEMINI_KEY}


def assert_flash_cost(rec: dict) -> None:
    """§5.2: prompt 12000 (10000 cached), candidates 300 + thoughts 700 at 2.5 Flash = $0.0034."""
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (12000, 10000, 1000, 700)
    assert rec["total_tokens"] == 13000
    assert (dec(rec["input_cost"]), dec(rec["output_cost"]), dec(rec["total_cost"])) == (
        Decimal("0.0009"),
        Decimal("0.0025"),
        Decimal("0.0034"),
    )
    assert rec["pricing_source"] == "config" and rec["usage_source"] == "provider"


async def test_generate_content(mock, proxy, http):
    mock.on(GEN, json_reply(gemini_response(usage=FLASH_USAGE)))
    async with http.post(f"{proxy.url}/gemini{GEN}", json=BODY, headers=KEY_HEADER) as r:
        assert r.status == 200
        reply = await r.json()
    assert reply["usageMetadata"]["thoughtsTokenCount"] == 700
    assert mock.requests[-1].headers["x-goog-api-key"] == CLIENT_GEMINI_KEY

    [rec] = await proxy.records()
    assert rec["provider"] == "gemini" and rec["provider_type"] == "gemini"
    assert rec["model"] == "gemini-2.5-flash"  # from the URL: the body has none
    assert rec["response_model"] == "gemini-2.5-flash" and rec["request_id"] == "abc"
    assert rec["endpoint"] == "/gemini" + GEN and rec["is_streaming"] is False
    assert rec["finish_reason"] == "STOP"
    assert rec["user_id"] == "key:" + fingerprint(CLIENT_GEMINI_KEY)
    assert rec["raw_usage"] == FLASH_USAGE
    assert_flash_cost(rec)
    assert_no_secrets(proxy.raw_log())


async def test_long_context_tier_applies_to_the_whole_call(mock, proxy, http):
    """§7 vector: gemini-2.5-pro, prompt 250000, candidates 1000, thoughts 2000 = $0.670 (tier 2)."""
    usage = {"promptTokenCount": 250000, "candidatesTokenCount": 1000, "thoughtsTokenCount": 2000, "totalTokenCount": 253000}
    path = "/v1beta/models/gemini-2.5-pro:generateContent"
    mock.on(path, json_reply(gemini_response("gemini-2.5-pro", usage)))
    async with http.post(f"{proxy.url}/gemini{path}", json=BODY, headers=KEY_HEADER) as r:
        assert r.status == 200
    [rec] = await proxy.records()
    assert rec["model"] == "gemini-2.5-pro" and (rec["input_tokens"], rec["output_tokens"]) == (250000, 3000)
    assert dec(rec["total_cost"]) == Decimal("0.670")


async def test_stream_sse_crlf_usage_on_every_chunk_last_wins(mock, proxy, http):
    events = sse([(None, c) for c in gemini_stream_chunks()], sep="\r\n\r\n")
    mock.on(STREAM, stream_reply(mock, events))
    async with http.post(f"{proxy.url}/gemini{STREAM}?alt=sse", json=BODY, headers=KEY_HEADER) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    assert raw == b"".join(events)  # passed through byte for byte
    sent = mock.requests[-1]
    assert sent.query["alt"] == "sse" and sent.headers["x-goog-api-key"] == CLIENT_GEMINI_KEY

    [rec] = await proxy.records()
    assert rec["is_streaming"] is True and rec["model"] == "gemini-2.5-flash"
    assert rec["endpoint"] == "/gemini" + STREAM  # the query string is not part of the endpoint
    assert rec["finish_reason"] == "STOP"
    assert_flash_cost(rec)  # not the sum of five chunks, and not reset by the empty ones


async def test_stream_json_array_without_alt_sse(mock, proxy, http):
    chunks = gemini_stream_chunks()
    body = ("[" + ",\r\n".join(dumps(c) for c in chunks) + "]").encode()
    # Odd-sized pieces so that elements and keys straddle network reads.
    pieces = [body[i : i + 97] for i in range(0, len(body), 97)]
    mock.on(STREAM, stream_reply(mock, [p for piece in pieces for p in (piece, 0.001)], content_type="application/json"))
    async with http.post(f"{proxy.url}/gemini{STREAM}", json=BODY, headers=KEY_HEADER) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw == body and json.loads(raw) == chunks
    assert "alt" not in mock.requests[-1].query
    [rec] = await proxy.records()
    assert rec["is_streaming"] is True
    assert_flash_cost(rec)


async def test_query_key_replaced_by_configured_key(mock, proxy, http):
    mock.on(GEN, json_reply(gemini_response(usage=FLASH_USAGE)))
    url = f"{proxy.url}/gemini-keyed{GEN}?key={CLIENT_GEMINI_KEY}&foo=bar"
    async with http.post(url, json=BODY) as r:
        assert r.status == 200
    sent = mock.requests[-1]
    assert "key" not in sent.query and sent.query["foo"] == "bar"
    assert sent.headers.getall("x-goog-api-key") == [PROXY_GEMINI_KEY]
    [rec] = await proxy.records()
    assert rec["provider"] == "gemini-keyed"
    assert rec["key_id"] == fingerprint(CLIENT_GEMINI_KEY)
    assert_flash_cost(rec)
    assert_no_secrets(proxy.raw_log())


async def test_query_key_passes_without_configured_key(mock, proxy, http):
    mock.on(STREAM, stream_reply(mock, sse([(None, c) for c in gemini_stream_chunks()], sep="\r\n\r\n")))
    async with http.post(f"{proxy.url}/gemini{STREAM}?alt=sse&key={CLIENT_GEMINI_KEY}", json=BODY) as r:
        assert r.status == 200
        await r.read()
    sent = mock.requests[-1]
    assert sent.query["key"] == CLIENT_GEMINI_KEY and sent.query["alt"] == "sse"
    [rec] = await proxy.records()
    assert rec["user_id"] == "key:" + fingerprint(CLIENT_GEMINI_KEY)
    assert_flash_cost(rec)
    assert_no_secrets(proxy.raw_log())


async def test_configured_key_replaces_header_key(mock, proxy, http):
    mock.on(GEN, json_reply(gemini_response(usage=FLASH_USAGE)))
    async with http.post(f"{proxy.url}/gemini-keyed{GEN}", json=BODY, headers={**KEY_HEADER, "x-user-id": "u1"}) as r:
        assert r.status == 200
    sent = mock.requests[-1]
    assert sent.headers.getall("x-goog-api-key") == [PROXY_GEMINI_KEY] and "x-user-id" not in sent.headers
    [rec] = await proxy.records()
    assert rec["user_id"] == "u1"
    assert_no_secrets(proxy.raw_log())
