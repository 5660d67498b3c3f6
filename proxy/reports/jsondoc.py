"""JSON output: the whole report as one document, with money as exact decimals."""

from __future__ import annotations

from typing import Any

from proxy.core.money import units_to_usd
from proxy.engine.insights import Projection
from proxy.engine.totals import Totals
from proxy.reports.advice import projection, savings, suggestions
from proxy.reports.extra import extra_json
from proxy.reports.model import Report, sorted_groups
from proxy.reports.numbers import exact, ratio, record_decimal
from proxy.reports.text import tz_name


def totals_json(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "errors": t.errors,
        "success_rate": round((t.requests - t.errors) / t.requests, 6) if t.requests else None,
        "priced_requests": t.priced,
        "unpriced_requests": t.unpriced,
        "unknown_usage_requests": t.unknown,
        "cost_is_lower_bound": t.incomplete,
        "total_cost": exact(t.total_cost),
        "input_cost": exact(units_to_usd(t.input_cost_units)),
        "output_cost": exact(units_to_usd(t.output_cost_units)),
        "avg_cost_per_request": exact(ratio(t.total_cost, t.requests)),
        "avg_cost_per_1k_tokens": exact(ratio(t.total_cost, t.tokens["total_tokens"], 1000)),
        "tokens": dict(t.tokens),
    }


def projection_json(p: Projection | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "month": p.month,
        "month_to_date": exact(units_to_usd(p.month_to_date_units)) if p.month_to_date_units is not None else None,
        "daily_rate": exact(units_to_usd(p.daily_rate_units)),
        "rate_from_hours": round(p.recent_seconds / 3600, 3),
        "projected": exact(units_to_usd(p.projected_units)),
    }


def report_json(r: Report) -> dict[str, Any]:
    res = r.res
    t = res.totals()
    start, end = r.span()
    body: dict[str, Any] = {
        "period": {
            "label": r.window.label,
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "tz": tz_name(r.tz),
            "first_record": res.first_ts,
            "last_record": res.last_ts,
        },
        "files": [str(p) for p in r.files],
        "filters": r.filters,
        "totals": totals_json(t),
        "by_provider": [
            {"provider": k[0], **totals_json(v)}
            for k, v in sorted(res.rollup(["provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        ],
        "by_model": [
            {"model": k[0], "provider": k[1], **totals_json(v)}
            for k, v in sorted(res.rollup(["model", "provider"]).items(), key=lambda kv: (-kv[1].cost_units, kv[0]))
        ],
        "corrupt_lines": res.bad_lines,
        "duplicate_lines": res.duplicate_lines,
    }
    if r.group_dims:
        body["groups"] = [{**{d: x for d, x in zip(r.group_dims, k)}, **totals_json(v)} for k, v in sorted_groups(r, r.group_dims)]
    a = r.request
    if a.latency:
        body["latency"] = {
            by: [
                {
                    by: name,
                    "requests": n,
                    "errors": err,
                    "success_rate": round((n - err) / n, 6) if n else None,
                    "p50_ms": p50,
                    "p95_ms": p95,
                }
                for name, (n, err, _, p50, p95) in sorted(res.latency_for(by).items())
            ]
            for by in ("provider", "model")
        }
        if r.group_latency is not None:
            body["latency"]["groups"] = [
                {
                    **dict(zip(r.group_dims, k)),
                    "requests": n,
                    "errors": err,
                    "success_rate": round((n - err) / n, 6) if n else None,
                    "p50_ms": p50,
                    "p95_ms": p95,
                }
                for k, (n, err, _, p50, p95) in sorted(r.group_latency.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
            ]
    if a.top:
        body["top_requests"] = [{**x, "total_cost": exact(record_decimal(x["total_cost"]))} for x in res.top_requests()]
    if a.savings:
        s = savings(r)
        body["cache_savings"] = {
            "cache_read_tokens": s["tokens"],
            "saved": exact(s["saved"]),
            "unpriced_cache_read_tokens": s["unpriced_tokens"],
        }
    if a.projection:
        body["projection"] = projection_json(projection(r))
    if a.suggest:
        body["suggestions"] = suggestions(r)
    body.update(extra_json(r.extras))
    return body
