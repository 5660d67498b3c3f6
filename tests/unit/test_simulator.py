"""The simulated provider (proxy/web/simulator.py, sim_replies.py): whatever the request
shape, OUR adapters (proxy/providers/*) read from its replies, whole or streamed, the
usage the simulator meant (its Plan); and over real HTTP its routes answer in each
family's wire shape, errors included."""

from __future__ import annotations

import json
from typing import Any, Iterable

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.sse import JSONArrayStreamParser, SSEParser
from proxy.core.usage import Usage
from proxy.providers import ADAPTERS
from proxy.web.sim_replies import (
    Plan,
    PromptCache,
    chat_chunks,
    chat_reply,
    gemini_chunks,
    gemini_reply,
    message_events,
    message_reply,
    plan_anthropic,
    plan_gemini,
    plan_openai,
    response_object,
    responses_events,
)
from proxy.web.simulator import SimSettings, loopback_socket, sse_bytes, start_simulator

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.builds(
    lambda word, n: word * n, st.sampled_from(["lorem ", "cache me ", "é中"]), st.integers(0, 2500)
)
caps = st.none() | st.integers(1, 5000)


def expected(p: Plan) -> Usage:
    return Usage(
        input_tokens=p.input_tokens,
        output_tokens=p.output_tokens,
        cache_read_tokens=p.cache_read_tokens,
        cache_write_tokens=p.cache_write_tokens,
        cache_write_1h_tokens=p.cache_write_1h_tokens,
        reasoning_tokens=p.reasoning_tokens,
    )


def tap_sse(family: str, path: str, data: bytes, split: int) -> Usage | None:
    """Feed a stream to the family's tap in pieces of ``split`` bytes, as the relay does."""
    adapter = ADAPTERS[family]
    tap = adapter.stream_tap(adapter.endpoint(path, "POST"), hide_usage_chunk=False)
    parser = SSEParser()
    for i in range(0, len(data), split):
        for ev in parser.feed(data[i : i + split]):
            tap.on_event(ev.event, ev.data)
    for ev in parser.flush():
        tap.on_event(ev.event, ev.data)
    assert tap.complete, "the stream must end with its family's final event"
    return tap.result().usage


def parse(family: str, path: str, payload: Any) -> Usage | None:
    adapter = ADAPTERS[family]
    info = adapter.parse_reply(adapter.endpoint(path, "POST"), json.loads(json.dumps(payload)))
    assert info.usage_error is None, info.usage_error
    return info.usage


def twice(plan: Any, *args: Any) -> Iterable[Plan]:
    """The same request twice on one cache: the second may read what the first wrote."""
    cache = PromptCache()
    return plan(*args, cache), plan(*args, cache)


@PROPS
@given(
    model=st.sampled_from(["gpt-4o", "gpt-4o-mini", "o4-mini", "gpt-5-mini"]),
    system=texts,
    question=texts,
    cap=caps,
    cache_key=st.none() | st.sampled_from(["k1", "k2"]),
    split=st.integers(1, 400),
)
def test_openai_chat_usage_as_meant(model, system, question, cap, cache_key, split):
    body: dict[str, Any] = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    if cap is not None:
        body["max_tokens"] = cap
    if cache_key:
        body["prompt_cache_key"] = cache_key
    first, second = twice(lambda b, c: plan_openai(b, c, "chat"), body)
    for p in (first, second):
        assert parse("openai", "v1/chat/completions", chat_reply(p)) == expected(p)
        stream = b"".join(sse_bytes([(None, c)]) for c in chat_chunks(p, include_usage=True)) + b"data: [DONE]\n\n"
        assert tap_sse("openai", "v1/chat/completions", stream, split) == expected(p)
        bare = b"".join(sse_bytes([(None, c)]) for c in chat_chunks(p, include_usage=False)) + b"data: [DONE]\n\n"
        assert tap_sse("openai", "v1/chat/completions", bare, split) is None  # no include_usage: no usage
        assert p.output_tokens <= (cap or 10**9) and p.reasoning_tokens <= p.output_tokens
        if p.output_tokens >= 4:
            assert (p.reasoning_tokens > 0) == model.startswith(("o4", "gpt-5"))
    assert first.cache_read_tokens == 0
    if first.input_tokens >= 1024:  # a long prompt repeated is read from the cache
        assert 0 < second.cache_read_tokens <= second.input_tokens


@PROPS
@given(model=st.sampled_from(["o4-mini", "gpt-4.1-nano"]), question=texts, cap=caps, split=st.integers(1, 300))
def test_openai_responses_usage_as_meant(model, question, cap, split):
    body: dict[str, Any] = {"model": model, "input": question, "instructions": "be brief"}
    if cap is not None:
        body["max_output_tokens"] = cap
    p = plan_openai(body, PromptCache(), "responses")
    assert parse("openai", "v1/responses", response_object(p)) == expected(p)
    assert tap_sse("openai", "v1/responses", sse_bytes(responses_events(p)), split) == expected(p)


@PROPS
@given(
    model=st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-5"]),
    system=texts,
    question=texts,
    ttl=st.sampled_from([None, "5m", "1h", "no-cache"]),
    thinking=st.booleans(),
    cap=st.integers(1, 5000),
    split=st.integers(1, 400),
)
def test_anthropic_usage_as_meant(model, system, question, ttl, thinking, cap, split):
    block: dict[str, Any] = {"type": "text", "text": system or "x"}
    if ttl != "no-cache":
        block["cache_control"] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    body: dict[str, Any] = {"model": model, "max_tokens": cap, "system": [block], "messages": [{"role": "user", "content": question}]}
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    first, second = twice(plan_anthropic, body)
    for p in (first, second):
        assert parse("anthropic", "v1/messages", message_reply(p)) == expected(p)
        assert tap_sse("anthropic", "v1/messages", sse_bytes(message_events(p)), split) == expected(p)
        assert p.output_tokens <= cap
    long = first.cache_write_tokens > 0
    assert long == (ttl != "no-cache" and (len(system) + 3) // 4 >= 1024)
    if long:  # written once, then read; the 1-hour part only with ttl 1h
        assert second.cache_read_tokens == first.cache_write_tokens and second.cache_write_tokens == 0
        assert first.cache_write_1h_tokens == (first.cache_write_tokens if ttl == "1h" else 0)


@PROPS
@given(
    model=st.sampled_from(["gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash"]),
    system=texts,
    question=texts,
    budget=st.none() | st.sampled_from([0, 512]),
    split=st.integers(1, 400),
)
def test_gemini_usage_as_meant(model, system, question, budget, split):
    body: dict[str, Any] = {
        "systemInstruction": {"parts": [{"text": system}]},
        "contents": [{"role": "user", "parts": [{"text": question}]}],
    }
    if budget is not None:
        body["generationConfig"] = {"thinkingConfig": {"thinkingBudget": budget}}
    first, second = twice(lambda b, c: plan_gemini(model, b, c), body)
    path = f"v1beta/models/{model}:streamGenerateContent"
    for p in (first, second):
        assert parse("gemini", f"v1beta/models/{model}:generateContent", gemini_reply(p)) == expected(p)
        sse = b"".join(sse_bytes([(None, c)], "\r\n\r\n") for c in gemini_chunks(p))
        assert tap_sse("gemini", path, sse, split) == expected(p)
        # without alt=sse: one JSON array, parsed element by element
        adapter = ADAPTERS["gemini"]
        tap = adapter.stream_tap(adapter.endpoint(path, "POST"), hide_usage_chunk=False)
        data = json.dumps(gemini_chunks(p)).encode()
        parser = JSONArrayStreamParser()
        for i in range(0, len(data), split):
            for element in parser.feed(data[i : i + split]):
                tap.on_element(element)
        assert tap.result().usage == expected(p)
        thinks = model.startswith("gemini-2.5") and budget != 0
        assert (p.reasoning_tokens > 0) == thinks
    if first.input_tokens >= 1024:
        assert 0 < second.cache_read_tokens < second.input_tokens


# --- over real HTTP -------------------------------------------------------------------


async def serve(settings: SimSettings) -> tuple[web.AppRunner, str]:
    sock = loopback_socket()
    runner = await start_simulator(settings, sock)
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_routes_answer_in_each_family_shape_over_http():
    runner, url = await serve(SimSettings(chunk_delay=0))
    try:
        async with aiohttp.ClientSession() as http:
            chat = {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with http.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer anything"}) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                raw = await r.read()
            assert raw.endswith(b"data: [DONE]\n\n")
            usage = tap_sse("openai", "v1/chat/completions", raw, 64)
            assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
            async with http.post(f"{url}/v1/chat/completions", json={**chat, "stream": False}) as r:
                reply = await r.json()
            assert reply["model"] == "gpt-4o-2024-08-06" and reply["usage"]["prompt_tokens"] == usage.input_tokens
            msg = {"model": "claude-haiku-4-5", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(f"{url}/v1/messages", json=msg, headers={"x-api-key": "k"}) as r:
                assert tap_sse("anthropic", "v1/messages", await r.read(), 7) is not None
            gem = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
            async with http.post(f"{url}/v1beta/models/gemini-2.5-flash:streamGenerateContent", json=gem) as r:
                assert r.content_type == "application/json"
                elements = json.loads(await r.read())
            assert elements[-1]["candidates"][0]["finishReason"] == "STOP" and elements[-1]["usageMetadata"]["thoughtsTokenCount"] > 0
            async with http.post(f"{url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", json=gem) as r:
                assert b"\r\n\r\n" in await r.read()
            async with http.post(f"{url}/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a b c d", "e"]}) as r:
                emb = await r.json()
            assert len(emb["data"]) == 2 and emb["usage"]["prompt_tokens"] == emb["usage"]["total_tokens"] > 0
            async with http.get(f"{url}/v1/models") as r:
                assert "gpt-4o" in [m["id"] for m in (await r.json())["data"]]
    finally:
        await runner.cleanup()


async def test_errors_in_the_familys_own_shape_forced_and_by_rate():
    runner, url = await serve(SimSettings(error_rate=0.5, seed=3, chunk_delay=0))
    try:
        async with aiohttp.ClientSession() as http:
            forced = {"x-simulator-error": "429"}
            async with http.post(
                f"{url}/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}, headers=forced
            ) as r:
                assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
            async with http.post(f"{url}/v1beta/models/gemini-2.5-flash:generateContent", json={"contents": []}, headers=forced) as r:
                assert (await r.json())["error"]["status"] == "RESOURCE_EXHAUSTED"
            statuses = []
            for _ in range(40):
                async with http.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}) as r:
                    statuses.append(r.status)
                    if r.status >= 400:
                        assert set((await r.json())["error"]) >= {"message", "type", "code"}
            assert {200, 429, 500} <= set(statuses) and 8 < statuses.count(200) < 32
    finally:
        await runner.cleanup()


async def test_a_cap_that_is_not_a_positive_integer_is_a_400_in_the_familys_shape():
    runner, url = await serve(SimSettings(chunk_delay=0))
    try:
        async with aiohttp.ClientSession() as http:
            for cap in (-5, 0, 1.5, "10", True):
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": cap}
                async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                    assert r.status == 400 and "max_tokens" in (await r.json())["error"]["message"], cap
                body = {"model": "claude-haiku-4-5", "messages": [], "max_tokens": cap}
                async with http.post(f"{url}/v1/messages", json=body) as r:
                    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error", cap
            ok = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
            async with http.post(f"{url}/v1/chat/completions", json=ok) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] <= 7
    finally:
        await runner.cleanup()
