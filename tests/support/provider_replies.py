"""Provider-shaped replies for the mock upstream, from the example payloads of
docs/providers.md §1-5: OpenAI chat, completions, embeddings and responses, Anthropic
messages, Gemini generateContent, each as a JSON body, as stream events and (for the
OpenAI endpoints) as a ready handler."""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
from typing import Any, Iterable

from aiohttp import web

from tests.support.mock_upstream import Handler, MockUpstream, Piece, Received, sse

# --- OpenAI -----------------------------------------------------------------------

# §1.1: gpt-4o, prompt 10000 (8000 cached), completion 500 -> $0.020
GPT4O_USAGE = {
    "prompt_tokens": 10000,
    "completion_tokens": 500,
    "total_tokens": 10500,
    "prompt_tokens_details": {"cached_tokens": 8000, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def chat_completion(
    model: str = "gpt-4o-2024-08-06", usage: dict | None = None, rid: str = "chatcmpl-abc123", text: str = "Hi there."
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": 1763800000,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_test",
        "choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": text, "refusal": None}}
        ],
        "usage": GPT4O_USAGE if usage is None else usage,
    }


def chat_chunks(model: str, texts: Iterable[str], usage: dict, include_usage: bool, rid: str = "chatcmpl-x1") -> list[dict]:
    """OpenAI's stream: 'usage': null on every chunk and a last choices=[] chunk only
    when the request asked for include_usage; no usage key at all otherwise."""

    def chunk(choices: list, **extra: Any) -> dict:
        c = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": 1763800000,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_test",
            "choices": choices,
        }
        if include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]
    for t in texts:
        out.append(chunk([{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]))
    out.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    if include_usage:
        out.append(chunk([], usage=usage))
    return out


def openai_chat(
    mock: MockUpstream,
    model: str = "gpt-4o-2024-08-06",
    usage: dict | None = None,
    texts: Iterable[str] = ("Hel", "lo", "!"),
    first_gap: float = 0,
    unique_ids: bool = False,
) -> Handler:
    """Behaves like api.openai.com /v1/chat/completions for both stream and non-stream."""
    usage = GPT4O_USAGE if usage is None else usage
    texts = list(texts)

    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        body = rec.json or {}
        rid = f"chatcmpl-{mock.next_id()}" if unique_ids else "chatcmpl-x1"
        if not body.get("stream"):
            if first_gap:
                await asyncio.sleep(first_gap)
            return web.json_response(chat_completion(model, usage, rid, "".join(texts)))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        events: list[Piece] = [*sse((None, c) for c in chat_chunks(model, texts, usage, include, rid))]
        events += sse([(None, "[DONE]")])
        if first_gap:
            events.insert(1, first_gap)
        return await mock.write_pieces(request, events)

    return handler


def openai_completions(mock: MockUpstream, usage: dict | None = None, model: str = "gpt-3.5-turbo-instruct") -> Handler:
    """Legacy /v1/completions (§2.1)."""
    usage = usage or {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}

    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        body = rec.json or {}
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1763800000, "model": model}
        if not body.get("stream"):
            return web.json_response(
                {**base, "choices": [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}], "usage": usage}
            )
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include else {}
        chunks = [
            {**base, "choices": [{"index": 0, "text": " wor", "finish_reason": None, "logprobs": None}], **extra},
            {**base, "choices": [{"index": 0, "text": "ld", "finish_reason": "stop", "logprobs": None}], **extra},
        ]
        if include:
            chunks.append({**base, "choices": [], "usage": usage})
        return await mock.write_pieces(request, sse([(None, c) for c in chunks] + [(None, "[DONE]")]))

    return handler


def openai_embeddings(tokens: int = 1000, model: str = "text-embedding-3-small") -> Handler:
    """§2.2: only prompt_tokens and total_tokens. Answers base64 when asked, like OpenAI."""

    async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
        body = rec.json or {}
        vector = [0.0123, -0.0456, 0.5]
        emb: Any = vector
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return web.json_response(
            {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": emb}],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return handler


# §3.1: o4-mini, input 5000 (4096 cached), output 800 -> $0.0056408
O4MINI_USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096, "cache_write_tokens": 0},
    "output_tokens": 800,
    "output_tokens_details": {"reasoning_tokens": 640},
    "total_tokens": 5800,
}


def response_object(
    model: str = "o4-mini-2025-04-16",
    usage: dict | None = None,
    status: str = "completed",
    rid: str = "resp_1",
    incomplete: str | None = None,
) -> dict:
    return {
        "id": rid,
        "object": "response",
        "created_at": 1763800000,
        "status": status,
        "model": model,
        "service_tier": "default",
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "error": None,
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "42", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": O4MINI_USAGE if usage is None else usage,
    }


def responses_stream_events(
    terminal: str = "response.completed", model: str = "gpt-5-2025-08-07", usage: dict | None = None, incomplete: str | None = None
) -> list[tuple[str, dict]]:
    """§3.2: named events, no [DONE]; usage only in the terminal event's response."""
    usage = usage or {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 210,
        "output_tokens_details": {"reasoning_tokens": 192},
        "total_tokens": 250,
    }
    start = response_object(model, None, "in_progress", "resp_9")
    start["usage"] = None
    start["output"] = []
    final_status = "completed" if terminal == "response.completed" else terminal.split(".", 1)[1]
    end = response_object(model, usage, final_status, "resp_9", incomplete)
    seq = itertools.count()
    evs: list[tuple[str, dict]] = [
        ("response.created", {"type": "response.created", "sequence_number": next(seq), "response": start}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq), "response": start}),
    ]
    for d in ("Hel", "lo"):
        evs.append(
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": d,
                    "logprobs": [],
                },
            )
        )
    evs.append((terminal, {"type": terminal, "sequence_number": next(seq), "response": end}))
    return evs


# --- Anthropic --------------------------------------------------------------------

# §4.1: Sonnet 4.5, in 50, 1h write 2000, read 10000, out 400 -> $0.02115
SONNET_USAGE = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 2000,
    "cache_read_input_tokens": 10000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 400,
    "service_tier": "standard",
    "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
}


def anthropic_message(model: str = "claude-sonnet-4-5-20250929", usage: dict | None = None, rid: str = "msg_01") -> dict:
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "Done."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": SONNET_USAGE if usage is None else usage,
    }


def anthropic_stream_events(model: str = "claude-haiku-4-5-20251001", rid: str = "msg_02", error: bool = False) -> list[tuple[str, dict]]:
    """§4.2 with a placeholder output count, pings, and two cumulative message_deltas
    (Haiku 4.5: in 100, 5m write 3000, out 200 -> $0.00485). ``error``: an
    overloaded_error event after the first text delta instead of the rest."""
    start_usage = {
        "input_tokens": 100,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 3000, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
        "service_tier": "standard",
    }
    evs: list[tuple[str, dict]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": rid,
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Sure"}}),
    ]
    if error:
        evs.append(("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
        return evs
    evs += [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " thing"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None}, "usage": {"output_tokens": 120}},
        ),
        ("ping", {"type": "ping"}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"input_tokens": 100, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 0, "output_tokens": 200},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return evs


# --- Gemini -----------------------------------------------------------------------

# §5.2: 2.5 Flash, prompt 12000 (10000 cached), candidates 300, thoughts 700 -> $0.0034
FLASH_USAGE = {
    "promptTokenCount": 12000,
    "cachedContentTokenCount": 10000,
    "candidatesTokenCount": 300,
    "thoughtsTokenCount": 700,
    "totalTokenCount": 13000,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12000}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 10000}],
}


def gemini_response(model: str = "gemini-2.5-flash", usage: dict | None = None, text: str = "Paris.", finish: str | None = "STOP") -> dict:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    out: dict[str, Any] = {"candidates": [cand], "modelVersion": model, "responseId": "abc"}
    if usage is not None:
        out["usageMetadata"] = usage
    return out


def gemini_stream_chunks(model: str = "gemini-2.5-flash") -> list[dict]:
    """Running totals on most chunks (last wins), one chunk with none, one with {}."""
    base = {"promptTokenCount": 12000, "cachedContentTokenCount": 10000}
    return [
        gemini_response(model, {**base, "candidatesTokenCount": 1, "totalTokenCount": 12001}, "Pa", None),
        gemini_response(model, {**base, "candidatesTokenCount": 100, "thoughtsTokenCount": 700, "totalTokenCount": 12800}, "r", None),
        gemini_response(model, None, "i", None),
        gemini_response(model, {}, "s", None),
        gemini_response(model, FLASH_USAGE, ".", "STOP"),
    ]
