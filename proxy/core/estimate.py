"""Token estimates for calls that end without reported usage (client abort, upstream
cut, an OpenAI-compatible server that ignores ``include_usage``).

Counts use the o200k BPE from ``bpe-openai`` when installed (its vocabulary ships
inside the wheel: no download; ~140 MB in memory, loaded once at start-up), else a
character heuristic. The BPE is exact for the text of OpenAI's current models and an
approximation for other families; the heuristic is rough (±20%). The record says
``usage_source: "estimated"`` either way. Accuracy figures: README, "Estimated usage".
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from typing import Any, Callable

# Chat formats wrap every message in a few tokens (separators) and prime the reply with
# a few more; OpenAI's cookbook (num_tokens_from_messages) gives 3 and 3 for current
# models, plus every value of the message encoded on its own (the role too) and one
# more for a `name`. Counted that way, a chat prompt is estimated exactly as OpenAI
# counts it (docs/providers.md §10).
PER_MESSAGE_TOKENS = 3
PER_NAME_TOKENS = 1
REPLY_PRIMER_TOKENS = 3
# Keep at most this much relayed text before counting it, so memory stays flat.
_TEXT_BUFFER_CHARS = 16_384


# o200k is the vocabulary of every current OpenAI model; older cl100k models differ by a
# few percent, not worth a second 70+ MB vocabulary in memory.
_ENCODING = "o200k_base"


@lru_cache(maxsize=1)
def _encoder(name: str) -> Callable[[str], int] | None:
    try:
        import bpe_openai
    except ImportError:
        return None
    enc = bpe_openai.get_encoding(name)
    return lambda text: len(enc.encode(text, disallowed_special=()))


def heuristic_tokens(text: str) -> int:
    """~4 characters a token for English prose and code; non-ASCII scripts run closer
    to one token per character, so they count more."""
    if not text:
        return 0
    ascii_chars = sum(1 for c in text if c < "\x80") if len(text) < 10_000 else len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4 + (len(text) - ascii_chars) * 0.9)


# Estimation runs on the event loop when a call ends: above this size, count a sample
# and scale, so a 32 MB prompt costs milliseconds rather than seconds.
_EXACT_LIMIT = 262_144


def count_tokens(text: str, model: str | None = None) -> int:
    if not text:
        return 0
    enc = _encoder(_ENCODING)
    if enc is None:
        return heuristic_tokens(text)
    if len(text) <= _EXACT_LIMIT:
        return enc(text)
    sample = text[:_EXACT_LIMIT]
    return math.ceil(enc(sample) * len(text) / len(sample))


def warm_up() -> str:
    """Load the vocabularies now (a blocking ~0.1-1 s), not during the first call that
    needs an estimate; run it in a thread at start-up."""
    _encoder(_ENCODING)
    return tokenizer_name()


def tokenizer_name() -> str:
    return "bpe-openai" if _encoder(_ENCODING) is not None else "heuristic"


class OutputText:
    """Text relayed to the client, for a reply that never reports usage.

    Nothing is tokenized while the stream runs (the usage normally arrives at its end):
    only a character count and the last ``_TEXT_BUFFER_CHARS`` characters are kept, so
    memory stays flat. A longer text is counted from that sample, scaled by length."""

    __slots__ = ("_parts", "_held", "_chars", "model")

    def __init__(self, model: str | None = None) -> None:
        self._parts: deque[str] = deque()
        self._held = 0
        self._chars = 0
        self.model = model

    def add(self, text: object) -> None:
        if not isinstance(text, str) or not text:
            return
        self._parts.append(text)
        self._held += len(text)
        self._chars += len(text)
        while self._held > _TEXT_BUFFER_CHARS and len(self._parts) > 1:
            self._held -= len(self._parts.popleft())

    def tokens(self) -> int:
        if not self._chars:
            return 0
        sample = "".join(self._parts)
        counted = count_tokens(sample, self.model)
        if len(sample) >= self._chars:
            return counted
        return math.ceil(counted * self._chars / len(sample))

    @property
    def empty(self) -> bool:
        return not self._chars


# Keys whose string values are prompt text in any family's request body.
_SKIP_KEYS = frozenset(
    {
        "model",
        "role",
        "type",
        "id",
        "tool_call_id",
        "stream",
        "stream_options",
        "metadata",
        "user",
        "temperature",
        "top_p",
        "max_tokens",
        "max_output_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "service_tier",
        "store",
        "seed",
        "reasoning_effort",
        "cache_control",
        "mime_type",
        "mimeType",
        "response_format",
        "generationConfig",
        "safetySettings",
        "thinking",
        "anthropic_version",
        "image_url",
        "inline_data",
        "inlineData",
        "source",
        "file_data",
        "fileData",
        "url",
        "signature",
    }
)


def _collect(obj: object, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, list):
        for item in obj:
            _collect(item, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _SKIP_KEYS:
                _collect(v, out)


def _messages(body: dict[str, Any]) -> int:
    for key in ("messages", "contents", "input"):
        value = body.get(key)
        if isinstance(value, list):
            return len(value)
    return 1


def _text_tokens(value: object, model: str | None) -> int:
    parts: list[str] = []
    _collect(value, parts)
    return count_tokens("\n".join(parts), model)


def chat_messages_tokens(messages: list[Any], model: str | None = None) -> int:
    """A Chat Completions ``messages`` list as OpenAI counts it: per message the framing
    plus each string value encoded separately (role, content, name); a ``content`` list
    counts its text parts, other values (tool calls) their text."""
    total = 0
    for message in messages:
        total += PER_MESSAGE_TOKENS
        if not isinstance(message, dict):
            total += _text_tokens(message, model)
            continue
        for key, value in message.items():
            if isinstance(value, str):
                total += count_tokens(value, model)
                if key == "name":
                    total += PER_NAME_TOKENS
            elif key == "content" and isinstance(value, list):
                total += sum(_text_tokens(part, model) for part in value)
            elif key not in _SKIP_KEYS:
                total += _text_tokens(value, model)
    return total


def estimate_input_tokens(body: object, model: str | None = None) -> int:
    """Input tokens of a request body of any family: its text plus message framing.
    Images, audio and files are not counted (they are priced per provider rules)."""
    if not isinstance(body, dict):
        return 0
    messages = body.get("messages")
    if isinstance(messages, list):
        rest = {k: v for k, v in body.items() if k != "messages"}
        return chat_messages_tokens(messages, model) + _text_tokens(rest, model) + REPLY_PRIMER_TOKENS
    return _text_tokens(body, model) + PER_MESSAGE_TOKENS * _messages(body) + REPLY_PRIMER_TOKENS
