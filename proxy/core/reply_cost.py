"""A call's cost as its reply carries it (docs/replies.md): the ``x-llm-cost-*`` headers
of a whole reply, and the SSE comment line placed near the end of an OpenAI-family or
Anthropic stream (where each family's stream takes it: docs/providers.md §12). Both are
read from the call's record, so their figures are the record's, digit for digit. Pure."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Mapping

import orjson

from proxy.core.money import decimal_text

HEADER_PREFIX = "x-llm-cost-"
RECORD_ID_HEADER = HEADER_PREFIX + "record-id"
# The record's fields a reply carries (the comment's JSON keys are these names); the cost
# first, for a reader that only wants that.
FACTS = (
    "total_cost",
    "input_cost",
    "output_cost",
    "currency",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "pricing_source",
    "usage_source",
    "record_id",
)
# Header name for each fact after the record id; the name is the prefix plus this.
_HEADERS = (
    ("total_cost", "usd"),
    ("input_cost", "input-usd"),
    ("output_cost", "output-usd"),
    ("input_tokens", "input-tokens"),
    ("output_tokens", "output-tokens"),
    ("cache_read_tokens", "cache-read-tokens"),
    ("cache_write_tokens", "cache-write-tokens"),
    ("reasoning_tokens", "reasoning-tokens"),
)
# (record field, header name, is money) for each of _HEADERS.
_NAMED = tuple((field, HEADER_PREFIX + suffix, field.endswith("_cost")) for field, suffix in _HEADERS)
_PRICING_HEADER = HEADER_PREFIX + "pricing"
_USAGE_HEADER = HEADER_PREFIX + "usage"
COMMENT_PREFIX = b": llm-cost "


def _exact(value: Any) -> str:
    # Money as the record writes it (records.json_default), counts as they are.
    return decimal_text(value) if isinstance(value, Decimal) else str(value)


def cost_headers(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The headers of a whole reply. A cost the proxy does not know is never sent as 0:
    ``unpriced`` when the tokens are known but the model has no price, ``unknown`` when
    the usage itself is unknown (so are the token headers then)."""
    get = record.get  # on every whole reply: header names made once, a count written without _exact
    usage_known = get("total_tokens") is not None
    priced = get("total_cost") is not None
    missing = "unpriced" if usage_known else "unknown"
    out = [(RECORD_ID_HEADER, str(get("record_id")))]
    for field, name, money in _NAMED:
        value = get(field)
        if value is None:
            out.append((name, missing if money else "unknown"))
        elif type(value) is int:
            out.append((name, str(value)))
        else:
            out.append((name, _exact(value)))
    out.append((_PRICING_HEADER, str(get("pricing_source")) if priced else missing))
    out.append((_USAGE_HEADER, str(get("usage_source") or "unknown")))
    return out


def comment_line(record: Mapping[str, Any], default: Any = None) -> bytes:
    """``: llm-cost {...}`` and its line end: the record's facts as JSON, numbers written
    as the record writes them (``default`` is the record's JSON default)."""
    facts = {k: record.get(k) for k in FACTS}
    return COMMENT_PREFIX + orjson.dumps(facts, default=default) + b"\n"


def insert_comment(held: bytes, comment: bytes, end: re.Pattern[bytes] | None, line_start: bool) -> bytes:
    """The stream's last bytes with ``comment`` (one whole line) placed at the start of the
    line where the stream's end marker begins (``end`` matches a line end and then the
    marker as group 1: ``data: [DONE]``, ``event: message_stop``), so a client reads it
    before the stream ends; with no end marker in ``held`` it goes after them, if they end
    a line (else nowhere: ``held`` comes back as it was). A comment line is ignored by SSE
    parsers wherever it stands, so it never changes or splits an event. ``line_start``:
    the bytes sent before ``held`` ended a line."""
    if end is not None:
        lead = b"\n" if line_start else b""
        found = None
        for found in end.finditer(lead + held):
            pass
        if found is not None:
            at = found.start(1) - len(lead)
            return held[:at] + comment + held[at:]
    if held and not held.endswith((b"\n", b"\r")):
        return held  # they end inside a line: no place for a line of our own
    if not held and not line_start:
        return held
    return held + comment
