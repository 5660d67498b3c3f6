"""``GET /metrics`` in the Prometheus text format (docs/metrics.md): a custom collector
over a snapshot of the ``MetricsTally`` every written record feeds, and each budget's
spend, limit and remaining amount read from the ledger at scrape time. Names follow the
OpenTelemetry GenAI semantic conventions where there is one (``gen_ai_client_*``);
the proxy's own facts are ``llm_proxy_*``."""

from __future__ import annotations

import asyncio
import hmac
from typing import Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from proxy.budgets import BudgetState, Limit
from proxy.core.money import COST_UNITS_PER_USD
from proxy.engine.metrics_tally import HISTOGRAM_TOKEN_TYPES, Histogram, MetricsTally, Series
from proxy.engine.totals import TOKEN_FIELDS
from proxy.reports.analytics import error_body
from proxy.web.api import addressed_to_this_machine
from proxy.web.state import APP_STATE, ProxyState

# llm_proxy_tokens_total's "type" label: every count Totals sums but the total itself.
TOKEN_TYPES = tuple((name.removesuffix("_tokens"), name) for name in TOKEN_FIELDS if name != "total_tokens")
NO_PERIOD = "none"  # the period label of a session budget, which has no calendar period


def _usd(units: int) -> float:
    # int / int is correctly rounded: the nearest float to the exact decimal amount.
    return units / COST_UNITS_PER_USD


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [(floatToGoString(bound), float(n)) for bound, n in h.cumulative()]


class Snapshot:
    """One instant of the tally and the budgets: a prometheus_client collector that can
    be rendered off the event loop while the loop goes on adding records."""

    def __init__(self, label_names: tuple[str, ...], series: list[Series], overflow: dict[str, int], budgets: list[BudgetState]) -> None:
        self.label_names, self.series, self.overflow, self.budgets = label_names, series, overflow, budgets

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        yield from self._budgets()

    def _calls(self) -> Iterable[Metric]:
        names = list(self.label_names)
        requests = CounterMetricFamily(
            "llm_proxy_requests", "Calls recorded, by the HTTP status the client got (499: it left first).", labels=[*names, "status"]
        )
        errors = CounterMetricFamily("llm_proxy_errors", "Calls that ended in an error (status >= 400, or cut short).", labels=names)
        cost = CounterMetricFamily("llm_proxy_cost_usd", "Cost of the priced calls, in US dollars.", labels=names)
        tokens = CounterMetricFamily(
            "llm_proxy_tokens",
            "Tokens by type; cache_read and cache_write are parts of input, reasoning is part of output.",
            labels=[*names, "type"],
        )
        unpriced = CounterMetricFamily(
            "llm_proxy_unpriced_requests", "Calls with usage but no price for their model: the cost total is at least this.", labels=names
        )
        unknown = CounterMetricFamily(
            "llm_proxy_unknown_usage_requests", "Calls whose usage is unknown (a stream cut before its usage): cost unknown.", labels=names
        )
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds", "Whole call, from the request to the reply's last byte.", labels=names
        )
        ttft = HistogramMetricFamily(
            "gen_ai_client_operation_time_to_first_chunk_seconds", "Streamed calls: time to the reply's first byte.", labels=names
        )
        usage = HistogramMetricFamily(
            "gen_ai_client_token_usage", "Tokens per call that used tokens, by gen_ai_token_type.", labels=[*names, "gen_ai_token_type"]
        )
        for s in self.series:
            labels = list(s.labels)
            t = s.totals
            for status, n in s.statuses.items():
                requests.add_metric([*labels, status], n)
            errors.add_metric(labels, t.errors)
            cost.add_metric(labels, _usd(t.cost_units))
            for kind, field in TOKEN_TYPES:
                tokens.add_metric([*labels, kind], t.tokens[field])
            unpriced.add_metric(labels, t.unpriced)
            unknown.add_metric(labels, t.unknown)
            duration.add_metric(labels, _buckets(s.duration), s.duration.sum)
            if s.ttft.count:
                ttft.add_metric(labels, _buckets(s.ttft), s.ttft.sum)
            for kind, _ in HISTOGRAM_TOKEN_TYPES:
                h = s.tokens[kind]
                if h.count:
                    usage.add_metric([*labels, kind], _buckets(h), h.sum)
        overflow = CounterMetricFamily(
            "llm_proxy_label_overflow",
            "Calls counted under the label value 'other': the label's max_label_values (label=series: metrics.max_series) was reached.",
            labels=["label"],
        )
        for name, n in self.overflow.items():
            overflow.add_metric([name], n)
        return (requests, errors, cost, tokens, unpriced, unknown, duration, ttft, usage, overflow)

    def _budgets(self) -> Iterable[Metric]:
        labels = ["budget", "scope", "period"]
        spent = GaugeMetricFamily("llm_proxy_budget_spent_usd", "Spend of settled calls in the budget's current period.", labels=labels)
        reserved = GaugeMetricFamily("llm_proxy_budget_reserved_usd", "Worst-case cost held by calls in progress.", labels=labels)
        limit = GaugeMetricFamily("llm_proxy_budget_limit_usd", "The budget's limit.", labels=labels)
        remaining = GaugeMetricFamily("llm_proxy_budget_remaining_usd", "Limit minus spent and reserved, never below 0.", labels=labels)
        seen: set[tuple[str, str, str]] = set()
        for s in self.budgets:
            key = (s.name, s.limit.scope, s.limit.period or NO_PERIOD)
            if key in seen:  # a per-key limit equal to a configured one: one series
                continue
            seen.add(key)
            spent.add_metric(list(key), _usd(s.spent))
            reserved.add_metric(list(key), _usd(s.reserved))
            limit.add_metric(list(key), _usd(s.limit.units))
            remaining.add_metric(list(key), _usd(s.remaining))
        return (spent, reserved, limit, remaining)


def budget_states(state: ProxyState) -> list[BudgetState]:
    """Every budget now, per-key limits included (as ``budget_health`` gathers them); of
    a limit applied to each value (each user), the ``max_label_values`` most used."""
    ledger = state.budgets
    if ledger is None:
        return []
    extra = []
    if state.keys is not None:
        state.keys.refresh()
        extra = state.keys.budget_limits()
    cap = state.config.metrics.max_label_values
    fixed: list[BudgetState] = []
    per_value: dict[Limit, list[BudgetState]] = {}
    for s in ledger.states(extra):
        if s.limit.match is None and s.limit.scope != "global":
            per_value.setdefault(s.limit, []).append(s)
        else:
            fixed.append(s)
    for group in per_value.values():
        group.sort(key=lambda s: (-s.used, s.name))
        fixed.extend(group[:cap])
    return fixed


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of one snapshot, from a registry of its own (nothing of the
    process-global one). Pure Python, so run in a thread: a scrape of many series takes
    long enough to be felt by calls if it held the event loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(snapshot)
    return generate_latest(registry)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return (auth[7:].strip() or None) if auth[:7].lower() == "bearer " else None


def allowed(state: ProxyState, request: web.Request) -> bool:
    """With auth: an admin key or the scrape token. Without auth: the scrape token if one
    is configured, else requests addressed to this machine (or anyone, with
    dashboard.public)."""
    token = _bearer(request)
    scrape = state.config.metrics.scrape_token
    # Constant time: a wrong guess learns nothing from how fast it was refused.
    if scrape is not None and token is not None and hmac.compare_digest(token.encode(), scrape.encode()):
        return True
    keys = state.keys
    if keys is not None:
        keys.refresh()
        return token is not None and keys.is_admin(token)
    if scrape is not None:
        return False
    # No auth, no token: the budgets name users, so the API's rule applies (this machine
    # only, unless dashboard.public); a Prometheus elsewhere sends a scrape token.
    return state.config.dashboard_public or addressed_to_this_machine(request)


def add_metrics_routes(app: web.Application, state: ProxyState) -> None:
    """GET /metrics when ``metrics.enabled`` (else no route: a 404), its tally fed by
    every record written."""
    config = state.config.metrics
    if not config.enabled:
        return
    tally = MetricsTally(config.labels, config.max_label_values, config.max_series)
    state.record_sinks.append(tally.add)
    who = "an admin key or the scrape token" if state.keys is not None else "the scrape token"

    async def handle_metrics(request: web.Request) -> web.Response:
        state = request.app[APP_STATE]
        if not allowed(state, request):
            if state.keys is None and config.scrape_token is None:
                return web.Response(
                    status=403,
                    body=error_body(
                        "without auth: /metrics answers only requests addressed to this machine (127.0.0.1, [::1], localhost); "
                        "to scrape it from elsewhere, set metrics.scrape_token_env",
                        "permission_error",
                        None,
                    ),
                    content_type="application/json",
                )
            return web.Response(
                status=401,
                body=error_body(f"/metrics needs {who}: send Authorization: Bearer <token>", "authentication_error", None),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        if state.follow is not None:
            state.follow()  # every worker's calls, not this one's share
        # The copy is taken here, on the loop, in one step: every figure of the answer is
        # of the same instant. Rendering it (the slow part) is not.
        series, overflow = tally.snapshot()
        snapshot = Snapshot(tally.label_names, series, overflow, budget_states(state))
        body = await asyncio.get_running_loop().run_in_executor(None, render, snapshot)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    app.router.add_get("/metrics", handle_metrics)
