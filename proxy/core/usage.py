"""The provider-neutral usage record every adapter produces.

One meaning for every provider (see docs/providers.md §8):
``input_tokens`` is *all* input, cache reads and writes included; ``output_tokens``
is *all* output, reasoning and Gemini thoughts included. Cache and reasoning
counts are subsets of those totals, never additions to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.core.estimate import OutputText


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    # All cache writes; ``cache_write_1h_tokens`` is the part with Anthropic's 1-hour TTL.
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        # Never negative, even if a provider reports inconsistent subsets.
        return max(0, self.input_tokens - self.cache_read_tokens - self.cache_write_tokens)


@dataclass(slots=True)
class CallInfo:
    """What an adapter learned from one reply: usage plus the metadata a record keeps."""

    usage: Usage | None = None
    # The provider's usage object exactly as reported (any JSON value), kept so records
    # can be re-priced.
    raw_usage: Any = None
    response_model: str | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    service_tier: str | None = None
    speed: str | None = None
    # An error reported inside a 200 reply (stream error events, failed responses).
    error: str | None = None
    # Why the reply's usage is not believed, e.g. "implausible usage: prompt_tokens=-5"
    # (a negative, fractional, string or absurd count, or a usage that is not an object).
    # ``usage`` is then None and the call stays unpriced, never estimated: the provider
    # did report usage, only not one we can bill. ``raw_usage`` still holds what was sent.
    usage_error: str | None = None
    # The text relayed to the client, for estimating usage a reply did not report.
    output_text: OutputText | None = None
