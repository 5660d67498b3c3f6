"""The simulated provider's replies, without I/O: what a request costs in tokens
(``Plan``, in the normalized meaning of docs/providers.md §8) and that plan written in
each family's own wire shape (§1-5), whole or as stream events.

Deterministic: the same request (and the same cache state) gives the same reply. A
long prompt seen before is read from the cache, as the real providers do: OpenAI and
Gemini by themselves from 1024 prompt tokens, Anthropic up to the last
``cache_control`` breakpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Iterable

CHARS_PER_TOKEN = 4
FRAMING_TOKENS = 4  # per message: role and separators
REPLY_PRIMING = 3
MIN_CACHED_PROMPT = 1024  # tokens: below this no provider caches
OPENAI_CACHE_STEP = 128  # OpenAI caches prompt prefixes in 128-token steps
CREATED = 1763800000  # a fixed `created`: replies are reproducible
WORDS = (
    "the proxy meters every call and prices it from the reply usage so each team sees what "
    "its features cost cache reads are cheaper than fresh input while reasoning tokens bill "
    "as output streams report usage at the end and budgets stop runaway spend"
).split()

# Requested model -> the dated snapshot the real API names in its reply.
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "o4-mini": "o4-mini-2025-04-16",
    "o3": "o3-2025-04-16",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
}
OPENAI_REASONING = ("o1", "o3", "o4", "gpt-5")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one call reports, in the normalized meaning (subsets, never additions)."""

    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    text: str = ""
    rid: str = "sim-0"


def tokens_of(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def strings(value: Any, skip: frozenset[str] = frozenset({"role", "type", "mime_type", "mimeType"})) -> Iterable[str]:
    """Every string in a JSON value, but for keys that are structure, not text."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from strings(v, skip)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in skip:
                yield from strings(v, skip)


def prompt_tokens(parts: Iterable[Any]) -> int:
    """~4 characters a token, plus framing for each message and the reply's priming."""
    n, count = REPLY_PRIMING, 0
    for part in parts:
        count += 1
        n += FRAMING_TOKENS + sum(tokens_of(s) for s in strings(part))
    return n if count else 0


def seed_of(*values: Any) -> int:
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def key_of(*values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def output_length(rng: random.Random, cap: Any, low: int = 12, high: int = 400) -> int:
    n = rng.randint(low, high)
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        n = min(n, cap)
    return n


def words(rng: random.Random, tokens: int) -> str:
    """Visible text of about ``tokens`` tokens (a word is ~1.3 tokens; close enough)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens * 3 // 4))).capitalize() + "."


def snapshot(model: str) -> str:
    return SNAPSHOTS.get(model, model)


def is_reasoning_openai(model: str) -> bool:
    return model.startswith(OPENAI_REASONING)


class PromptCache:
    """Prefixes seen before, by hash: the second time a long prompt comes it is a read."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def check(self, key: str) -> bool:
        """True if ``key`` was seen before; remembers it either way."""
        hit = key in self.seen
        self.seen.add(key)
        return hit


# --- planning: what a request costs ---------------------------------------------------


def plan_openai(body: dict[str, Any], cache: PromptCache, kind: str = "chat") -> Plan:
    model = str(body.get("model") or "gpt-4o-mini")
    rng = random.Random(seed_of(kind, body))
    if kind == "embeddings":
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        n = sum(tokens_of(s) for s in strings(items)) or 1
        return Plan(model, n, 0, rid=f"emb-{rng.getrandbits(48):012x}")
    parts: list[Any] = list(body.get("messages") or []) if kind == "chat" else []
    if kind == "responses":
        if body.get("instructions"):
            parts.append(body["instructions"])
        inp = body.get("input")
        parts.extend(inp if isinstance(inp, list) else [inp] if inp is not None else [])
    n_in = prompt_tokens(parts) or REPLY_PRIMING
    cached = 0
    if n_in >= MIN_CACHED_PROMPT:
        prefix = (n_in // OPENAI_CACHE_STEP) * OPENAI_CACHE_STEP
        # The cache key the client names, else the prompt's own text, as OpenAI routes by both.
        if cache.check(key_of(model, body.get("prompt_cache_key"), parts[:-1] or parts)):
            cached = prefix
    cap = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
    out = output_length(rng, cap)
    reasoning = 0
    if is_reasoning_openai(model):
        reasoning = out * rng.randint(30, 80) // 100
    prefix_id = {"chat": "chatcmpl", "responses": "resp"}[kind]
    return Plan(model, n_in, out, cached, 0, 0, reasoning, words(rng, out - reasoning), f"{prefix_id}-{rng.getrandbits(64):016x}")


def _breakpoints(body: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The request's parts in prompt order (system, then messages) up to and with the
    last block marked ``cache_control``, and that mark's ttl."""
    system = body.get("system")
    blocks: list[Any] = list(system) if isinstance(system, list) else ([system] if system else [])
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        blocks.extend(content if isinstance(content, list) else [m])
    last, ttl = -1, None
    for i, b in enumerate(blocks):
        mark = b.get("cache_control") if isinstance(b, dict) else None
        if isinstance(mark, dict):
            last, ttl = i, mark.get("ttl") if isinstance(mark.get("ttl"), str) else None
    return blocks[: last + 1], ttl


def plan_anthropic(body: dict[str, Any], cache: PromptCache) -> Plan:
    model = str(body.get("model") or "claude-haiku-4-5")
    rng = random.Random(seed_of("messages", body))
    system = body.get("system")
    parts = ([system] if system else []) + list(body.get("messages") or [])
    n_in = prompt_tokens(parts) or REPLY_PRIMING
    read = write = write_1h = 0
    cached_blocks, ttl = _breakpoints(body)
    if cached_blocks:
        prefix = min(n_in, sum(tokens_of(s) for s in strings(cached_blocks)))
        if prefix >= MIN_CACHED_PROMPT:
            if cache.check(key_of(model, cached_blocks)):
                read = prefix
            else:
                write = prefix
                write_1h = prefix if ttl == "1h" else 0
    out = output_length(rng, body.get("max_tokens"))
    thinking = body.get("thinking")
    reasoning = out * rng.randint(30, 70) // 100 if isinstance(thinking, dict) and thinking.get("type") == "enabled" else 0
    return Plan(model, n_in, out, read, write, write_1h, reasoning, words(rng, out - reasoning), f"msg_{rng.getrandbits(64):016x}")


def plan_gemini(model: str, body: dict[str, Any], cache: PromptCache) -> Plan:
    rng = random.Random(seed_of("gemini", model, body))
    contents = body.get("contents") or []
    system = body.get("systemInstruction") or body.get("system_instruction")
    parts = ([system] if system else []) + list(contents if isinstance(contents, list) else [contents])
    n_in = prompt_tokens(parts) or REPLY_PRIMING
    cached = 0
    if n_in >= MIN_CACHED_PROMPT and cache.check(key_of(model, parts[:-1] or parts)):
        cached = n_in * 3 // 4  # implicit caching hits most of a repeated prefix
    config = body.get("generationConfig") or {}
    out = output_length(rng, config.get("maxOutputTokens"))
    thinking = config.get("thinkingConfig") or {}
    thoughts = 0
    if model.startswith("gemini-2.5") and thinking.get("thinkingBudget") != 0:
        thoughts = rng.randint(max(1, out // 2), out * 2)  # thoughts come on top of the visible output
    text_tokens = out
    return Plan(model, n_in, text_tokens + thoughts, cached, 0, 0, thoughts, words(rng, text_tokens), f"sim{rng.getrandbits(48):012x}")


# --- OpenAI wire shapes (§1, §2.2, §3) -----------------------------------------------


def openai_usage(p: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": p.input_tokens,
        "completion_tokens": p.output_tokens,
        "total_tokens": p.input_tokens + p.output_tokens,
        "prompt_tokens_details": {"cached_tokens": p.cache_read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": p.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_reply(p: Plan) -> dict[str, Any]:
    return {
        "id": p.rid,
        "object": "chat.completion",
        "created": CREATED,
        "model": snapshot(p.model),
        "service_tier": "default",
        "system_fingerprint": "fp_simulated",
        "choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": p.text, "refusal": None}}
        ],
        "usage": openai_usage(p),
    }


def pieces(text: str, size: int = 3) -> list[str]:
    """The text in pieces of a few words, as a stream's deltas carry it."""
    ws = text.split(" ")
    return [" ".join(ws[i : i + size]) + (" " if i + size < len(ws) else "") for i in range(0, len(ws), size)]


def chat_chunks(p: Plan, include_usage: bool) -> list[dict[str, Any]]:
    """`usage: null` on every chunk and a last `choices: []` chunk only with include_usage."""

    def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": p.rid,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": snapshot(p.model),
            "service_tier": "default",
            "system_fingerprint": "fp_simulated",
            "choices": choices,
        }
        if include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]
    out += [chunk([{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]) for t in pieces(p.text)]
    out.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    if include_usage:
        out.append(chunk([], usage=openai_usage(p)))
    return out


def embeddings_reply(p: Plan, count: int) -> dict[str, Any]:
    rng = random.Random(seed_of(p.rid))
    data = [{"object": "embedding", "index": i, "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(8)]} for i in range(count)]
    return {"object": "list", "data": data, "model": p.model, "usage": {"prompt_tokens": p.input_tokens, "total_tokens": p.input_tokens}}


def response_object(p: Plan, status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    usage = {
        "input_tokens": p.input_tokens,
        "input_tokens_details": {"cached_tokens": p.cache_read_tokens},
        "output_tokens": p.output_tokens,
        "output_tokens_details": {"reasoning_tokens": p.reasoning_tokens},
        "total_tokens": p.input_tokens + p.output_tokens,
    }
    message = {
        "id": f"msg_{p.rid[5:]}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": p.text, "annotations": []}],
    }
    return {
        "id": p.rid,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": snapshot(p.model),
        "service_tier": "default",
        "error": None,
        "incomplete_details": None,
        "output": [message] if done else [],
        "usage": usage if done else None,
    }


def responses_events(p: Plan) -> list[tuple[str, dict[str, Any]]]:
    """Named events, no [DONE]; usage only in the terminal response.completed."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response_object(p, "in_progress")}),
        ("response.in_progress", {"response": response_object(p, "in_progress")}),
    ]
    events += [
        ("response.output_text.delta", {"item_id": f"msg_{p.rid[5:]}", "output_index": 0, "content_index": 0, "delta": t})
        for t in pieces(p.text)
    ]
    events.append(("response.output_text.done", {"item_id": f"msg_{p.rid[5:]}", "output_index": 0, "content_index": 0, "text": p.text}))
    events.append(("response.completed", {"response": response_object(p)}))
    return [(name, {"type": name, "sequence_number": i, **data}) for i, (name, data) in enumerate(events)]


# --- Anthropic wire shapes (§4) ------------------------------------------------------


def anthropic_usage(p: Plan, output_tokens: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": p.input_tokens - p.cache_read_tokens - p.cache_write_tokens,
        "cache_creation_input_tokens": p.cache_write_tokens,
        "cache_read_input_tokens": p.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": p.cache_write_tokens - p.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": p.cache_write_1h_tokens,
        },
        "output_tokens": p.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }
    if p.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": p.reasoning_tokens}
    return usage


def message_reply(p: Plan) -> dict[str, Any]:
    return {
        "id": p.rid,
        "type": "message",
        "role": "assistant",
        "model": snapshot(p.model),
        "content": [{"type": "text", "text": p.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": anthropic_usage(p),
    }


def message_events(p: Plan) -> list[tuple[str, dict[str, Any]]]:
    """message_start (input usage, placeholder output), text deltas, message_delta with
    cumulative output, message_stop."""
    start = {**message_reply(p), "content": [], "stop_reason": None, "usage": anthropic_usage(p, output_tokens=1)}
    start["usage"].pop("output_tokens_details", None)
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
        for t in pieces(p.text)
    ]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta_usage: dict[str, Any] = {"output_tokens": p.output_tokens}
    if p.reasoning_tokens:
        delta_usage["output_tokens_details"] = {"thinking_tokens": p.reasoning_tokens}
    events.append(
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": delta_usage})
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# --- Gemini wire shapes (§5) ---------------------------------------------------------


def gemini_usage(p: Plan, candidates: int | None = None) -> dict[str, Any]:
    visible = p.output_tokens - p.reasoning_tokens
    shown = visible if candidates is None else candidates
    meta: dict[str, Any] = {"promptTokenCount": p.input_tokens, "candidatesTokenCount": shown}
    if p.cache_read_tokens:
        meta["cachedContentTokenCount"] = p.cache_read_tokens
    if p.reasoning_tokens:
        meta["thoughtsTokenCount"] = p.reasoning_tokens
    meta["totalTokenCount"] = p.input_tokens + shown + p.reasoning_tokens
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": p.input_tokens}]
    return meta


def gemini_reply(p: Plan, text: str | None = None, candidates: int | None = None, final: bool = True) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": p.text if text is None else text}], "role": "model"}, "index": 0}
    if final:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": gemini_usage(p, candidates), "modelVersion": p.model, "responseId": p.rid}


def gemini_chunks(p: Plan) -> list[dict[str, Any]]:
    """Running totals on every chunk: the prompt repeated, candidates growing."""
    texts = pieces(p.text, size=6)
    visible = p.output_tokens - p.reasoning_tokens
    out = []
    for i, t in enumerate(texts, 1):
        final = i == len(texts)
        out.append(gemini_reply(p, t, visible if final else visible * i // len(texts), final))
    return out


# --- errors in each family's own shape -----------------------------------------------

_OPENAI_ERRORS = {
    429: ("Rate limit reached for requests (simulated).", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request (simulated).", "server_error", None),
}
_ANTHROPIC_ERRORS = {
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
    500: ("api_error", "Internal server error (simulated)."),
}
_GEMINI_ERRORS = {
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (simulated)."),
    500: ("INTERNAL", "An internal error has occurred (simulated)."),
}
ERROR_STATUSES = (429, 500)


def error_body(family: str, status: int) -> dict[str, Any]:
    if family == "anthropic":
        kind, message = _ANTHROPIC_ERRORS[status]
        return {"type": "error", "error": {"type": kind, "message": message}}
    if family == "gemini":
        code, message = _GEMINI_ERRORS[status]
        return {"error": {"code": status, "message": message, "status": code}}
    message, kind, err_code = _OPENAI_ERRORS[status]
    return {"error": {"message": message, "type": kind, "param": None, "code": err_code}}
