"""The OpenAPI 3.1 document served at ``/api/openapi.json``: every endpoint of the
analytics API, its parameters and its responses, fuzzed against the running proxy by
tests/e2e/test_api_schema.py (so it cannot drift from what the handlers answer)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

from proxy.reports.api_query import MAX_DAYS, MAX_LIMIT

INT = {"type": "integer", "minimum": 0}
MONEY = {"type": "number", "description": "US dollars, an exact decimal"}
MONEY_OR_NULL = {"type": ["number", "null"], "description": "US dollars, an exact decimal"}
RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1, "description": "share of requests without an error; null with none"}
MS = {"type": ["number", "null"], "minimum": 0}
STR_OR_NULL = {"type": ["string", "null"]}
# A date or an ISO time (what reports.window.parse_when reads); the rest of its checks
# (a real date, end after start, not with days) answer 400.
WHEN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?$"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required else []}


def arr(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


TOKENS = {k: INT for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "total_tokens")}
TOTALS = {
    "requests": INT,
    "errors": INT,
    "success_rate": RATE,
    **TOKENS,
    "reasoning_tokens": INT,
    "total_cost": MONEY,
    "avg_cost_per_request": MONEY,
    "unpriced_requests": INT,
    "cost_is_lower_bound": {"type": "boolean"},
}
DAY_FIELDS = {"requests": INT, "errors": INT, **TOKENS, "total_cost": MONEY}
PERCENTILES = obj({"p50": MS, "p95": MS})


def _with_optional(schema: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {**schema, "properties": {**schema["properties"], **more}}


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": obj({"message": {"type": "string"}, "type": {"type": "string"}, "param": STR_OR_NULL})}),
    "Period": obj(
        {
            "start": {"type": ["string", "null"], "format": "date-time"},
            "end": {"type": "string", "format": "date-time"},
            "tz": {"type": "string"},
            "label": {"type": "string"},
        }
    ),
    "Filters": {"type": "object", "additionalProperties": {"type": ["array", "boolean"], "items": {"type": "string"}}},
    "Percentiles": PERCENTILES,
    "ProviderRow": obj(
        {"provider": {"type": "string"}, "requests": INT, "errors": INT, "success_rate": RATE, "total_tokens": INT, "total_cost": MONEY}
    ),
    "ModelRow": obj(
        {"provider": {"type": "string"}, "model": {"type": "string"}, "requests": INT, "errors": INT, **TOKENS, "total_cost": MONEY}
    ),
    "Day": obj({"date": {"type": "string", "format": "date"}, **DAY_FIELDS}),
    "Hour": obj({"hour": {"type": "string"}, **DAY_FIELDS}),
    "Usage": _with_optional(
        obj(
            {
                "period": ref("Period"),
                "filters": ref("Filters"),
                **TOTALS,
                "by_provider": arr(ref("ProviderRow")),
                "by_model": arr(ref("ModelRow")),
                "daily": arr(ref("Day")),
            }
        ),
        hourly=arr(ref("Hour")),
    ),
    "Span": obj({"start": {"type": "string"}, "end": {"type": "string"}, "requests": INT, "total_cost": MONEY}),
    "Costs": obj(
        {
            "period": ref("Period"),
            "filters": ref("Filters"),
            "total_cost": MONEY,
            "requests": INT,
            "unpriced_requests": INT,
            "cost_is_lower_bound": {"type": "boolean"},
            "daily": arr(obj({"date": {"type": "string"}, "requests": INT, "total_cost": MONEY})),
            "projected_monthly_cost": MONEY_OR_NULL,
            "projection": {
                "oneOf": [
                    {"type": "null"},
                    obj(
                        {
                            "month": {"type": "string"},
                            "month_to_date": MONEY_OR_NULL,
                            "daily_rate": MONEY,
                            "rate_from_hours": {"type": "number"},
                            "projected": MONEY,
                        }
                    ),
                ]
            },
            "previous_period": {"oneOf": [{"type": "null"}, ref("Span")]},
            "previous_period_cost": MONEY_OR_NULL,
            "change": {"oneOf": [{"type": "null"}, obj({"amount": {"type": "number"}, "percent": {"type": ["number", "null"]}})]},
            "compare": {"type": "object", "additionalProperties": ref("Span")},
            "savings": obj({"cache_read_tokens": INT, "saved": MONEY, "unpriced_cache_read_tokens": INT}),
            "suggestions": arr({"type": "string"}),
        }
    ),
    "Provider": obj(
        {
            "provider": {"type": "string"},
            "period": ref("Period"),
            "filters": ref("Filters"),
            **TOTALS,
            "latency_ms": PERCENTILES,
            "ttft_ms": PERCENTILES,
            "by_model": arr(
                obj(
                    {
                        "model": {"type": "string"},
                        "requests": INT,
                        "errors": INT,
                        "success_rate": RATE,
                        "total_tokens": INT,
                        "total_cost": MONEY,
                        "latency_ms": PERCENTILES,
                    }
                )
            ),
            "daily": arr(ref("Day")),
        }
    ),
    "Latency": obj(
        {
            "period": ref("Period"),
            "filters": ref("Filters"),
            "by_provider": arr(
                obj(
                    {
                        "provider": {"type": "string"},
                        "requests": INT,
                        "errors": INT,
                        "success_rate": RATE,
                        "latency_ms": PERCENTILES,
                        "ttft_ms": PERCENTILES,
                    }
                )
            ),
        }
    ),
    "Expensive": obj(
        {
            "period": ref("Period"),
            "filters": ref("Filters"),
            "requests": arr(
                obj(
                    {
                        "timestamp": {"type": "string"},
                        "request_id": STR_OR_NULL,
                        "provider": STR_OR_NULL,
                        "model": STR_OR_NULL,
                        "response_model": STR_OR_NULL,
                        "user_id": STR_OR_NULL,
                        "endpoint": STR_OR_NULL,
                        "input_tokens": {"type": ["integer", "null"]},
                        "output_tokens": {"type": ["integer", "null"]},
                        "cache_read_tokens": {"type": ["integer", "null"]},
                        "total_cost": MONEY,
                        "status": {"type": ["integer", "null"]},
                        "tags": {"type": ["object", "null"]},
                    }
                )
            ),
        }
    ),
    "Users": obj(
        {
            "period": ref("Period"),
            "filters": ref("Filters"),
            "active_users": INT,
            "requests_without_user": INT,
            "total_cost": MONEY,
            "users": arr(
                obj({"user": {"type": "string"}, "requests": INT, "errors": INT, "sessions": INT, "total_tokens": INT, "total_cost": MONEY})
            ),
        }
    ),
    "User": obj(
        {
            "user": {"type": "string"},
            "period": ref("Period"),
            "filters": ref("Filters"),
            **TOTALS,
            "sessions": INT,
            "by_model": arr(ref("ModelRow")),
            "daily": arr(ref("Day")),
        }
    ),
    "Sessions": obj(
        {
            "period": ref("Period"),
            "filters": ref("Filters"),
            "sort": {"type": "string", "enum": ["recent", "cost", "tokens", "requests"]},
            "total_sessions": INT,
            "requests_without_session": INT,
            "sessions": arr(
                obj(
                    {
                        "session": {"type": "string"},
                        "requests": INT,
                        "total_tokens": INT,
                        "total_cost": MONEY,
                        "last_active": {"type": "string"},
                    }
                )
            ),
        }
    ),
    "Budgets": obj(
        {
            "warn_at": {"type": "number"},
            "budgets": arr(
                obj(
                    {
                        "name": {"type": "string"},
                        "scope": {"type": "string"},
                        "value": STR_OR_NULL,
                        "period": STR_OR_NULL,
                        "limit": MONEY,
                        "spent": MONEY,
                        "reserved": MONEY,
                        "remaining": MONEY,
                        "used_fraction": {"type": ["number", "null"]},
                        "status": {"type": "string", "enum": ["ok", "warning", "exceeded"]},
                        "period_start": STR_OR_NULL,
                        "resets_at": STR_OR_NULL,
                    }
                )
            ),
        }
    ),
    "Call": obj({"record": {"type": "object", "description": "the record as the log holds it (docs/records.md)"}}),
    "WhoAmI": obj({"role": {"type": "string", "enum": ["admin", "user", "local"]}, "user": STR_OR_NULL, "auth": {"type": "boolean"}}),
    "UsageIn": {
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "input_tokens", "output_tokens"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input_tokens": {"type": "integer", "minimum": 0, "maximum": 10**12},
            "output_tokens": {"type": "integer", "minimum": 0, "maximum": 10**12},
            "cached_tokens": {"type": ["integer", "null"], "minimum": 0, "maximum": 10**12},
            "provider": STR_OR_NULL,
            "category": STR_OR_NULL,
            "description": STR_OR_NULL,
            "user": STR_OR_NULL,
            "metadata": {"type": ["object", "null"]},
        },
    },
}


def _param(name: str, schema: dict[str, Any], description: str, *, repeat: bool = False, where: str = "query") -> dict[str, Any]:
    if repeat:
        return {"name": name, "in": where, "description": description, "schema": arr(schema), "style": "form", "explode": True}
    return {"name": name, "in": where, "description": description, "schema": schema, **({"required": True} if where == "path" else {})}


COMMON = [
    _param("days", {"type": "integer", "minimum": 1, "maximum": MAX_DAYS}, "the last N×24 hours ending now; not with start/end"),
    _param("start", {"type": "string", "pattern": WHEN}, "a date (2026-11-01) or ISO time, in tz; not with days"),
    _param("end", {"type": "string", "pattern": WHEN}, "a date (that whole day included) or ISO time (excluded); not with days"),
    _param("tz", {"type": "string"}, "IANA time zone of days and dates (default UTC)"),
    _param("provider", {"type": "string"}, "provider name", repeat=True),
    _param("model", {"type": "string"}, "model, alias or snapshot", repeat=True),
    _param("user", {"type": "string"}, "user id", repeat=True),
    _param("team", {"type": "string"}, "team (the proxy key's)", repeat=True),
    _param("category", {"type": "string"}, "the category tag", repeat=True),
    _param("status", {"type": "string"}, "200, 4xx, ok or error", repeat=True),
    _param("tag", {"type": "string"}, "KEY=VALUE", repeat=True),
]
LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "rows at most")
INTERVAL = _param("interval", {"type": "string", "enum": ["day", "hour"]}, "hour adds an hourly series (windows up to 31 days)")

# Only with budgets.backend (a shared ledger): "redis", or "unreachable" (the counts as last read).
SCHEMAS["Budgets"]["properties"]["backend"] = {"type": "string", "enum": ["redis", "unreachable"]}


def _responses(schema: str, *, extra: tuple[int, ...] = ()) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": ref("Error")}}}
    out: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": ref(schema)}}}}
    out["400"] = {"description": "a bad parameter, named in error.param", **err}
    out["401"] = {"description": "no or unknown proxy key (with auth:)", **err}
    out["403"] = {"description": "a user's key asking for another user's numbers", **err}
    for code in extra:
        what = {404: "not found", 409: "cost tracking is off", 415: "the body is not application/json"}
        out[str(code)] = {"description": what.get(code, "refused"), **err}
    return out


def _get(summary: str, schema: str, params: list[dict[str, Any]], *, extra: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": params, "responses": _responses(schema, extra=extra)}}


PATHS: dict[str, Any] = {
    "/api/analytics/usage": _get("Requests, tokens and costs, by provider, model and day", "Usage", [*COMMON, INTERVAL]),
    "/api/analytics/costs": _get("Cost trend, month-end projection, previous period, cache savings, suggestions", "Costs", COMMON),
    "/api/analytics/provider/{provider}": _get(
        "One provider: success rate, latency and time to first byte, cost by model",
        "Provider",
        [_param("provider", {"type": "string"}, "provider name", where="path"), *[p for p in COMMON if p["name"] != "provider"], INTERVAL],
        extra=(404,),
    ),
    "/api/analytics/latency": _get("Latency and time to first byte per provider", "Latency", COMMON),
    "/api/analytics/expensive-requests": _get("The most expensive requests, most expensive first", "Expensive", [*COMMON, LIMIT]),
    "/api/analytics/users": _get("Top spenders", "Users", [*COMMON, LIMIT]),
    "/api/analytics/users/{user}": _get(
        "One user's usage",
        "User",
        [_param("user", {"type": "string"}, "user id", where="path"), *[p for p in COMMON if p["name"] != "user"], INTERVAL],
    ),
    "/api/analytics/sessions": _get(
        "Sessions, sorted, in a cost range",
        "Sessions",
        [
            *COMMON,
            _param("sort", {"type": "string", "enum": ["recent", "cost", "tokens", "requests"]}, "order (default recent)"),
            _param("min_cost", {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}, "a session's least cost, USD"),
            _param("max_cost", {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}, "a session's most cost, USD"),
            LIMIT,
        ],
    ),
    "/api/analytics/export": {
        "get": {
            "summary": "One row per request (CSV with the report's per-request columns, or JSONL records)",
            "parameters": [*COMMON, _param("format", {"type": "string", "enum": ["csv", "jsonl"]}, "csv (default) or jsonl")],
            "responses": {
                **{k: v for k, v in _responses("Error").items() if k != "200"},
                "200": {
                    "description": "the rows",
                    "content": {"text/csv": {"schema": {"type": "string"}}, "application/x-ndjson": {"schema": {"type": "string"}}},
                },
            },
        }
    },
    "/api/budgets": {"get": {"summary": "Each budget: limit, spent, remaining, reset", "responses": _responses("Budgets")}},
    "/api/calls/{record_id}": _get(
        "One call's record, by the id in its reply's x-llm-cost-record-id header (docs/replies.md)",
        "Call",
        [_param("record_id", {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"}, "the record's id", where="path")],
        extra=(404,),
    ),
    "/api/whoami": {"get": {"summary": "Who the key is: admin, a user, or the local operator", "responses": _responses("WhoAmI")}},
    "/api/usage": {
        "post": {
            "summary": "Record a call made elsewhere (as `python -m proxy log` does); admin",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref("UsageIn")}}},
            "responses": {
                **{k: v for k, v in _responses("Error", extra=(409, 415)).items() if k != "200"},
                "201": {"description": "recorded", "content": {"application/json": {"schema": obj({"record": {"type": "object"}})}}},
            },
        }
    },
}


@lru_cache(maxsize=1)
def openapi_document() -> bytes:
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-cost-proxy analytics API",
            "version": "1",
            "description": "docs/api.md. Money is exact decimal JSON numbers.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"proxyKey": {"type": "http", "scheme": "bearer", "description": "a proxy key (with auth: configured)"}},
        },
        "security": [{}, {"proxyKey": []}],
    }
    return orjson.dumps(doc)
