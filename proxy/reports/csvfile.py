"""CSV output: one row per request, or one per group; cells a spreadsheet shows as written."""

from __future__ import annotations

import csv
from typing import IO, Any, Iterable

import orjson

from proxy.core.money import units_to_usd
from proxy.core.timestamps import canonical_ts
from proxy.reports.model import Report, sorted_groups
from proxy.reports.numbers import record_decimal

_CSV_FIELDS = (
    "time_utc",
    "request_id",
    "provider",
    "model",
    "response_model",
    "user_id",
    "team",
    "key_id",
    "session_id",
    "endpoint",
    "status",
    "error",
    "is_streaming",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "pricing_source",
    "usage_source",
    "latency_ms",
    "ttft_ms",
    "tags",
)


def _cell(v: Any) -> Any:
    """Text a spreadsheet shows as written: no formulas (=, +, -, @ lead), no float noise."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(record_decimal(v), "f")
    if isinstance(v, (dict, list)):
        v = ";".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else orjson.dumps(v).decode()
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def write_request_csv(out: IO[str], records: Iterable[dict[str, Any]]) -> None:
    w = csv.writer(out)
    w.writerow(_CSV_FIELDS)
    for rec in records:
        ts = canonical_ts(rec.get("timestamp"))
        # "2026-11-23 18:15:28.893": a form spreadsheets read as a date-time.
        row = [ts[:10] + " " + ts[11:23] if ts else ""]
        row += [_cell(rec.get(f)) for f in _CSV_FIELDS[1:]]
        w.writerow(row)


def write_group_csv(out: IO[str], r: Report) -> None:
    dims = r.group_dims or ["provider", "model"]
    w = csv.writer(out)
    w.writerow(
        [d.replace(":", "_") for d in dims]
        + [
            "requests",
            "errors",
            "priced",
            "unpriced",
            "unknown_usage",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cache_read_tokens",
            "input_cost",
            "output_cost",
            "total_cost",
        ]
    )
    for k, v in sorted_groups(r, dims):
        w.writerow(
            [_cell(x) for x in k]
            + [
                v.requests,
                v.errors,
                v.priced,
                v.unpriced,
                v.unknown,
                v.tokens["input_tokens"],
                v.tokens["output_tokens"],
                v.tokens["total_tokens"],
                v.tokens["cache_read_tokens"],
                format(units_to_usd(v.input_cost_units), "f"),
                format(units_to_usd(v.output_cost_units), "f"),
                format(v.total_cost, "f"),
            ]
        )
