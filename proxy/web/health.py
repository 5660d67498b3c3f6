"""``GET /health``: the last 24 hours' totals, and the budgets when there are any."""

from __future__ import annotations

from aiohttp import web

from proxy.web.access import budget_health
from proxy.web.calls import dumps_json
from proxy.web.state import APP_STATE


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    if state.follow is not None:
        state.follow()  # every worker's calls, not this one's share
    overall, by_provider = state.window.totals()
    body = {
        "status": "healthy",
        "features": {"cost_tracking": state.config.cost_tracking},
        "cost_stats_24h": {
            "total_cost": overall.total_cost,
            "provider_costs": {p: t.total_cost for p, t in sorted(by_provider.items())},
            "requests": overall.requests,
            "errors": overall.errors,
            "unpriced_requests": overall.unpriced,
            "tokens": overall.tokens["total_tokens"],
            "input_tokens": overall.tokens["input_tokens"],
            "output_tokens": overall.tokens["output_tokens"],
        },
    }
    if state.budgets is not None:
        body["budgets"] = await budget_health(state, request)
    return web.Response(body=dumps_json(body), content_type="application/json")
