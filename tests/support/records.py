"""What every logged record must look like, and reading a JSONL log back exactly."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from proxy.core.timestamps import iso_ms
from tests.support.config import ALL_KEYS

RECORD_FIELDS = {
    "schema_version",
    "timestamp",
    "request_id",
    "user_id",
    "key_id",
    "ip_address",
    "provider",
    "provider_type",
    "model",
    "response_model",
    "endpoint",
    "is_streaming",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "input_cost",
    "output_cost",
    "total_cost",
    "currency",
    "pricing_source",
    "price_id",
    "service_tier",
    "finish_reason",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "usage_source",
    "raw_usage",
    "tags",
}
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_search_requests",
)
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def dec(x: Any) -> Decimal | None:
    return None if x is None else Decimal(str(x))


def check_record(rec: dict) -> None:
    """Shape every record must have, whatever happened to the call."""
    assert RECORD_FIELDS <= set(rec), RECORD_FIELDS - set(rec)  # fields are only ever added
    assert rec["schema_version"] == 2
    # The path the client called on the proxy (schema 2), which starts with the provider's name.
    # (A capped provider name is compared by its first 100 characters, which capping keeps.)
    assert rec["endpoint"] is None or rec["endpoint"].startswith(f"/{rec['provider'][:100]}"), rec["endpoint"]
    assert _TS.match(rec["timestamp"]), rec["timestamp"]
    assert rec["currency"] == "USD"
    assert isinstance(rec["status"], int)
    assert isinstance(rec["is_streaming"], bool)
    if rec.get("usage_source") == "manual":  # a call made outside the proxy: no latency measured
        assert rec["latency_ms"] is None
    else:
        assert isinstance(rec["latency_ms"], (int, float, Decimal)) and rec["latency_ms"] >= 0
    for f in TOKEN_FIELDS:
        assert rec[f] is None or (isinstance(rec[f], int) and rec[f] >= 0), (f, rec[f])
    if rec["input_tokens"] is not None:
        assert rec["total_tokens"] == rec["input_tokens"] + rec["output_tokens"]
        assert rec["cache_read_tokens"] + rec["cache_write_tokens"] <= rec["input_tokens"]
    if rec["total_cost"] is not None:
        total, input_cost, output_cost = dec(rec["total_cost"]), dec(rec["input_cost"]), dec(rec["output_cost"])
        assert total is not None and input_cost is not None and output_cost is not None, rec
        assert total == input_cost + output_cost
        # A cost of 0 only when nothing was used; an unpriced model has null, never 0.
        if rec["total_tokens"]:
            assert total > 0, rec
    else:
        assert rec["input_cost"] is None and rec["output_cost"] is None
    assert rec["ip_address"] in ("127.0.0.1", None)


def parse_log(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        assert line.strip(), "blank line in the log"
        rec = json.loads(line, parse_float=Decimal)  # exact decimals as written
        check_record(rec)
        records.append(rec)
    return records


def assert_no_secrets(text: str, *secrets: str) -> None:
    for s in secrets or ALL_KEYS:
        assert s not in text, f"a key leaked into the log: {s[:8]}…"


def gpt4o_call(ts: float, **fields: Any) -> dict[str, Any]:
    """A plain priced gpt-4o call stamped at ``ts`` (1,000 in, 100 out, $0.0035), as the
    CLI tests' small logs hold them; ``fields`` override or add to it."""
    return {
        "timestamp": iso_ms(ts),
        "provider": "openai",
        "provider_type": "openai",
        "model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06",
        "status": 200,
        "input_tokens": 1000,
        "output_tokens": 100,
        "total_tokens": 1100,
        "total_cost": 0.0035,
        "user_id": "alice",
        **fields,
    }
