"""Anthropic Messages end to end: the official SDK -> proxy -> mock upstream (docs/providers.md §4)."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import pytest
from anthropic import AsyncAnthropic

from proxy.core.records import fingerprint
from tests.support.config import CLIENT_ANTHROPIC_KEY, PROXY_ANTHROPIC_KEY
from tests.support.mock_upstream import json_reply, sse, stream_reply
from tests.support.provider_replies import SONNET_USAGE, anthropic_message, anthropic_stream_events
from tests.support.records import assert_no_secrets, dec

MESSAGES = [{"role": "user", "content": "Hello"}]


def client(base: str, provider: str = "anthropic") -> AsyncAnthropic:
    return AsyncAnthropic(base_url=f"{base}/{provider}", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0)


def costs(rec: dict) -> tuple:
    return dec(rec["input_cost"]), dec(rec["output_cost"]), dec(rec["total_cost"])


async def test_messages_non_stream_cache_read_and_1h_write(mock, proxy):
    mock.on("/v1/messages", json_reply(anthropic_message()))
    async with client(proxy.url) as c:
        msg = await c.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES, metadata={"user_id": "user-7"})
    assert msg.content[0].text == "Done." and msg.usage.cache_read_input_tokens == 10000

    sent = mock.requests[-1]
    assert sent.path == "/v1/messages"
    # No api_key configured: the client's credential passes untouched, in whichever
    # header the SDK uses (x-api-key, or Authorization: Bearer in newer SDKs).
    assert CLIENT_ANTHROPIC_KEY in (sent.headers.get("x-api-key"), sent.headers.get("Authorization", "")[7:])
    assert "anthropic-version" in sent.headers

    [rec] = await proxy.records()
    assert rec["provider"] == "anthropic" and rec["provider_type"] == "anthropic"
    assert rec["model"] == "claude-sonnet-4-5" and rec["response_model"] == "claude-sonnet-4-5-20250929"
    assert rec["endpoint"] == "/anthropic/v1/messages" and rec["is_streaming"] is False
    # Anthropic's three disjoint input counts are summed: 50 + 2000 + 10000.
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (12050, 400, 12450)
    assert (rec["cache_read_tokens"], rec["cache_write_tokens"], rec["cache_write_1h_tokens"]) == (10000, 2000, 2000)
    # §4.1: 50 x 3 + 2000 x 6 + 10000 x 0.30 + 400 x 15 per 1M = $0.02115
    assert costs(rec) == (Decimal("0.01515"), Decimal("0.006"), Decimal("0.02115"))
    assert rec["pricing_source"] == "config" and rec["usage_source"] == "provider"
    assert rec["user_id"] == "user-7"  # metadata.user_id
    assert rec["key_id"] == fingerprint(CLIENT_ANTHROPIC_KEY)
    assert rec["finish_reason"] == "end_turn" and rec["request_id"] == "msg_01"
    assert rec["service_tier"] == "standard"
    assert rec["raw_usage"] == SONNET_USAGE
    assert rec["status"] == 200 and rec["error"] is None
    assert_no_secrets(proxy.raw_log())


async def test_web_search_requests_are_priced(mock, proxy):
    """§7 vector: opus-4.1, in 10, read 50000, out 1000, 2 web searches = $0.17015."""
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 50000,
        "output_tokens": 1000,
        "server_tool_use": {"web_search_requests": 2},
    }
    mock.on("/v1/messages", json_reply(anthropic_message("claude-opus-4-1-20250805", usage)))
    async with client(proxy.url) as c:
        await c.messages.create(model="claude-opus-4-1", max_tokens=1024, messages=MESSAGES)
    [rec] = await proxy.records()
    assert rec["web_search_requests"] == 2 and rec["input_tokens"] == 50010
    assert dec(rec["total_cost"]) == Decimal("0.17015")


async def test_configured_key_replaces_x_api_key(mock, proxy):
    mock.on("/v1/messages", json_reply(anthropic_message()))
    async with client(proxy.url, "anthropic-keyed") as c:
        await c.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=MESSAGES, extra_headers={"x-user-id": "team-a"})
    sent = mock.requests[-1]
    assert sent.headers.getall("x-api-key") == [PROXY_ANTHROPIC_KEY]
    assert "authorization" not in sent.headers and "x-user-id" not in sent.headers
    [rec] = await proxy.records()
    assert rec["user_id"] == "team-a" and rec["key_id"] == fingerprint(CLIENT_ANTHROPIC_KEY)
    assert dec(rec["total_cost"]) == Decimal("0.02115")
    assert_no_secrets(proxy.raw_log())


async def test_raw_x_api_key_passes_untouched_without_configured_key(mock, proxy, http):
    mock.on("/v1/messages", json_reply(anthropic_message()))
    headers = {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "foo-2025"}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": MESSAGES}
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json=body, headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["usage"]["cache_read_input_tokens"] == 10000
    sent = mock.requests[-1]
    assert sent.body == json.dumps(body).encode()  # forwarded byte for byte
    assert sent.headers["x-api-key"] == CLIENT_ANTHROPIC_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01" and sent.headers["anthropic-beta"] == "foo-2025"
    [rec] = await proxy.records()
    assert rec["user_id"] == "key:" + fingerprint(CLIENT_ANTHROPIC_KEY)
    assert dec(rec["total_cost"]) == Decimal("0.02115")
    assert_no_secrets(proxy.raw_log())


async def test_stream_cumulative_message_deltas_are_not_added(mock, proxy):
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events())))
    async with client(proxy.url) as c:
        async with c.messages.stream(model="claude-haiku-4-5", max_tokens=1024, messages=MESSAGES) as stream:
            seen = [ev.type async for ev in stream]
            final = await stream.get_final_message()
    # The client got every event, pings included, and the SDK's own accounting agrees.
    assert seen.count("message_delta") == 2 and "message_stop" in seen
    assert final.usage.output_tokens == 200 and final.content[0].text == "Sure thing"

    [rec] = await proxy.records()
    assert rec["is_streaming"] is True
    assert rec["response_model"] == "claude-haiku-4-5-20251001" and rec["request_id"] == "msg_02"
    # 100 + 3000 (5m write) input; output the last cumulative value (not 1 + 120 + 200).
    assert (rec["input_tokens"], rec["output_tokens"]) == (3100, 200)
    assert (rec["cache_write_tokens"], rec["cache_write_1h_tokens"], rec["cache_read_tokens"]) == (3000, 0, 0)
    # §4.2: 100 x 1 + 3000 x 1.25 + 200 x 5 per 1M = $0.00485
    assert costs(rec) == (Decimal("0.00385"), Decimal("0.001"), Decimal("0.00485"))
    assert rec["finish_reason"] == "end_turn" and rec["usage_source"] == "provider"
    assert rec["ttft_ms"] is not None and rec["error"] is None


async def test_stream_error_event_after_200(mock, proxy):
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events(error=True))))
    async with client(proxy.url) as c:
        with pytest.raises(anthropic.APIError) as exc:
            async with c.messages.stream(model="claude-haiku-4-5", max_tokens=1024, messages=MESSAGES) as stream:
                async for _ in stream:
                    pass
    assert "Overloaded" in str(exc.value)
    [rec] = await proxy.records()
    assert rec["status"] == 200  # what the client got; the failure is in `error`
    assert rec["error"] and "Overloaded" in rec["error"]
    # Input is known from message_start; the placeholder output of 1 is not a real count.
    assert rec["input_tokens"] == 3100 and rec["cache_write_tokens"] == 3000
    assert rec["output_tokens"] >= 1
    assert rec["total_cost"] is not None and dec(rec["input_cost"]) == Decimal("0.00385")


async def test_stream_with_server_tool_use_takes_the_last_cumulative_counts(mock, proxy):
    """Streams with server tools send several message_deltas whose usage (web searches
    included) is cumulative: 1 then 2 searches means 2, not 3."""
    evs = anthropic_stream_events(model="claude-opus-4-1-20250805")
    start = evs[0][1]["message"]["usage"]
    start.update(
        input_tokens=10,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=50000,
        cache_creation={"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    )
    deltas = [e for name, e in evs if name == "message_delta"]
    deltas[0]["usage"] = {"output_tokens": 400, "server_tool_use": {"web_search_requests": 1}}
    deltas[1]["usage"] = {
        "input_tokens": 10,
        "cache_read_input_tokens": 50000,
        "output_tokens": 1000,
        "server_tool_use": {"web_search_requests": 2},
    }
    mock.on("/v1/messages", stream_reply(mock, sse(evs)))
    async with client(proxy.url) as c:
        async with c.messages.stream(model="claude-opus-4-1", max_tokens=1024, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert final.usage.output_tokens == 1000
    [rec] = await proxy.records()
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"], rec["web_search_requests"]) == (50010, 50000, 1000, 2)
    assert dec(rec["total_cost"]) == Decimal("0.17015")  # §7 vector, streamed
