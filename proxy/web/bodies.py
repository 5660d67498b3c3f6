"""Request bodies: read as leniently as the providers do, and digested for metering.

Providers parse JSON with lenient parsers: a lone surrogate escape (``"\\ud800"``),
a byte-order mark, integers beyond 64 bits all pass. orjson refuses them, and a body
we cannot read is a call we cannot meter or budget, so the standard library's parser
is the fallback.

A huge body (tens of MB, hundreds of thousands of messages) takes the better part
of a second to parse and to estimate, with the GIL held all along, so a thread does
not help: ``digest`` runs in a worker process for those, and hands back only the
small facts metering needs. It is pure, so the same function serves both paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.estimate import estimate_input_tokens
from proxy.providers import ADAPTERS, Endpoint

# Above this many bytes a body is digested in a worker process, off the event loop.
OFFLOAD_BYTES = 1 << 20
# Or above this many double quotes (two per JSON string): the input estimate costs about
# 20 us per string, whatever its length, so 25,000 tiny messages in under 1 MB would hold
# the loop for half a second. 4,000 quotes is about 40 ms of estimate; counting them is
# one pass over the bytes.
OFFLOAD_QUOTES = 4000


def digest_here(raw: bytes) -> bool:
    """Whether a body is cheap enough to digest on the event loop."""
    return len(raw) <= OFFLOAD_BYTES and raw.count(b'"') <= OFFLOAD_QUOTES


# Top-level keys that hold the prompt: the bulk of a big body, and nothing metering
# reads except through the input estimate.
_BULK_KEYS = frozenset(
    {"messages", "contents", "input", "prompt", "system", "tools", "instructions", "system_instruction", "systemInstruction", "documents"}
)


class UnreadableBody(ValueError):
    pass


def parse_json(raw: bytes) -> Any:
    """JSON as a provider reads it; ``UnreadableBody`` when even the lenient parser fails."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8-sig")  # drops a byte-order mark
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnreadableBody(str(e)[:120]) from None


def dumps_json(obj: Any) -> bytes:
    """Serialize a (possibly leniently parsed) body: lone surrogates go out escaped,
    exactly as the client sent them."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


@dataclass(slots=True)
class BodyDigest:
    """What metering needs of a request body."""

    body: Any  # the parsed body; for an offloaded body only its small top-level fields
    unreadable: str | None = None  # why the body could not be parsed
    prepared: bytes | None = None  # the body to send instead (the adapter changed it)
    hide_usage_chunk: bool = False
    input_tokens: int | None = None  # estimated; filled for offloaded bodies
    asks_cache: bool = False  # mentions cache_control (worst case: all input is a cache write)
    asks_cache_1h: bool = False


def digest(family: str, endpoint: Endpoint, raw: bytes, *, full: bool = True) -> BodyDigest:
    """Parse ``raw`` and derive what metering needs. ``full=False`` (the worker-process
    path) returns only the top-level fields and precomputes the input estimate."""
    try:
        body = parse_json(raw)
    except UnreadableBody as e:
        return BodyDigest(None, unreadable=str(e))
    adapter = ADAPTERS[family]
    prepared = adapter.prepare(endpoint, body, adapter.wants_stream(endpoint, body))
    out = BodyDigest(
        body,
        prepared=dumps_json(prepared.body) if prepared is not None else None,
        hide_usage_chunk=prepared.hide_usage_chunk if prepared is not None else False,
        asks_cache=b"cache_control" in raw,
    )
    out.asks_cache_1h = out.asks_cache and b'"1h"' in raw
    if not full:
        model = adapter.requested_model(endpoint, body)
        out.input_tokens = estimate_input_tokens(body, model)
        if isinstance(body, dict):
            out.body = {k: v for k, v in body.items() if k not in _BULK_KEYS}
    return out


def digest_offloaded(family: str, endpoint: Endpoint, raw: bytes) -> BodyDigest:
    """The worker-process entry point (picklable, module level)."""
    return digest(family, endpoint, raw, full=False)
