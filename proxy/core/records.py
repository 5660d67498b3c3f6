"""The JSONL record: one line per call. Pure functions only.

Schema (``schema_version`` 2) is documented in docs/records.md; fields are only ever
added, so readers of older lines keep working. Version 2 changed one meaning: ``endpoint``
is the path the client called on the proxy (``/openai/v1/chat/completions``), where
version 1 wrote the path after the provider's name (``/v1/chat/completions``);
``upgrade_record`` maps a version-1 record as it is read.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Protocol, overload

import orjson

from proxy.core.money import Cost, decimal_text
from proxy.core.usage import CallInfo, Usage

SCHEMA_VERSION = 2

# Client-chosen strings (model names, provider names from the path) are kept to this
# many characters in a record: a 4 MB model name must not cost 4 MB per line.
MAX_NAME_CHARS = 200

# A record id unique across processes and restarts without a syscall per call: a
# random per-process prefix and a counter. Readers drop a repeated id (a retried write).
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def upgrade_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A record of an older schema in the current one's terms, changed in place.

    Version 1's ``endpoint`` was the path after the provider's name, so the path the
    client called is exactly ``/{provider}`` before it (docs/records.md, "Versions")."""
    if rec.get("schema_version") == 1:
        endpoint, provider = rec.get("endpoint"), rec.get("provider")
        if isinstance(endpoint, str) and isinstance(provider, str) and endpoint.startswith("/"):
            rec["endpoint"] = cap_name(f"/{provider}{endpoint}")
        rec["schema_version"] = SCHEMA_VERSION
    return rec


def new_record_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def record_id_prefix() -> str:
    """What every record id this process makes starts with (unique to the process)."""
    return _ID_PREFIX


@overload
def cap_name(text: str) -> str: ...
@overload
def cap_name(text: None) -> None: ...
@overload
def cap_name(text: str | None) -> str | None: ...
def cap_name(text: str | None) -> str | None:
    """A client-chosen name cut to ``MAX_NAME_CHARS``, marker included: the marker
    keeps a cut name from ever equalling (and being priced as) a real, shorter one, and
    a name cut once is not cut again (it still says its original length)."""
    if text is None or len(text) <= MAX_NAME_CHARS:
        return text
    marker = f"…[{len(text)} chars]"
    return text[: MAX_NAME_CHARS - len(marker)] + marker


# Credentials a provider might echo back in an error message ("Incorrect API key
# provided: sk-abc***wxyz"): masked or not, none of it goes into a record.
_SECRET_PATTERNS = re.compile(
    r"(?:sk|pk|rk|sess)-[A-Za-z0-9_\-*]{6,}|sk-ant-[A-Za-z0-9_\-*]+|AIza[0-9A-Za-z_\-]{10,}|ya29\.[0-9A-Za-z_\-.]+"
)


def fingerprint(secret: str) -> str:
    """A short, non-reversible id for a key: enough to tell keys apart, useless to an attacker."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:12]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return _SECRET_PATTERNS.sub("[redacted]", text)


_iso_second: tuple[int, str] = (-1, "")


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds; sorts as text, so ``jq 'select(.timestamp >= "2026-11")'`` works."""
    global _iso_second
    ms = int(ts * 1000)
    sec = ms // 1000
    if _iso_second[0] != sec:  # one strftime per second, not per call
        _iso_second = (sec, datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_iso_second[1]}.{ms % 1000:03d}Z"


class PriceLabel(Protocol):
    """Where a call's price came from, as its record names it (``pricing.ModelPrice``)."""

    @property
    def source(self) -> str: ...

    @property
    def price_id(self) -> str | None: ...


@dataclass(slots=True)
class CallContext:
    """What the shell knows about a call apart from the reply's usage."""

    timestamp: float
    provider: str
    family: str
    endpoint: str
    model: str | None = None
    is_streaming: bool = False
    user_id: str | None = None
    key_id: str | None = None
    ip_address: str | None = None
    metered: bool = False  # an endpoint that bills tokens (chat, messages, …)
    billable: bool = False  # costs money, but its usage cannot be read (images, batches, …)
    tags: dict[str, str] = field(default_factory=dict)
    team: str | None = None
    session_id: str | None = None
    budget_override: bool = False  # a budget would have refused the call; an override let it through

    @property
    def timestamp_dt(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, timezone.utc)


def build_record(
    ctx: CallContext,
    info: CallInfo,
    *,
    usage: Usage | None,
    status: int,
    error: str | None,
    latency_ms: float,
    ttft_ms: float | None,
    usage_source: str | None,
    price: PriceLabel | None,
    cost: Cost | None,
    price_variant: str | None = None,
    record_id: str | None = None,
) -> dict[str, Any]:
    """``usage`` is the reply's (``info.usage``) or an estimate; None when unknown.
    A billable endpoint whose usage cannot be read (images, audio, batches) keeps
    null tokens and cost, so reports say "at least"."""
    if usage is None and (status >= 400 or not (ctx.metered or ctx.billable)) and not info.usage_error:
        # Providers do not bill failed calls, and non-metered endpoints use no tokens:
        # zero is known here, unlike an aborted stream whose usage is simply unknown.
        usage = Usage()
        cost = Cost(Decimal(0), Decimal(0))
    tokens: dict[str, int | None]
    if usage is None:
        tokens = dict.fromkeys(
            (
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "cache_write_1h_tokens",
                "reasoning_tokens",
                "web_search_requests",
            )
        )
    else:
        tokens = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "cache_write_1h_tokens": usage.cache_write_1h_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "web_search_requests": usage.web_search_requests,
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "timestamp": iso_utc(ctx.timestamp),
        "record_id": record_id or new_record_id(),
        "request_id": info.request_id,
        "user_id": ctx.user_id,
        "team": ctx.team,
        "key_id": ctx.key_id,
        "session_id": ctx.session_id,
        "ip_address": ctx.ip_address,
        "provider": cap_name(ctx.provider),
        "provider_type": ctx.family,
        "model": cap_name(ctx.model),
        "response_model": cap_name(info.response_model),
        "endpoint": ctx.endpoint,
        "is_streaming": ctx.is_streaming,
        **tokens,
        "input_cost": cost.input_cost if cost else None,
        "output_cost": cost.output_cost if cost else None,
        "total_cost": cost.total_cost if cost else None,
        "currency": "USD",
        "pricing_source": price.source if (price and cost) else None,
        "price_id": price.price_id if (price and cost) else None,
        "price_variant": price_variant if cost else None,
        "service_tier": info.service_tier,
        "speed": info.speed,
        "finish_reason": info.finish_reason,
        "status": status,
        "error": error,
        "latency_ms": round(latency_ms, 2),
        "ttft_ms": round(ttft_ms, 2) if ttft_ms is not None else None,
        "usage_source": usage_source,
        "usage_error": info.usage_error,
        "raw_usage": info.raw_usage,
        "tags": ctx.tags,
        "budget_override": ctx.budget_override,
    }


def json_default(obj: object) -> orjson.Fragment:
    if isinstance(obj, Decimal):
        # Written as the exact decimal, not via float: 0.0056408 stays 0.0056408.
        return orjson.Fragment(decimal_text(obj))
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# Valid in JSON text but not harmless in it: U+2028/U+2029/U+0085 break lines for
# str.splitlines(), editors and JavaScript line readers; the other C1 controls (U+009B
# is a CSI to some terminals) and bidi overrides garble `cat` and `tail -f` of the log.
# Written as \u escapes. In UTF-8 these byte sequences can only be these characters
# (each starts with a lead byte), so a byte-level replace is exact.
_RISKY = re.compile(rb"\xc2[\x80-\x9f]|\xe2\x80[\x8e\x8f\xa8-\xae]|\xe2\x81[\xa6-\xa9]|\xd8\x9c")


def _escape(m: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(m.group().decode("utf-8"))


def dumps_record(record: dict[str, Any]) -> bytes:
    """One JSON line. Strings that orjson refuses (lone surrogates from a lenient
    parse) are written with U+FFFD in their place instead of failing."""
    try:
        line = orjson.dumps(record, default=json_default, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        line = _dumps_lenient(record)
    if not line.isascii():
        line = _RISKY.sub(_escape, line)
    return line


def _dumps_lenient(record: dict[str, Any]) -> bytes:
    # A lone surrogate (from a leniently parsed request) cannot be UTF-8: readers
    # would reject the line. U+FFFD keeps the line, and everything else in it, valid.
    return orjson.dumps(_valid_strings(record), default=json_default, option=orjson.OPT_APPEND_NEWLINE)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_valid_strings(k): _valid_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_strings(v) for v in value]
    return value
