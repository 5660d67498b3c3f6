"""The pure core: adapters and stream parsers on plain payloads (docs/providers.md §1-5)."""

from __future__ import annotations

import json

import pytest

from proxy.core.sse import JSONArrayStreamParser, SSEParser
from proxy.providers import ADAPTERS

openai = ADAPTERS["openai"]
anthropic = ADAPTERS["anthropic"]
gemini = ADAPTERS["gemini"]


def sse(*events: tuple[str | None, dict | str], sep: str = "\n\n") -> bytes:
    out = []
    for name, data in events:
        body = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + f"data: {body}{sep}")
    return "".join(out).encode()


def run_tap(tap, raw: bytes, piece: int | None = None) -> tuple[list[bytes], object]:
    parser = SSEParser()
    kept: list[bytes] = []
    pieces = [raw] if piece is None else [raw[i : i + piece] for i in range(0, len(raw), piece)]
    for p in pieces:
        for ev in parser.feed(p):
            if tap.on_event(ev.event, ev.data):
                kept.append(ev.raw)
    return kept, tap.result()


# --- SSE framing -------------------------------------------------------------------


@pytest.mark.parametrize("piece", [None, 1, 3, 7])
def test_sse_events_split_across_reads_and_mixed_line_endings(piece):
    raw = b': keep-alive\n\nevent: a\ndata: {"x":\ndata: 1}\n\ndata: two\r\n\r\ndata: [DONE]\n\n'
    parser = SSEParser()
    events = []
    chunks = [raw] if piece is None else [raw[i : i + piece] for i in range(0, len(raw), piece)]
    for c in chunks:
        events += parser.feed(c)
    assert [(e.event, e.data) for e in events] == [("a", '{"x":\n1}'), (None, "two"), (None, "[DONE]")]
    assert b"".join(e.raw for e in events) == raw[len(b": keep-alive\n\n") :]


def test_sse_flush_returns_unterminated_last_event():
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}') == []
    [ev] = parser.flush()
    assert ev.data == '{"a": 1}'


@pytest.mark.parametrize("piece", [None, 1, 5])
def test_json_array_stream_splits_elements_with_tricky_strings(piece):
    elems = [{"t": 'a}]\\"[{'}, {"u": {"v": [1, 2, {"w": "x"}]}}, {"z": "\\"}]
    raw = ("[" + ",\r\n".join(json.dumps(e) for e in elems) + "]").encode()
    parser = JSONArrayStreamParser()
    out = []
    chunks = [raw] if piece is None else [raw[i : i + piece] for i in range(0, len(raw), piece)]
    for c in chunks:
        out += parser.feed(c)
    assert [json.loads(o) for o in out] == elems


# --- OpenAI ------------------------------------------------------------------------


def test_openai_chat_reply_cached_tokens_are_a_subset_of_input():
    ep = openai.endpoint("/v1/chat/completions", "POST")
    info = openai.parse_reply(
        ep,
        {
            "id": "chatcmpl-abc123",
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}],
            "usage": {
                "prompt_tokens": 10000,
                "completion_tokens": 500,
                "total_tokens": 10500,
                "prompt_tokens_details": {"cached_tokens": 8000},
                "completion_tokens_details": {"reasoning_tokens": 120},
            },
        },
    )
    u = info.usage
    assert (u.input_tokens, u.cache_read_tokens, u.uncached_input_tokens) == (10000, 8000, 2000)
    # reasoning is already inside completion_tokens: not added again
    assert (u.output_tokens, u.reasoning_tokens, u.total_tokens) == (500, 120, 10500)
    assert (info.request_id, info.response_model, info.finish_reason) == ("chatcmpl-abc123", "gpt-4o-2024-08-06", "stop")


def test_openai_compatible_gap_between_total_and_parts_is_output():
    # Gemini's compat layer has left thoughts out of completion_tokens but in total_tokens.
    info = openai.parse_reply(
        openai.endpoint("/chat/completions", "POST"), {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 40}}
    )
    assert info.usage.output_tokens == 30


def test_openai_embeddings_have_input_only():
    info = openai.parse_reply(
        openai.endpoint("/v1/embeddings", "POST"),
        {"object": "list", "model": "text-embedding-3-small", "usage": {"prompt_tokens": 1000, "total_tokens": 1000}},
    )
    assert (info.usage.input_tokens, info.usage.output_tokens) == (1000, 0)


def test_openai_stream_injects_include_usage_and_hides_the_chunk():
    ep = openai.endpoint("/v1/chat/completions", "POST")
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_obfuscation": False}}
    prepared = openai.prepare(ep, body, stream=True)
    assert prepared.body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert prepared.hide_usage_chunk and "include_usage" not in body["stream_options"]  # caller's dict untouched
    base = {"id": "chatcmpl-x1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18"}
    raw = sse(
        (None, {**base, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}], "usage": None}),
        (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        (None, {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}),
        (None, "[DONE]"),
    )
    kept, info = run_tap(openai.stream_tap(ep, prepared.hide_usage_chunk), raw, piece=5)
    assert len(kept) == 3 and b'"choices": []' not in b"".join(kept)
    assert (info.usage.input_tokens, info.usage.output_tokens, info.finish_reason) == (12, 2, "stop")


def test_openai_stream_keeps_usage_chunk_when_client_asked():
    ep = openai.endpoint("/v1/chat/completions", "POST")
    assert openai.prepare(ep, {"stream": True, "stream_options": {"include_usage": True}}, stream=True) is None
    assert openai.prepare(ep, {"stream": False}, stream=False) is None  # only for streams
    raw = sse((None, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
    kept, _ = run_tap(openai.stream_tap(ep, False), raw)
    assert len(kept) == 1


def test_openai_responses_stream_usage_from_terminal_event():
    ep = openai.endpoint("/v1/responses", "POST")
    raw = sse(
        (
            "response.created",
            {"type": "response.created", "response": {"id": "resp_9", "status": "in_progress", "model": "gpt-5-2025-08-07", "usage": None}},
        ),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hel"}),
        (
            "response.completed",
            {
                "type": "response.completed",
                "response": {
                    "id": "resp_9",
                    "status": "completed",
                    "model": "gpt-5-2025-08-07",
                    "service_tier": "flex",
                    "output": [{"type": "web_search_call"}, {"type": "message"}],
                    "usage": {
                        "input_tokens": 40,
                        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                        "output_tokens": 210,
                        "output_tokens_details": {"reasoning_tokens": 192},
                        "total_tokens": 250,
                    },
                },
            },
        ),
    )
    _, info = run_tap(openai.stream_tap(ep, False), raw, piece=11)
    u = info.usage
    assert (u.input_tokens, u.output_tokens, u.reasoning_tokens, u.web_search_requests) == (40, 210, 192, 1)
    assert (info.service_tier, info.finish_reason, info.request_id) == ("flex", "completed", "resp_9")


# --- Anthropic -----------------------------------------------------------------------


def test_anthropic_reply_input_is_the_sum_of_three_disjoint_counts():
    info = anthropic.parse_reply(
        anthropic.endpoint("/v1/messages", "POST"),
        {
            "id": "msg_01",
            "type": "message",
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 50,
                "cache_creation_input_tokens": 2000,
                "cache_read_input_tokens": 10000,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2000},
                "output_tokens": 400,
                "service_tier": "standard",
                "server_tool_use": {"web_search_requests": 2},
            },
        },
    )
    u = info.usage
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (12050, 10000, 2000, 2000)
    assert (u.output_tokens, u.web_search_requests, u.uncached_input_tokens) == (400, 2, 50)


def test_anthropic_stream_overwrites_cumulative_deltas_never_adds():
    ep = anthropic.endpoint("/v1/messages", "POST")
    start_usage = {
        "input_tokens": 100,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 3000, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
        "service_tier": "standard",
    }
    raw = sse(
        (
            "message_start",
            {"type": "message_start", "message": {"id": "msg_02", "model": "claude-haiku-4-5-20251001", "usage": start_usage}},
        ),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Sure"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 120}}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 100, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 0, "output_tokens": 200},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    _, info = run_tap(anthropic.stream_tap(ep, False), raw, piece=13)
    u = info.usage
    assert (u.input_tokens, u.cache_write_tokens, u.cache_write_1h_tokens, u.output_tokens) == (3100, 3000, 0, 200)
    assert (info.finish_reason, info.response_model) == ("end_turn", "claude-haiku-4-5-20251001")


def test_anthropic_stream_error_after_200_keeps_partial_usage():
    ep = anthropic.endpoint("/v1/messages", "POST")
    raw = sse(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"id": "m", "model": "claude-haiku-4-5", "usage": {"input_tokens": 7, "output_tokens": 1}},
            },
        ),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    _, info = run_tap(anthropic.stream_tap(ep, False), raw)
    assert info.error == "Overloaded" and info.usage.input_tokens == 7


# --- Gemini ------------------------------------------------------------------------


def test_gemini_thoughts_are_output_and_tool_prompt_is_input():
    ep = gemini.endpoint("/v1beta/models/gemini-2.5-flash:generateContent", "POST")
    assert (ep.kind, ep.model, ep.stream) == ("generate", "gemini-2.5-flash", False)
    info = gemini.parse_reply(
        ep,
        {
            "candidates": [{"finishReason": "STOP", "index": 0}],
            "usageMetadata": {
                "promptTokenCount": 12000,
                "cachedContentTokenCount": 10000,
                "candidatesTokenCount": 300,
                "thoughtsTokenCount": 700,
                "toolUsePromptTokenCount": 50,
                "totalTokenCount": 13050,
            },
            "modelVersion": "gemini-2.5-flash",
            "responseId": "abc",
        },
    )
    u = info.usage
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens, u.reasoning_tokens) == (12050, 10000, 1000, 700)


def test_gemini_stream_last_usage_wins_and_missing_block_does_not_reset():
    ep = gemini.endpoint("/v1beta/models/gemini-2.5-pro:streamGenerateContent", "POST")
    assert ep.stream
    raw = sse(
        (
            None,
            {
                "candidates": [{"index": 0}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1, "totalTokenCount": 10},
                "modelVersion": "gemini-2.5-pro",
            },
        ),
        (
            None,
            {
                "candidates": [{"index": 0}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "thoughtsTokenCount": 120, "totalTokenCount": 132},
            },
        ),
        (None, {"candidates": [{"finishReason": "STOP", "index": 0}]}),
        sep="\r\n\r\n",
    )
    _, info = run_tap(gemini.stream_tap(ep, False), raw, piece=4)
    assert (info.usage.input_tokens, info.usage.output_tokens, info.finish_reason) == (9, 123, "STOP")


def test_error_bodies_use_each_familys_shape():
    assert openai.error_body(502, "x")["error"]["message"] == "x"
    assert anthropic.error_body(429, "y") == {"type": "error", "error": {"type": "rate_limit_error", "message": "y"}}
    assert gemini.error_body(504, "z")["error"] == {"code": 504, "message": "z", "status": "DEADLINE_EXCEEDED"}
