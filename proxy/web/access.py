"""Who may call and how much: proxy keys (``auth:``), attribution, budgets
(``budgets:``): check and reserve before forwarding (in process, or in Redis with
``budgets.backend``), budget headers, webhook alerts, the budgets part of ``/health``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.budgets import BudgetState, Decision, Limit, Subject, ledger_for, refusal_message
from proxy.config import model_output_limit
from proxy.core.attribution import attribute
from proxy.core.money import cost_units, format_usd, units_to_usd
from proxy.core.periods import iso
from proxy.core.policy import unpriced_refusal_message, worst_case_usage
from proxy.pricing import price_call
from proxy.providers import Adapter, Endpoint
from proxy.storage.redis_ledger import LedgerUnreachable, RedisLedger
from proxy.storage.replay import replay_log
from proxy.web.bodies import BodyDigest
from proxy.web.calls import Call, console_safe, dumps_json, refuse
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")


# Per-request state between the hooks (typed keys where aiohttp has them, 3.12+).
_RequestKey: Any = getattr(web, "RequestKey", None)
_KEY_ENTRY: Any = _RequestKey("lcp_key_entry", object) if _RequestKey else "lcp_key_entry"
_BUDGET_HEADERS: Any = _RequestKey("lcp_budget_headers", dict) if _RequestKey else "lcp_budget_headers"
# One message for a missing, unknown or revoked key: the reply says nothing about which
# (the record's `error` does, for the operator).
_BAD_KEY = "Invalid or missing proxy key. Send a key from `python -m proxy keys create` in this API's usual key header."


def setup_access(state: ProxyState, log_path: Path, clock: Callable[[], float], until: tuple[int, int, int] | None = None) -> None:
    """Budget ledger, rebuilt from the log's current periods (in Redis: when Redis
    lacks them). ``state.keys``, with auth:, is made first, by ``create_app``."""
    config = state.config
    if config.auth is not None and state.keys is not None:
        if not state.keys.entries:
            log.warning("auth: no keys in %s yet; create one with `python -m proxy keys create --user NAME`", config.auth.keys_file)
    if not config.cost_tracking or (config.budgets is None and config.auth is None):
        if config.auth is not None and state.keys is not None and state.keys.budget_limits():
            log.warning("budgets: per-key budgets are not enforced with cost tracking off")
        return
    ledger = ledger_for(config.budgets, per_key=config.auth is not None, clock=clock)
    state.tasks = set()
    t0 = time.perf_counter()
    if config.budgets is not None and config.budgets.backend != "memory":
        shared = state.budgets = RedisLedger(ledger, config.budgets, log_path)
        counted = shared.start_sync()
        if counted is not None:
            log.info(
                "budgets: ledger at %s rebuilt from %d records of the current periods in %.2fs",
                shared.address,
                counted,
                time.perf_counter() - t0,
            )
        else:
            log.info("budgets: ledger at %s", shared.address)
        return
    state.budgets = ledger
    read, counted = replay_log(ledger, log_path, until=until)  # with workers, the follower reads on
    if config.budgets is not None or read:
        log.info("budgets: rebuilt from %d records of the current periods in %.2fs", counted, time.perf_counter() - t0)


async def close_access(state: ProxyState) -> None:
    """At clean-up, after the last call: a shared ledger sends what it has queued."""
    if isinstance(state.budgets, RedisLedger):
        await state.budgets.close()


async def add_budget_headers(request: web.Request, response: web.StreamResponse) -> None:
    extra = request.get(_BUDGET_HEADERS)
    if extra:
        response.headers.update(extra)


def identify(state: ProxyState, request: web.Request, call: Call, client_key: str | None, body: Any) -> Any:
    """Who is calling: the proxy key's entry (with auth:) and the call's attribution.
    Also run for calls refused before their body is read (413, aborted uploads), so
    their records still say whose they were."""
    ctx = call.ctx
    entry = None
    keys = state.keys
    if keys is not None:
        keys.refresh()
        entry = keys.lookup(client_key)
    owner = entry.owner if entry is not None and not entry.revoked else None
    att = attribute(request.headers, call.adapter.request_user(body), owner, ctx.key_id)
    ctx.user_id, ctx.team, ctx.session_id, ctx.tags = att.user_id, att.team, att.session_id, att.tags
    return entry


def authenticate(state: ProxyState, request: web.Request, call: Call, client_key: str | None) -> web.Response | None:
    """With auth: a 401 for a missing, unknown or revoked proxy key, from the headers alone."""
    entry = identify(state, request, call, client_key, None)
    if entry is None or entry.revoked:
        why = "no proxy key" if not client_key else ("revoked proxy key" if entry is not None else "unknown proxy key")
        return refuse(call, 401, f"auth: {why}", _BAD_KEY)
    return None


def admit(
    state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: Call, body: Any, client_key: str | None
) -> web.Response | None:
    """Authenticate the proxy key (with auth:), attribute the call, check the key's
    model allowlist. A response when the call stops here (401/403)."""
    ctx = call.ctx
    entry = identify(state, request, call, client_key, body)
    if state.keys is None:
        return None
    if entry is None or entry.revoked:
        why = "no proxy key" if not client_key else ("revoked proxy key" if entry is not None else "unknown proxy key")
        return refuse(call, 401, f"auth: {why}", _BAD_KEY)
    request[_KEY_ENTRY] = entry
    if entry.models is not None:
        if endpoint.kind is None and request.method not in ("GET", "HEAD", "OPTIONS"):
            return refuse(
                call,
                403,
                "auth: key limited to models; endpoint not metered",
                "This key may only call model endpoints (chat, messages, responses, embeddings, generateContent).",
            )
        if endpoint.kind is not None and not entry.allows(ctx.model):
            return refuse(
                call,
                403,
                f"auth: model {ctx.model!r} not allowed for this key",
                f"Model {console_safe(ctx.model)!r} is not allowed for this key; allowed: {', '.join(entry.models)}.",
            )
    return None


def worst_case_units(state: ProxyState, call: Call, body: Any, digest: BodyDigest | None) -> int | None:
    """The most this call can cost: estimated input at the input rate (as a cache write
    if it asks for caching; no cache-read discount) plus its whole output cap at the
    output rate, for the requested service tier. None: the model has no price."""
    ctx, endpoint = call.ctx, call.endpoint
    budgets = state.config.budgets
    cap = budgets.default_max_output_tokens if budgets is not None else 4096
    flags = b""
    if digest is not None and digest.asks_cache:
        flags = b'cache_control "1h"' if digest.asks_cache_1h else b"cache_control"
    n_in = call.input_tokens(ctx.model)
    limit = model_output_limit(state.config, ctx.provider, ctx.family, ctx.model, n_in)
    usage = worst_case_usage(body, flags, endpoint.kind, n_in, cap, limit)
    tier = body.get("service_tier") if isinstance(body, dict) and isinstance(body.get("service_tier"), str) else None
    priced = price_call(
        state.prices,
        provider=ctx.provider,
        family=ctx.family,
        model=ctx.model,
        response_model=None,
        usage=usage,
        when=ctx.timestamp_dt,
        service_tier=tier,
    )
    if priced.cost is None:
        return None
    return cost_units(priced.cost.total_cost) or 0


@dataclass(slots=True)
class _Ask:
    """What a call asks of the budgets: who, its worst case (None: no price), the key's
    own limit, and whether an override lets it past a spent budget."""

    subject: Subject
    worst: int | None
    extra: tuple[Limit, ...]
    override: bool
    admin_key: str | None


def _ask(state: ProxyState, request: web.Request, call: Call, body: Any, digest: BodyDigest | None) -> _Ask:
    ctx = call.ctx
    cfg = state.config.budgets
    override = bool(cfg is not None and cfg.override)
    admin_key = request.headers.get("x-budget-override")
    if admin_key:
        call.secrets = (*call.secrets, admin_key)
        if state.keys is not None and state.keys.is_admin(admin_key):
            override = True
    entry = request.get(_KEY_ENTRY)
    extra = (entry.limit,) if entry is not None and entry.limit is not None else ()
    # No limit can apply (auth: tracks each key's spend, but none has a budget): no worst
    # case to hold, and no input estimate to make for it.
    limited = bool(extra) or bool(state.budgets is not None and state.budgets.limits)
    worst = worst_case_units(state, call, body, digest) if call.endpoint.kind is not None and limited else 0
    return _Ask(Subject(ctx.user_id, ctx.team, ctx.key_id, ctx.session_id, ctx.tags), worst, extra, override, admin_key)


def reserve(
    state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: Call, body: Any, digest: BodyDigest | None
) -> web.Response | None:
    """Check every budget that applies and reserve the call's worst case, in one
    synchronous step (atomic under asyncio). A response when the call stops here:
    429 over budget, 403 for a model that cannot be priced under a budget.

    Endpoints that cost money but report no usage (images, audio, batches) reserve
    nothing but are still refused once a budget is spent."""
    ledger = state.budgets
    if ledger is None or not (endpoint.kind is not None or endpoint.billable):
        return None
    ask = _ask(state, request, call, body, digest)
    decision = ledger.reserve(ask.subject, ask.worst or 0, ask.extra, ask.override)  # no await: check + reserve are one step
    return _decided(state, request, call, ask, decision)


async def reserve_shared(
    state: ProxyState, request: web.Request, adapter: Adapter, endpoint: Endpoint, call: Call, body: Any, digest: BodyDigest | None
) -> web.Response | None:
    """``reserve`` with the ledger in Redis (budgets.backend): the check and the
    reservation are one script there, awaited. Redis unreachable: 503 for a budgeted
    call, or (budgets.on_backend_error: allow) the call goes ahead unchecked, its cost
    counted once Redis answers again."""
    ledger = state.budgets
    if not isinstance(ledger, RedisLedger) or not (endpoint.kind is not None or endpoint.billable):
        return None
    ask = _ask(state, request, call, body, digest)
    try:
        decision = await ledger.reserve_shared(ask.subject, ask.worst or 0, ask.extra, ask.override)
    except LedgerUnreachable as e:
        return _unreachable(state, ledger, call, e)
    except asyncio.CancelledError:
        # The client left (or shutdown ran out of time) during the check; the
        # reservation, if made, is released when the script answers.
        call.status, call.error = 499, "call cancelled while its budget was checked"
        call.finish()
        raise
    return _decided(state, request, call, ask, decision)


def _unreachable(state: ProxyState, ledger: RedisLedger, call: Call, e: LedgerUnreachable) -> web.Response | None:
    cfg = state.config.budgets
    allow = cfg is not None and cfg.on_backend_error == "allow"
    if not e.budgeted or allow:
        call.hold = e.hold  # its cost is added once Redis answers
        held = ledger.unreachable_log.due() if e.budgeted else None
        if held is not None:
            more = f" ({held} more since the last line)" if held else ""
            log.warning("budgets: ledger at %s unreachable (%s): budgeted calls go ahead unchecked%s", e.address, e.cause, more)
        return None
    held = ledger.unreachable_log.due()
    if held is not None:
        more = f" ({held} more since the last line)" if held else ""
        log.warning("budgets: ledger at %s unreachable (%s): budgeted calls refused with 503%s", e.address, e.cause, more)
    return refuse(
        call,
        503,
        f"budget ledger unreachable: {e.address} ({e.cause})",
        "The budget ledger is unreachable, so this call was not sent; try again shortly.",
        {"retry-after": "1"},
    )


def _decided(state: ProxyState, request: web.Request, call: Call, ask: _Ask, decision: Decision) -> web.Response | None:
    """What the ledger's decision means for the call: refused (429, 403), or on its way
    with its hold, headers and alerts."""
    ledger = state.budgets
    assert ledger is not None
    ctx, worst, override = call.ctx, ask.worst, ask.override
    cfg = state.config.budgets
    if decision.new_limit is not None:
        budget_alert(state, decision.new_limit, "limit")
    if decision.hold is None:
        refused = decision.refused
        assert refused is not None
        return refuse(
            call, 429, f"budget exceeded: {refused.name}", refusal_message(refused, worst or 0), {"x-should-retry": "false"}
        )  # the SDKs' retry loop would only hit the same wall
    if worst is None and decision.tightest is not None and not override and not (cfg is not None and cfg.allow_unpriced):
        # A budget applies and this model has no price: its cost could not be held
        # against the budget, nor counted after. Refused unless configured otherwise.
        ledger.settle(decision.hold, 0)
        return refuse(
            call,
            403,
            f"unpriced model under a budget: {ctx.model!r}",
            unpriced_refusal_message(ctx.provider, console_safe(ctx.model)),
            {"x-should-retry": "false"},
        )
    call.hold = decision.hold
    if decision.overridden:
        ctx.budget_override = True
        if ask.admin_key and not (cfg is not None and cfg.override):
            assert decision.refused is not None
            log.warning(
                "budget override (admin header): %s let through past %s", ctx.user_id or ctx.key_id or "a call", decision.refused.name
            )
    if decision.warnings:
        top = decision.warnings[0]
        tight = decision.tightest or top
        pct = "over 100%" if top.fraction == float("inf") else f"at {int(top.fraction * 100)}%"
        request[_BUDGET_HEADERS] = {
            "x-budget-remaining": format(units_to_usd(tight.remaining), "f"),
            "x-budget-warning": _header_text(f"{top.name} {pct}"),
        }
    for s in decision.new_warnings:
        budget_alert(state, s, "warning")
    return None


def _header_text(text: str) -> str:
    return quote(text, safe=" :=*'@+-._/%,()")


def budget_alert(state: ProxyState, s: BudgetState, event: str) -> None:
    """Once per budget and period for each ``event`` ("warning": at warn_at; "limit": the
    first call it refuses): a log line, a POST to the webhook if configured, and each of
    ``state.alert_sinks`` (email). Never raises into the call."""
    pct = "over 100" if s.fraction == float("inf") else f"{int(s.fraction * 100)}"
    log.warning(
        "budget %s: %s at %s%% (%s of %s spent or held), resets %s",
        "warning" if event == "warning" else "limit reached",
        s.name,
        pct,
        format_usd(s.used, exact=True),
        format_usd(s.limit.units, exact=True),
        s.as_dict()["resets_at"] or "never",
    )
    for sink in state.alert_sinks:
        try:
            sink(event, s)
        except Exception as e:  # an alert channel's fault must not fail the call
            log.error("budget alert (%s) failed: %s", event, type(e).__name__)
    url = state.config.budgets.webhook if state.config.budgets is not None else None
    if not url or state.session is None or state.tasks is None:
        return
    payload = {**s.as_dict(), "event": event, "percent": None if s.fraction == float("inf") else round(s.fraction * 100, 1)}
    task = asyncio.get_running_loop().create_task(_post_webhook(state.session, url, payload))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _post_webhook(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> None:
    """Fire and forget: 2 s at most, failures logged, never felt by the call."""
    try:
        async with session.post(
            url, data=dumps_json(payload), headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            if r.status >= 300:
                log.warning("budget webhook at %s answered %s", _host(url), r.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        log.warning("budget webhook at %s failed: %s", _host(url), type(e).__name__)


async def read_budgets(state: ProxyState) -> str | None:
    """Bring a shared ledger's counters up to date before they are shown: "redis", or
    "unreachable" (the last copy is shown); None for the in-process ledger."""
    if not isinstance(state.budgets, RedisLedger):
        return None
    try:
        await state.budgets.refresh()
    except LedgerUnreachable:
        return "unreachable"
    return "redis"


async def budget_health(state: ProxyState, request: web.Request) -> dict[str, Any]:
    """Counts for everyone; each budget's detail only for an admin key (Authorization: Bearer).
    A shared ledger adds "backend": "redis", or "unreachable" with the counts as last read."""
    keys, ledger = state.keys, state.budgets
    if ledger is None:
        return {}
    backend = await read_budgets(state)
    extra = []
    if keys is not None:
        keys.refresh()
        extra = keys.budget_limits()
    out: dict[str, Any] = ledger.summary(extra)
    if backend is not None:
        out["backend"] = backend
        if backend == "unreachable" and isinstance(ledger, RedisLedger):
            out["as_of"] = iso(ledger.refreshed_at) if ledger.refreshed_at is not None else None
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if keys is not None and token and keys.is_admin(token):
        out["detail"] = [s.as_dict() for s in ledger.states(extra)]
    return out


def _host(url: str) -> str:
    """A webhook URL's host only: Slack-style webhook paths are secrets."""
    return URL(url).host or "?"
