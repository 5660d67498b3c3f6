"""Cost on every reply (docs/replies.md): the ``x-llm-cost-*`` headers of whole replies,
the ``: llm-cost {...}`` comment near the end of OpenAI-family and Anthropic streams,
``GET /api/calls/{id}``, and the official SDKs reading those streams unchanged.

Every figure is compared with the record the proxy wrote, read back from the JSONL with
``parse_float=Decimal`` so "equal" means to the last digit."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import anthropic
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from proxy.core.reply_cost import COMMENT_PREFIX, FACTS, insert_comment
from proxy.providers import ADAPTERS
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply, sse, stream_reply, without_cost_comment
from tests.support.provider_replies import (
    FLASH_USAGE,
    anthropic_message,
    anthropic_stream_events,
    gemini_response,
    gemini_stream_chunks,
    openai_chat,
    response_object,
    responses_stream_events,
)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
ANTHROPIC_BODY = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}]}
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM_GEN = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
OPENAI_AUTH = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}
ANTHROPIC_AUTH = {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
HEADER_FIELDS = {
    "usd": "total_cost",
    "input-usd": "input_cost",
    "output-usd": "output_cost",
    "input-tokens": "input_tokens",
    "output-tokens": "output_tokens",
    "cache-read-tokens": "cache_read_tokens",
    "cache-write-tokens": "cache_write_tokens",
    "reasoning-tokens": "reasoning_tokens",
}


def exact_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in text.splitlines() if line.strip()]


async def final_records(proxy: Any) -> list[dict[str, Any]]:
    """The proxy stopped (every record on disk), its log read with exact decimals."""
    await proxy.records()
    return exact_records(proxy.raw_log())


def comments(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[len(COMMENT_PREFIX) :], parse_float=Decimal) for line in raw.splitlines() if line.startswith(COMMENT_PREFIX)]


def assert_headers_are_the_record(headers: Any, rec: dict[str, Any]) -> None:
    assert headers["x-llm-cost-record-id"] == rec["record_id"]
    for suffix, field in HEADER_FIELDS.items():
        value = headers[f"x-llm-cost-{suffix}"]
        assert rec[field] is not None, field
        assert Decimal(value) == rec[field], (suffix, value, rec[field])
        assert "e" not in value.lower()  # the exact decimal, never 1e-05 or a float artefact
    assert headers["x-llm-cost-pricing"] == rec["pricing_source"]
    assert headers["x-llm-cost-usage"] == rec["usage_source"]


def assert_comment_is_the_record(raw: bytes, rec: dict[str, Any]) -> None:
    [facts] = comments(raw)
    assert set(facts) == set(FACTS)
    for name in FACTS:
        assert facts[name] == rec[name], name
    assert rec["total_cost"] is not None and rec["total_cost"] > 0


async def test_whole_replies_carry_the_records_figures_in_every_family(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/v1/responses", json_reply(response_object()))
    mock.on("/v1/messages", json_reply(anthropic_message()))
    mock.on(GEN, json_reply(gemini_response(usage=FLASH_USAGE)))
    calls = [
        ("/openai/v1/chat/completions", CHAT, OPENAI_AUTH),
        ("/openai/v1/responses", {"model": "gpt-5", "input": "Hi"}, OPENAI_AUTH),
        ("/anthropic/v1/messages", {**ANTHROPIC_BODY, "model": "claude-sonnet-4-5"}, ANTHROPIC_AUTH),
        ("/gemini" + GEN, GEMINI_BODY, {"x-goog-api-key": "AIzaTestClientKey0123456789abcdef"}),
    ]
    seen = []
    for path, body, headers in calls:
        async with http.post(proxy.url + path, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            seen.append(r.headers.copy())
    recs = await final_records(proxy)
    assert len(recs) == len(calls)
    for headers, rec in zip(seen, recs):
        assert_headers_are_the_record(headers, rec)
        assert rec["total_cost"] > 0


async def test_openai_stream_ends_with_the_cost_comment_and_the_sdk_reads_it_unchanged(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, texts=("Hel", "lo", "!")))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=OPENAI_AUTH) as r:
        record_id = r.headers["x-llm-cost-record-id"]
        assert "x-llm-cost-usd" not in r.headers  # a stream's headers leave before its cost is known
        raw = await r.read()
    # The comment is the line just before the stream's end marker.
    lines = [line for line in raw.split(b"\n") if line]
    assert lines[-1] == b"data: [DONE]" and lines[-2].startswith(COMMENT_PREFIX)

    # The official SDK, against the proxy and straight against the mock: the same chunks.
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        via_proxy = [ch.model_dump() async for ch in await c.chat.completions.create(**CHAT, stream=True)]
    async with openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        direct = [ch.model_dump() async for ch in await c.chat.completions.create(**CHAT, stream=True)]
    assert via_proxy == direct and "".join(ch["choices"][0]["delta"]["content"] or "" for ch in direct if ch["choices"]) == "Hello!"

    recs = await final_records(proxy)
    assert recs[0]["record_id"] == record_id
    assert_comment_is_the_record(raw, recs[0])


async def test_anthropic_stream_comment_before_message_stop_and_the_sdk_reads_it(mock, proxy, http):
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events())))
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=ANTHROPIC_AUTH) as r:
        raw = await r.read()
    at = raw.index(COMMENT_PREFIX)
    assert raw[at:].split(b"\n")[1] == b"event: message_stop"

    async with anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as c:
        async with c.messages.stream(**ANTHROPIC_BODY) as s:
            via_proxy = [e.model_dump() async for e in s]
            final = await s.get_final_message()
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as c:
        async with c.messages.stream(**ANTHROPIC_BODY) as s:
            direct = [e.model_dump() async for e in s]
    assert via_proxy == direct and final.usage.output_tokens == 200

    recs = await final_records(proxy)
    assert_comment_is_the_record(raw, recs[0])


async def test_responses_stream_gets_the_comment_after_its_final_event(mock, proxy, http):
    mock.on("/v1/responses", stream_reply(mock, sse(responses_stream_events())))
    async with http.post(
        f"{proxy.url}/openai/v1/responses", json={"model": "gpt-5", "input": "Hi", "stream": True}, headers=OPENAI_AUTH
    ) as r:
        raw = await r.read()
    assert raw.rstrip(b"\n").split(b"\n")[-1].startswith(COMMENT_PREFIX)
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        events = [e.type async for e in await c.responses.create(model="gpt-5", input="Hi", stream=True)]
    assert events[-1] == "response.completed"
    recs = await final_records(proxy)
    assert_comment_is_the_record(raw, recs[0])


async def test_gemini_streams_are_left_as_they_are_and_the_record_is_one_request_away(mock, proxy, http):
    upstream = sse((None, c) for c in gemini_stream_chunks())
    mock.on(STREAM_GEN, stream_reply(mock, upstream))
    key = {"x-goog-api-key": "AIzaTestClientKey0123456789abcdef"}
    async with http.post(f"{proxy.url}/gemini{STREAM_GEN}?alt=sse", json=GEMINI_BODY, headers=key) as r:
        record_id = r.headers["x-llm-cost-record-id"]
        raw = await r.read()
    assert raw == b"".join(upstream)  # google-genai reads any non-data line as JSON: nothing added
    async with http.get(f"{proxy.url}/api/calls/{record_id}") as r:
        assert r.status == 200
        served = json.loads(await r.read(), parse_float=Decimal)["record"]
    recs = await final_records(proxy)
    assert served == recs[0] and served["total_cost"] == Decimal("0.0034")


async def test_unpriced_and_unknown_costs_say_so_rather_than_zero(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, model="gpt-unlisted"))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={**CHAT, "model": "gpt-unlisted"}, headers=OPENAI_AUTH) as r:
        assert r.status == 200
        unpriced = r.headers.copy()
    mock.on("/v1/messages", json_reply({"id": "msg_x", "type": "message", "content": []}))  # no usage at all
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json=ANTHROPIC_BODY, headers=ANTHROPIC_AUTH) as r:
        assert r.status == 200
        no_usage = r.headers.copy()
    recs = await final_records(proxy)
    assert recs[0]["total_cost"] is None and recs[0]["total_tokens"] is not None
    assert unpriced["x-llm-cost-usd"] == "unpriced" and unpriced["x-llm-cost-pricing"] == "unpriced"
    assert Decimal(unpriced["x-llm-cost-input-tokens"]) == recs[0]["input_tokens"]
    # The second record is whatever policy made of a reply without usage: the headers follow it.
    rec = recs[1]
    if rec["total_tokens"] is None:
        assert no_usage["x-llm-cost-usd"] == "unknown" and no_usage["x-llm-cost-input-tokens"] == "unknown"
    else:
        assert Decimal(no_usage["x-llm-cost-usd"]) == rec["total_cost"] and no_usage["x-llm-cost-usage"] == rec["usage_source"]


async def test_refusals_and_errors_carry_their_records_id_and_zero_cost(mock, start_proxy, http):
    cfg = make_config(mock.url)
    cfg["budgets"] = {"limits": [{"scope": "global", "period": "daily", "usd": 0.000001}]}
    proxy = await start_proxy(cfg)
    mock.on("/v1/chat/completions", json_reply({"error": {"message": "bad"}}, status=400))
    async with http.post(f"{proxy.url}/nowhere/v1/chat/completions", json=CHAT) as r:
        assert r.status == 404
        unknown = r.headers.copy()
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
        first = r.status, r.headers.copy()
    recs = await final_records(proxy)
    assert unknown["x-llm-cost-record-id"] == recs[0]["record_id"] and unknown["x-llm-cost-usd"] == "0"
    status, headers = first
    assert status in (400, 429) and headers["x-llm-cost-record-id"] == recs[1]["record_id"]
    assert Decimal(headers["x-llm-cost-usd"]) == recs[1]["total_cost"] == 0


async def test_switches_turn_the_headers_and_the_comment_off(mock, start_proxy, http):
    cfg = make_config(mock.url)
    cfg["replies"] = {"cost_headers": False, "stream_comment": False}
    proxy = await start_proxy(cfg)
    events = sse(anthropic_stream_events())
    mock.on("/v1/messages", stream_reply(mock, events))
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with http.post(f"{proxy.url}/anthropic/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, headers=ANTHROPIC_AUTH) as r:
        raw = await r.read()
        assert not [h for h in r.headers if h.lower().startswith("x-llm-cost-")]
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
        assert not [h for h in r.headers if h.lower().startswith("x-llm-cost-")]
    assert raw == b"".join(events)


async def test_api_calls_finds_a_record_after_a_restart_in_the_log(mock, start_proxy, http, tmp_path):
    """In memory for recent calls; a new process (nothing in memory) searches the log."""
    log = tmp_path / "cost.jsonl"
    mock.on("/v1/chat/completions", openai_chat(mock, unique_ids=True))
    first = await start_proxy(make_config(mock.url), log)
    ids = []
    for _ in range(3):
        async with http.post(f"{first.url}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            ids.append(r.headers["x-llm-cost-record-id"])
    await first.stop()
    second = await start_proxy(make_config(mock.url), log)
    written = {r["record_id"]: r for r in exact_records(log.read_text())}
    for rid in ids:
        async with http.get(f"{second.url}/api/calls/{rid}") as r:
            assert r.status == 200
            assert json.loads(await r.read(), parse_float=Decimal)["record"] == written[rid]
    for bad, status in (("0" * 30, 404), ("not%20an%20id", 400), ("x" * 65, 400)):
        async with http.get(f"{second.url}/api/calls/{bad}") as r:
            assert r.status == status and (await r.json())["error"]["message"]


# --- the comment's place, for any stream: SSE parsers see the same events --------------

_EVENT = st.builds(
    lambda name, data: ((f"event: {name}\n" if name else "") + f"data: {data}\n\n").encode(),
    st.sampled_from([None, "message_delta", "ping"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20),
)


def _decoded(raw: bytes) -> list[tuple[str | None, str]]:
    """What the openai/anthropic SDKs' decoder makes of a stream: (event, data) pairs."""
    out = []
    for ev in SSEDecoder().iter_bytes(iter([raw])):
        out.append((ev.event, ev.data))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_EVENT, max_size=6), family=st.sampled_from(["openai", "anthropic"]), cut=st.integers(0, 400), line_start=st.booleans()
)
def test_the_comment_never_changes_the_events_a_client_parses(events: list[bytes], family: str, cut: int, line_start: bool) -> None:
    end = b"data: [DONE]\n\n" if family == "openai" else b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    stream = b"".join(events) + end
    # The proxy holds back the bytes from some chunk boundary on: ``sent`` went out before.
    at = min(cut, len(stream))
    sent, held = stream[:at], stream[at:]
    adapter = ADAPTERS[family]
    comment = b': llm-cost {"record_id":"r1"}\n'
    out = sent + insert_comment(held, comment, adapter.stream_end, sent.endswith(b"\n") or not sent)
    assert _decoded(out) == _decoded(stream)
    assert out.count(comment) == 1
    marker = end.split(b"\n")[0]
    ls = sent.endswith(b"\n") or not sent
    if held.find(marker) > 0 or (held.startswith(marker) and ls):
        # The held bytes show where the end marker's line begins: the comment is just before it.
        assert out.index(comment) + len(comment) == out.rindex(marker)


async def test_a_call_recorded_by_post_api_usage_is_found_and_counted(proxy, http):
    """POST /api/usage once wrote its record without telling the record sinks: /metrics
    never counted it, and /api/calls found it only by searching the log."""
    body = {"model": "gpt-4o", "provider": "openai", "input_tokens": 1000, "output_tokens": 100}
    async with http.post(f"{proxy.url}/api/usage", json=body) as r:
        assert r.status == 201
        posted = json.loads(await r.read(), parse_float=Decimal)["record"]
    async with http.get(f"{proxy.url}/api/calls/{posted['record_id']}") as r:
        assert r.status == 200 and json.loads(await r.read(), parse_float=Decimal)["record"] == posted
    async with http.get(f"{proxy.url}/metrics") as r:
        metrics = await r.text()
    [line] = [m for m in metrics.splitlines() if m.startswith("llm_proxy_cost_usd_total{") and 'model="gpt-4o"' in m]
    assert Decimal(line.rsplit(" ", 1)[1]) == posted["total_cost"]


async def test_a_stream_paused_mid_line_after_its_final_event_is_not_cut_by_the_comment(mock, proxy, http):
    """An error chunk ends an OpenAI stream; the upstream then sends half a line and
    pauses past the relay's wait: the held bytes go out with the record written, and the
    cost line once went in after them, inside the half line (``data: [DO`` + comment +
    ``NE]``)."""
    head = b"".join(sse([(None, {"error": {"message": "overloaded", "type": "server_error"}})]))
    pieces = [head + b"data: [DO", 1.3, b"NE]\n\n"]
    mock.on("/v1/chat/completions", stream_reply(mock, pieces))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}  # not re-framed
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=OPENAI_AUTH) as r:
        raw = await r.read()
    upstream = head + b"data: [DONE]\n\n"
    assert without_cost_comment(raw, None) == upstream
    assert _decoded(raw) == _decoded(upstream)
