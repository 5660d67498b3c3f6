"""OpenAI family end to end: the official SDK -> proxy -> mock upstream (docs/providers.md §1-3)."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest
from openai import AsyncOpenAI

from proxy.core.records import fingerprint
from tests.support.config import CLIENT_OPENAI_KEY, PROXY_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply, sse, stream_reply, without_cost_comment
from tests.support.provider_replies import (
    GPT4O_USAGE,
    O4MINI_USAGE,
    chat_chunks,
    chat_completion,
    openai_chat,
    openai_completions,
    openai_embeddings,
    response_object,
    responses_stream_events,
)
from tests.support.records import assert_no_secrets, dec


def client(base: str, provider: str = "openai", key: str = CLIENT_OPENAI_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/{provider}/v1", api_key=key, max_retries=0)


def assert_cost(rec: dict, input_cost: str, output_cost: str, total: str) -> None:
    assert (dec(rec["input_cost"]), dec(rec["output_cost"]), dec(rec["total_cost"])) == (
        Decimal(input_cost),
        Decimal(output_cost),
        Decimal(total),
    ), rec
    assert rec["pricing_source"] == "config" and rec["price_id"]
    assert rec["usage_source"] == "provider"


def assert_gpt4o_usage(rec: dict) -> None:
    """§1.1: prompt 10000 (8000 cached), completion 500 at gpt-4o rates = $0.020."""
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (10000, 500, 10500)
    assert (rec["cache_read_tokens"], rec["cache_write_tokens"], rec["reasoning_tokens"]) == (8000, 0, 0)
    assert_cost(rec, "0.015", "0.005", "0.020")


MESSAGES = [{"role": "user", "content": "Say hi"}]


# --- Chat Completions -------------------------------------------------------------


async def test_chat_non_stream_dated_snapshot_priced_as_family(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock, model="gpt-4o-2024-08-06"))
    async with client(proxy.url) as c:
        reply = await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="alice")
    assert reply.model == "gpt-4o-2024-08-06"
    assert reply.choices[0].message.content == "Hello!"
    assert reply.usage.prompt_tokens_details.cached_tokens == 8000

    sent = mock.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {CLIENT_OPENAI_KEY}"  # no api_key configured: passes
    assert sent.json["model"] == "gpt-4o" and "stream_options" not in sent.json  # non-stream body untouched

    [rec] = await proxy.records()
    assert_gpt4o_usage(rec)
    assert rec["provider"] == "openai" and rec["provider_type"] == "openai"
    assert rec["model"] == "gpt-4o" and rec["response_model"] == "gpt-4o-2024-08-06"
    assert rec["endpoint"] == "/openai/v1/chat/completions"
    assert rec["is_streaming"] is False
    assert rec["request_id"] == "chatcmpl-x1"
    assert rec["user_id"] == "alice"  # OpenAI body `user`
    assert rec["key_id"] == fingerprint(CLIENT_OPENAI_KEY) and len(rec["key_id"]) == 12
    assert rec["service_tier"] == "default" and rec["finish_reason"] == "stop"
    assert rec["status"] == 200 and rec["error"] is None
    assert rec["raw_usage"] == json.loads(json.dumps(GPT4O_USAGE))
    assert rec["ttft_ms"] is not None and rec["latency_ms"] >= rec["ttft_ms"]
    assert_no_secrets(proxy.raw_log())


async def test_configured_key_replaces_client_key_and_user_header_is_not_forwarded(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with client(proxy.url, "openai-keyed") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-user-id": "u-42"})
    sent = mock.requests[-1]
    assert sent.headers.getall("Authorization") == [f"Bearer {PROXY_OPENAI_KEY}"]
    assert "x-user-id" not in sent.headers

    [rec] = await proxy.records()
    assert rec["user_id"] == "u-42"  # the header wins
    assert rec["key_id"] == fingerprint(CLIENT_OPENAI_KEY)
    assert rec["provider"] == "openai-keyed" and rec["provider_type"] == "openai"
    assert_gpt4o_usage(rec)
    assert_no_secrets(proxy.raw_log())


async def test_user_id_falls_back_to_key_fingerprint(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with client(proxy.url) as c:
        await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    [rec] = await proxy.records()
    assert rec["user_id"] == "key:" + fingerprint(CLIENT_OPENAI_KEY)
    assert CLIENT_OPENAI_KEY not in json.dumps(rec, default=str)


def normalized(chunks) -> list[dict]:
    """SDK chunks as plain dicts; "usage": null and a missing usage mean the same."""
    out = []
    for ch in chunks:
        d = ch.model_dump(exclude_none=True)
        out.append(d)
    return out


async def test_chat_stream_without_include_usage_hides_injected_usage_chunk(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    direct = AsyncOpenAI(base_url=f"{mock.url}/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0)
    async with direct:
        expected = [ch async for ch in await direct.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)]
    async with client(proxy.url) as c:
        got = [ch async for ch in await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)]

    # The client sees exactly what it would have seen without the proxy.
    assert normalized(got) == normalized(expected)
    assert all(ch.choices for ch in got), "a choices=[] usage chunk leaked to a client that did not ask"
    assert all(ch.usage is None for ch in got)
    assert "".join(ch.choices[0].delta.content or "" for ch in got) == "Hello!"

    # Upstream was asked for usage.
    assert mock.requests[-1].json["stream_options"] == {"include_usage": True}
    assert "stream_options" not in mock.requests[0].json  # the direct call, for contrast

    [rec] = await proxy.records()
    assert rec["is_streaming"] is True
    assert_gpt4o_usage(rec)
    assert rec["finish_reason"] == "stop" and rec["status"] == 200 and rec["error"] is None
    assert rec["ttft_ms"] is not None


async def test_chat_stream_raw_bytes_without_include_usage(mock, proxy, http):
    """At the byte level: every event the client gets is one upstream sent, in order,
    the stream still ends with [DONE], and only the choices=[] chunk is missing."""
    mock.on("/v1/chat/completions", openai_chat(mock))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_obfuscation": False}}
    headers = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = [e for e in without_cost_comment(raw).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len(chunks) == 5 and all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    # Merged into the client's stream_options, not replaced.
    assert mock.requests[-1].json["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    [rec] = await proxy.records()
    assert_gpt4o_usage(rec)


async def test_chat_stream_with_include_usage_client_gets_usage_chunk(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with client(proxy.url) as c:
        got = [
            ch
            async for ch in await c.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        ]
    assert got[-1].choices == [] and got[-1].usage.prompt_tokens == 10000
    assert got[-1].usage.prompt_tokens_details.cached_tokens == 8000
    assert all(ch.usage is None for ch in got[:-1])
    assert mock.requests[-1].json["stream_options"] == {"include_usage": True}
    [rec] = await proxy.records()
    assert rec["is_streaming"] is True
    assert_gpt4o_usage(rec)


MINI_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 2,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}


async def test_mini_is_not_priced_as_gpt4o_and_unknown_model_is_null(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock, model="gpt-4o-mini-2024-07-18", usage=MINI_USAGE))
    mock.on("/compat/v1/chat/completions", openai_chat(mock, model="gpt-4o-mini-2024-07-18", usage=MINI_USAGE))
    async with client(proxy.url) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    mock.on("/v1/chat/completions", openai_chat(mock, model="my-local-model", usage=MINI_USAGE))
    async with client(proxy.url) as c:
        await c.chat.completions.create(model="my-local-model", messages=MESSAGES, stream=True)
    async with client(proxy.url, "compat") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    mini, local, compat = await proxy.records()

    # openai has no gpt-4o-mini price: unpriced (null), never gpt-4o's rates, never 0.
    assert (mini["input_tokens"], mini["output_tokens"]) == (12, 2)
    assert mini["input_cost"] is None and mini["output_cost"] is None and mini["total_cost"] is None
    assert mini["pricing_source"] is None and mini["price_id"] is None
    assert mini["usage_source"] == "provider"
    # A model nobody prices, streamed: usage exact, cost null.
    assert local["model"] == "my-local-model" and local["total_tokens"] == 14 and local["total_cost"] is None
    assert local["usage_source"] == "provider"
    # The compatible provider's own table prices it: 12*0.15 + 2*0.60 per 1M.
    assert compat["provider"] == "compat"
    assert_cost(compat, "0.0000018", "0.0000012", "0.000003")


async def test_catalog_prices_mini_as_mini_not_as_gpt4o(mock, start_proxy):
    pytest.importorskip("genai_prices")
    proxy = await start_proxy(make_config(mock.url, catalog=True))
    mock.on("/v1/chat/completions", openai_chat(mock, model="gpt-4o-mini-2024-07-18", usage=GPT4O_USAGE))
    async with client(proxy.url) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [rec] = await proxy.records()
    assert rec["pricing_source"] == "catalog"
    # 2000 x 0.15 + 8000 x 0.075 + 500 x 0.60 per 1M; gpt-4o's rates would give $0.020.
    assert (dec(rec["input_cost"]), dec(rec["output_cost"])) == (Decimal("0.0009"), Decimal("0.0003"))
    assert dec(rec["total_cost"]) == Decimal("0.0012")


# --- legacy Completions and Embeddings (§2) ----------------------------------------


async def test_legacy_completions_non_stream_and_stream(mock, proxy):
    mock.on("/v1/completions", openai_completions(mock))
    async with client(proxy.url) as c:
        reply = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello")
        chunks = [ch async for ch in await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello", stream=True)]
    assert reply.choices[0].text == " world"
    assert "".join(ch.choices[0].text for ch in chunks) == " world"
    assert all(ch.choices for ch in chunks)  # no usage chunk leaked
    assert mock.requests[-1].json["stream_options"] == {"include_usage": True}

    plain, streamed = await proxy.records()
    for rec, is_stream in ((plain, False), (streamed, True)):
        assert rec["endpoint"] == "/openai/v1/completions" and rec["is_streaming"] is is_stream
        assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (5, 1, 6)
        assert_cost(rec, "0.0000075", "0.000002", "0.0000095")  # 5*1.50 + 1*2.00 per 1M
        assert rec["finish_reason"] == "stop"


async def test_embeddings(mock, proxy):
    mock.on("/v1/embeddings", openai_embeddings(1000))
    async with client(proxy.url) as c:
        reply = await c.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert reply.data[0].embedding[:2] == pytest.approx([0.0123, -0.0456])
    [rec] = await proxy.records()
    assert rec["endpoint"] == "/openai/v1/embeddings"
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (1000, 0, 1000)
    assert_cost(rec, "0.00002", "0", "0.00002")  # §2.2: 1000 x $0.02/MTok


# --- Responses API (§3) ---------------------------------------------------------------


async def test_responses_non_stream(mock, proxy):
    mock.on("/v1/responses", json_reply(response_object()))
    async with client(proxy.url) as c:
        reply = await c.responses.create(model="o4-mini", input="What is 6x7?")
    assert reply.output_text == "42" and reply.usage.input_tokens == 5000
    [rec] = await proxy.records()
    assert rec["endpoint"] == "/openai/v1/responses"
    assert rec["model"] == "o4-mini" and rec["response_model"] == "o4-mini-2025-04-16"
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (5000, 4096, 800, 640)
    # §3.1: 904 x 1.10 + 4096 x 0.275 + 800 x 4.40 per 1M = $0.0056408
    assert_cost(rec, "0.0021208", "0.00352", "0.0056408")
    assert rec["finish_reason"] == "completed" and rec["request_id"] == "resp_1"
    assert rec["raw_usage"] == O4MINI_USAGE


async def test_responses_stream_named_events_usage_from_completed(mock, proxy):
    mock.on("/v1/responses", stream_reply(mock, sse(responses_stream_events())))
    async with client(proxy.url) as c:
        events = [ev async for ev in await c.responses.create(model="gpt-5", input="hi", stream=True)]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert events[-1].response.usage.output_tokens == 210
    # The Responses API carries usage without opt-in: the proxy must not touch the body.
    assert "stream_options" not in mock.requests[-1].json
    [rec] = await proxy.records()
    assert rec["is_streaming"] is True and rec["response_model"] == "gpt-5-2025-08-07"
    assert (rec["input_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (40, 210, 192)
    assert_cost(rec, "0.00005", "0.0021", "0.00215")  # 40 x 1.25 + 210 x 10 per 1M
    assert rec["finish_reason"] == "completed" and rec["request_id"] == "resp_9"


async def test_responses_stream_incomplete_is_billed(mock, proxy):
    evs = responses_stream_events("response.incomplete", model="o4-mini-2025-04-16", usage=O4MINI_USAGE, incomplete="max_output_tokens")
    mock.on("/v1/responses", stream_reply(mock, sse(evs)))
    async with client(proxy.url) as c:
        events = [ev async for ev in await c.responses.create(model="o4-mini", input="hi", stream=True, max_output_tokens=800)]
    assert events[-1].type == "response.incomplete"
    [rec] = await proxy.records()
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"]) == (5000, 4096, 800)
    assert_cost(rec, "0.0021208", "0.00352", "0.0056408")
    assert rec["finish_reason"] == "max_output_tokens"
    assert rec["status"] == 200


async def test_keep_alive_comments_reach_the_client_when_usage_chunk_is_hidden(mock, proxy, http):
    """OpenAI-compatible routers (OpenRouter) send ': ...' keep-alive comments while a
    model is queued. The proxy re-frames such a stream to hide the usage chunk it
    asked for; the comments must still reach the client, or its idle timeout fires."""
    comment = b": OPENROUTER PROCESSING\n\n"

    def pieces(rec):
        include = bool((rec.json.get("stream_options") or {}).get("include_usage"))
        events = sse([(None, c) for c in chat_chunks("gpt-4o-mini-2024-07-18", ["Hi"], MINI_USAGE, include)] + [(None, "[DONE]")])
        return [comment, 0.01, comment, *events]

    mock.on("/compat/v1/chat/completions", stream_reply(mock, pieces))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}
    async with http.post(f"{mock.url}/compat/v1/chat/completions", json=body, headers=headers) as r:
        direct = await r.read()
    async with http.post(f"{proxy.url}/compat/v1/chat/completions", json=body, headers=headers) as r:
        via_proxy = await r.read()
    assert via_proxy.startswith(comment + comment)
    assert without_cost_comment(via_proxy).replace(b',"usage":null', b"") == direct
    [rec] = await proxy.records()
    assert (rec["input_tokens"], rec["output_tokens"]) == (12, 2)
    assert_cost(rec, "0.0000018", "0.0000012", "0.000003")


async def test_responses_stream_failed_is_recorded_as_error(mock, proxy):
    evs = responses_stream_events("response.failed", model="o4-mini-2025-04-16")
    evs[-1][1]["response"]["usage"] = None
    evs[-1][1]["response"]["error"] = {"code": "server_error", "message": "The model crashed"}
    mock.on("/v1/responses", stream_reply(mock, sse(evs)))
    async with client(proxy.url) as c:
        events = [ev async for ev in await c.responses.create(model="o4-mini", input="hi", stream=True)]
    assert events[-1].type == "response.failed"
    [rec] = await proxy.records()
    assert rec["status"] == 200 and "The model crashed" in rec["error"]
    assert rec["finish_reason"] == "failed"
    assert rec["usage_source"] != "provider"  # the reply reported none


async def test_service_tier_in_the_reply_selects_the_price(mock, proxy):
    """§7 vector: gpt-5, 1M in + 1M out, served on flex = $5.625 (standard would be $11.25)."""
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "total_tokens": 2_000_000}

    async def flex(request, rec):
        from aiohttp import web

        body = {**chat_completion("gpt-5-2025-08-07", usage), "service_tier": "flex"}
        return web.json_response(body)

    mock.on("/v1/chat/completions", flex)
    async with client(proxy.url) as c:
        await c.chat.completions.create(model="gpt-5", messages=MESSAGES, service_tier="flex")
    [rec] = await proxy.records()
    assert rec["service_tier"] == "flex"
    assert_cost(rec, "0.625", "5", "5.625")


async def test_chat_stream_error_chunk_after_200(mock, proxy):
    first = chat_chunks("gpt-4o-2024-08-06", ["Hel"], GPT4O_USAGE, True)[:2]
    err = {
        "error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}
    }
    mock.on("/v1/chat/completions", stream_reply(mock, sse([(None, c) for c in first] + [(None, err)])))
    async with client(proxy.url) as c:
        with pytest.raises(openai.APIError, match="server had an error"):
            async for _ in await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
                pass
    [rec] = await proxy.records()
    assert rec["status"] == 200 and "server had an error" in rec["error"]
    assert rec["is_streaming"] is True and rec["usage_source"] != "provider"
