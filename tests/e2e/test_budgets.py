"""Budgets: calendar periods, the ledger (injected clock), the worst case of a call, and
end to end through the real proxy: the concurrency proof, warnings and the webhook,
overrides, restart recovery, resets across a boundary and the SDKs' 429 errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from proxy.budgets import BudgetLedger, Limit, Subject, refusal_message
from proxy.config import parse_config
from proxy.core.estimate import estimate_input_tokens
from proxy.core.money import cost_units, usd_to_units
from proxy.core.periods import period_bounds
from proxy.core.policy import max_output_tokens, worst_case_usage
from proxy.core.records import iso_utc
from proxy.errors import ConfigError
from proxy.keys import KeyEntry, key_hash, new_key
from proxy.storage.keyfile import save_keys
from proxy.storage.replay import replay_log
from tests.support import ROOT
from tests.support.config import (
    ANTHROPIC_MODELS,
    CLIENT_ANTHROPIC_KEY,
    CLIENT_OPENAI_KEY,
    OPENAI_MODELS,
    PROXY_ANTHROPIC_KEY,
    PROXY_OPENAI_KEY,
)
from tests.support.inproc import ProxyHandle
from tests.support.provider_replies import anthropic_message, chat_completion
from tests.support.records import dec

UTC = timezone.utc
USD = 10**10  # ledger units per dollar
# $10 per 1M output tokens and free input: a call with max_tokens=1000 costs exactly $0.01.
FLAT = {"flat-1": {"pricing": {"input": 0, "output": 10}}}
MSG: list[Any] = [{"role": "user", "content": "Say hi"}]  # an OpenAI and an Anthropic message alike


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, *, tz: Any = UTC) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def launch(tmp_path, start_proxy):
    """The real proxy app (conftest's start_proxy) with an injectable clock."""

    async def start(cfg: dict, log_path: Path | None = None, clock: Any = time.time) -> ProxyHandle:
        return await start_proxy(cfg, log_path or tmp_path / "cost.jsonl", clock=clock, config_path=str(tmp_path / "config.yml"))

    return start


def echo_usage(model: str = "gpt-4o-2024-08-06", delay: float = 0.0):
    """A chat upstream whose usage is the most the request allows: input = the proxy's own
    estimate of the request, output = its max_tokens. Real cost then equals the reservation."""

    async def handler(request: web.Request, rec: Any) -> web.StreamResponse:
        body = rec.json
        if delay:
            await asyncio.sleep(delay)
        prompt = estimate_input_tokens(body, body["model"])
        out = body.get("max_tokens") or 16
        return web.json_response(chat_completion(model, {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}))

    return handler


def config(upstream: str, budgets: dict | None = None, auth: dict | None = None) -> dict:
    key = {"api_key": PROXY_OPENAI_KEY} if auth else {}
    akey = {"api_key": PROXY_ANTHROPIC_KEY} if auth else {}
    cfg: dict[str, Any] = {
        "providers": {
            "openai": {"base_url": upstream, "models": {**OPENAI_MODELS, **FLAT}, **key},
            "anthropic": {"base_url": upstream, "models": ANTHROPIC_MODELS, **akey},
        },
        "catalog": {"enabled": False},
    }
    if budgets is not None:
        cfg["budgets"] = budgets
    if auth is not None:
        cfg["auth"] = auth
    return cfg


def oai(url: str, key: str = CLIENT_OPENAI_KEY, headers: dict | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0, default_headers=headers)


async def flat_call(c: openai.AsyncOpenAI, **extra: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(model="flat-1", messages=MSG, max_tokens=1000, **extra)


# --- calendar periods -------------------------------------------------------------------


def test_period_bounds_are_calendar_true():
    utc = ZoneInfo("UTC")
    now = ts(2026, 12, 31, 23, 59, 59)  # a Thursday
    assert period_bounds("daily", now, utc) == (ts(2026, 12, 31), ts(2027, 1, 1))
    assert period_bounds("weekly", now, utc) == (ts(2026, 12, 28), ts(2027, 1, 4))  # Monday to Monday
    assert period_bounds("monthly", now, utc) == (ts(2026, 12, 1), ts(2027, 1, 1))
    assert period_bounds("monthly", ts(2027, 1, 1), utc)[0] == ts(2027, 1, 1)  # the boundary belongs to the new period
    assert period_bounds("monthly", ts(2028, 2, 15), utc) == (ts(2028, 2, 1), ts(2028, 3, 1))  # leap February
    assert period_bounds(None, now, utc) == (0.0, float("inf"))
    # A local zone across the spring DST change: the day has 23 hours, midnights are local.
    berlin = ZoneInfo("Europe/Berlin")
    lo, hi = period_bounds("daily", ts(2026, 3, 29, 12, tz=berlin), berlin)
    assert (lo, hi) == (ts(2026, 3, 28, 23), ts(2026, 3, 29, 22))  # 00:00 CET .. 00:00 CEST, in UTC
    assert hi - lo == 23 * 3600
    lo, hi = period_bounds("weekly", ts(2026, 3, 29, 12, tz=berlin), berlin)
    assert (hi - lo) == 7 * 86400 - 3600
    assert period_bounds("monthly", ts(2026, 3, 31, 22, 30), berlin)[0] == ts(2026, 4, 1, tz=berlin)  # already April in Berlin


# --- the ledger (pure, clock injected) ---------------------------------------------------


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_daily_weekly_monthly_reset_exactly_at_the_boundary():
    clock = Clock(ts(2026, 3, 31, 23, 59, 59))  # Tuesday, last second of March (UTC)
    limits = [Limit("user", "daily", 100, match="d"), Limit("user", "weekly", 100, match="w"), Limit("user", "monthly", 100, match="m")]
    ledger = BudgetLedger(limits, clock=clock)
    for who in "dwm":
        d = ledger.reserve(Subject(user_id=who), 100)
        assert d.allowed
        ledger.settle(d.hold, 100)
        blocked = ledger.reserve(Subject(user_id=who), 1)
        assert not blocked.allowed and blocked.refused.name == f"user:{who} {limits['dwm'.index(who)].period}"
    clock.t = ts(2026, 4, 1) - 0.001  # a millisecond before midnight: still the old day
    assert not ledger.reserve(Subject(user_id="d"), 1).allowed
    clock.t = ts(2026, 4, 1)  # Wednesday 00:00: a new day and a new month, the same week
    new_day, new_month = ledger.reserve(Subject(user_id="d"), 100), ledger.reserve(Subject(user_id="m"), 100)
    assert new_day.allowed and new_month.allowed
    still = ledger.reserve(Subject(user_id="w"), 1)
    assert not still.allowed and still.refused.end == ts(2026, 4, 6)  # resets Monday 00:00
    clock.t = ts(2026, 4, 6)
    assert ledger.reserve(Subject(user_id="w"), 100).allowed
    # A new period starts from zero, and the old period's counters are forgotten.
    assert ledger.spent(("user", None, "weekly"), "w") == 0
    ledger.prune(clock.t)
    assert any(c.end <= clock.t for c in ledger.counters.values())  # kept while a call holds a reservation
    ledger.settle(new_day.hold, 1)
    ledger.settle(new_month.hold, 1)
    ledger.prune(clock.t)
    assert all(c.end > clock.t for c in ledger.counters.values())


def test_periods_follow_the_configured_timezone():
    clock = Clock(ts(2026, 7, 1, 21, 59, 59))  # 23:59:59 in Berlin (CEST, UTC+2)
    ledger = BudgetLedger([Limit("global", "daily", 100)], timezone="Europe/Berlin", clock=clock)
    ledger.settle(ledger.reserve(Subject(), 100).hold, 100)
    assert not ledger.reserve(Subject(), 1).allowed
    clock.t = ts(2026, 7, 1, 22)  # Berlin midnight, 22:00 UTC
    assert ledger.reserve(Subject(), 100).allowed


def test_reserve_is_all_or_nothing_and_settle_adds_the_real_cost():
    clock = Clock(ts(2026, 5, 5, 12))
    ledger = BudgetLedger([Limit("global", "monthly", 1000), Limit("team", "daily", 300, match="research")], clock=clock)
    research = Subject(user_id="alice", team="research")
    a = ledger.reserve(research, 200)
    assert a.allowed
    b = ledger.reserve(research, 200)  # the team budget (200 held + 200 > 300) blocks ...
    assert not b.allowed and b.refused.name == "team:research daily"
    assert ledger.states()[0].reserved == 200  # ... and nothing was reserved on the global one
    ledger.settle(a.hold, 120)
    ledger.settle(a.hold, 120)  # settling twice changes nothing
    g, t = ledger.states()
    assert (g.spent, g.reserved, t.spent, t.reserved) == (120, 0, 120, 0)
    c = ledger.reserve(research, 150)
    ledger.settle(c.hold, None)  # unknown cost (aborted before usage, unpriced model): counts 0
    assert ledger.states()[1].spent == 120
    # Exactly at the limit is allowed; one unit over is not.
    assert ledger.reserve(research, 180).allowed
    assert not ledger.reserve(Subject(team="research"), 1).allowed
    # An exhausted budget also refuses a call whose price is unknown (worst case 0).
    ledger2 = BudgetLedger([Limit("global", "daily", 10)], clock=clock)
    ledger2.settle(ledger2.reserve(Subject(), 10).hold, 10)
    assert not ledger2.reserve(Subject(), 0).allowed


def test_each_value_has_its_own_budget_and_tag_and_session_scopes():
    clock = Clock(ts(2026, 5, 5, 12))
    ledger = BudgetLedger(
        [Limit("user", "daily", 100), Limit("tag", "monthly", 50, match="search", tag="feature"), Limit("session", None, 70)],
        clock=clock,
    )
    assert ledger.reserve(Subject(user_id="bob"), 100).allowed
    assert not ledger.reserve(Subject(user_id="bob"), 1).allowed
    assert ledger.reserve(Subject(user_id="carol"), 100).allowed  # each user separately
    assert ledger.reserve(Subject(tags={"feature": "search"}), 50).allowed
    refused = ledger.reserve(Subject(tags={"feature": "search"}), 1).refused
    assert refused is not None and refused.name == "tag:feature=search monthly"
    assert ledger.reserve(Subject(tags={"feature": "chat"}), 500).allowed  # the limit is for search only
    assert ledger.reserve(Subject(session_id="s1"), 70).allowed
    refused = ledger.reserve(Subject(session_id="s1"), 1).refused
    assert refused is not None and "does not reset" in refusal_message(refused, 1)
    clock.t += 40 * 86400  # sessions have no calendar reset, the daily user budget did reset
    assert ledger.reserve(Subject(user_id="bob"), 100).allowed
    assert not ledger.reserve(Subject(session_id="s1"), 1).allowed  # still held by s1's first call


def test_warning_is_reported_once_per_budget_and_period():
    clock = Clock(ts(2026, 5, 5, 12))
    ledger = BudgetLedger([Limit("user", "daily", 100, match="u")], warn_at=0.8, clock=clock)
    u = Subject(user_id="u")
    first = ledger.reserve(u, 70)
    assert first.warnings == [] and first.tightest.remaining == 30
    second = ledger.reserve(u, 10)  # 80 of 100: crosses 80%
    assert [s.name for s in second.new_warnings] == ["user:u daily"] and second.warnings[0].fraction == 0.8
    third = ledger.reserve(u, 10)
    assert third.warnings and not third.new_warnings  # still warning, but only announced once
    clock.t = ts(2026, 5, 6, 0, 0, 1)
    assert not ledger.reserve(u, 75).warnings  # a new day starts at 0 (the held 90 were yesterday's)
    assert [s.name for s in ledger.reserve(u, 10).new_warnings] == ["user:u daily"]  # and warns again


def test_refusal_message_names_budget_limit_spend_and_reset():
    clock = Clock(ts(2026, 5, 5, 12))
    ledger = BudgetLedger([Limit("user", "daily", 5 * USD)], clock=clock)
    ledger.settle(ledger.reserve(Subject(user_id="bob"), 4 * USD).hold, 4 * USD + USD // 4)
    d = ledger.reserve(Subject(user_id="bob"), USD)
    msg = refusal_message(d.refused, USD)
    assert msg == (
        "Budget exceeded: user:bob daily (each user) has a limit of $5.00 and $4.25 is spent; "
        "this call may cost up to $1.00. The budget resets at 2026-05-06T00:00:00Z."
    )


# --- the worst case of a request ---------------------------------------------------------


@pytest.mark.parametrize(
    "body,kind,expected",
    [
        ({"max_tokens": 300}, "chat", 300),  # OpenAI chat (legacy) and Anthropic messages
        ({"max_completion_tokens": 500, "n": 3}, "chat", 1500),  # every choice can be that long
        ({"max_output_tokens": 700}, "responses", 700),
        ({"generationConfig": {"maxOutputTokens": 256, "candidateCount": 2}}, "generate", 512),
        ({"messages": []}, "chat", 4096),  # no cap in the request: the configured default
        ({"input": "text"}, "embeddings", 0),
        ({"max_tokens": True}, "chat", 4096),  # not a count
    ],
)
def test_max_output_tokens(body, kind, expected):
    assert max_output_tokens(body, kind, 4096) == expected


def test_worst_case_prices_cache_writes_when_the_request_asks_for_caching():
    raw = b'{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1h"}}],"max_tokens":10}'
    u = worst_case_usage(orjson.loads(raw), raw, "messages", 1000, 4096)
    assert (u.input_tokens, u.cache_write_tokens, u.cache_write_1h_tokens, u.output_tokens) == (1000, 1000, 1000, 10)
    plain = worst_case_usage({"max_tokens": 10}, b"{}", "messages", 1000, 4096)
    assert plain.cache_write_tokens == 0 and plain.cache_read_tokens == 0  # never a cache discount


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budgets,key",
    [
        ({"limits": [{"scope": "galaxy", "period": "daily", "usd": 1}]}, "budgets.limits[0].scope"),
        ({"limits": [{"scope": "user", "usd": 1}]}, "budgets.limits[0].period"),
        ({"limits": [{"scope": "user", "period": "hourly", "usd": 1}]}, "budgets.limits[0].period"),
        ({"limits": [{"scope": "user", "period": "daily", "usd": -1}]}, "budgets.limits[0].usd"),
        ({"limits": [{"scope": "user", "period": "daily"}]}, "budgets.limits[0].usd"),
        ({"limits": [{"scope": "tag", "period": "daily", "usd": 1}]}, "budgets.limits[0].tag"),
        ({"limits": [{"scope": "global", "match": "x", "period": "daily", "usd": 1}]}, "budgets.limits[0].match"),
        ({"limits": [{"scope": "user", "perid": "daily", "usd": 1}]}, "budgets.limits[0].perid"),
        ({"timezone": "Mars/Olympus"}, "budgets.timezone"),
        ({"warn_at": 80}, "budgets.warn_at"),
        ({"webhook": "ftp://x"}, "budgets.webhook"),
        ({"override": "yes"}, "budgets.override"),
        ({"default_max_output_tokens": 0}, "budgets.default_max_output_tokens"),
        ({"limits": {"scope": "user"}}, "budgets.limits"),
    ],
)
def test_bad_budget_config_names_file_key_and_reason(budgets, key):
    with pytest.raises(ConfigError) as e:
        parse_config(config("http://127.0.0.1:1", budgets), "/etc/proxy/config.yml")
    assert e.value.path == "/etc/proxy/config.yml" and e.value.key == key and e.value.reason


def test_budgets_need_cost_tracking():
    cfg = config("http://127.0.0.1:1", {"limits": []})
    cfg["features"] = {"cost_tracking": {"enabled": False}}
    with pytest.raises(ConfigError, match="cost_tracking"):
        parse_config(cfg)


def test_usd_amounts_are_exact():
    assert usd_to_units("0.1") == USD // 10 and usd_to_units(0.1) == USD // 10 and usd_to_units(50) == 50 * USD


# --- rebuilding from the log ----------------------------------------------------------------


def _line(t: float, cost: str | None, **fields: Any) -> bytes:
    rec = {
        "schema_version": 1,
        "timestamp": iso_utc(t),
        "user_id": fields.pop("user_id", "alice"),
        "team": None,
        "key_id": None,
        "session_id": None,
        "total_cost": None if cost is None else Decimal(cost),
        "tags": {},
        **fields,
    }
    return orjson.dumps(rec, default=lambda d: orjson.Fragment(str(d))) + b"\n"


def test_replay_counts_only_the_current_periods(tmp_path):
    now = ts(2026, 6, 15, 12)
    log = tmp_path / "cost.jsonl"
    with log.open("wb") as f:
        for i in range(30_000):  # May: big, and skipped from the raw bytes without parsing
            f.write(_line(ts(2026, 5, 1) + i * 80, "1.0"))
        f.write(b'{"torn line\n')
        f.write(_line(ts(2026, 6, 1), "0.25"))  # first instant of June
        f.write(_line(ts(2026, 6, 15, 9), "0.5", tags={"feature": "search"}))
        f.write(_line(ts(2026, 6, 15, 11), None))  # unpriced: 0
        f.write(_line(ts(2026, 6, 14, 23, 59), "0.125", user_id="bob", session_id="s-9"))  # yesterday
        f.write(_line(ts(2026, 6, 15, 10), "0.0000000001"))  # a call that began earlier, logged late
    ledger = BudgetLedger(
        [Limit("global", "monthly", 100 * USD), Limit("user", "daily", USD), Limit("tag", "weekly", USD, tag="feature")],
        clock=Clock(now),
    )
    read, counted = replay_log(ledger, log)
    assert read < 1000 and counted == 5  # the bisection skipped May without reading it
    states = {s.name: s for s in ledger.states()}
    assert states["global monthly"].spent == cost_units(Decimal("0.875")) + 1
    assert states["user:alice daily (each user)"].spent == cost_units(Decimal("0.5")) + 1  # today only
    assert states["tag:feature=search weekly (each feature)"].spent == cost_units(Decimal("0.5"))
    assert "user:bob daily (each user)" not in states  # bob spent yesterday: today starts at 0
    # Sessions have no calendar period: they are rebuilt from the last 31 days.
    sessions = BudgetLedger([Limit("session", None, USD)], clock=Clock(now))
    replay_log(sessions, log)
    assert {s.name: s.spent for s in sessions.states()} == {"session:s-9 (each session)": cost_units(Decimal("0.125"))}


# --- end to end ------------------------------------------------------------------------------


async def test_100_concurrent_calls_never_overspend(mock, launch):
    """The proof: check and reserve are one step, so racing calls cannot share headroom."""
    mock.on("/v1/chat/completions", echo_usage(delay=0.1))  # all 100 are in flight together
    proxy = await launch(config(mock.url, {"limits": [{"scope": "global", "period": "monthly", "usd": 0.25}]}))
    async with oai(proxy.url) as c:

        async def one(i: int) -> Any:
            try:
                return await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)
            except openai.RateLimitError as e:
                return e

        results = await asyncio.gather(*(one(i) for i in range(100)))
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(refused) == 100
    records = await proxy.records()
    assert len(records) == 100
    # Every call costs exactly its worst case (the mock bills the most the request allows):
    # $0.01 output + its few input tokens at $2.50/M. Exactly floor(limit / cost) fit.
    costs = {dec(r["total_cost"]) for r in records if r["status"] == 200}
    assert len(costs) == 1
    per_call = costs.pop()
    assert Decimal("0.01") < per_call < Decimal("0.0101")
    assert len(ok) == int(Decimal("0.25") // per_call) == 24
    spent = sum(dec(r["total_cost"]) for r in records)
    assert spent <= Decimal("0.25") and spent == per_call * 24
    assert all(r["status"] == 429 and r["error"].startswith("budget exceeded: global monthly") for r in records if r["status"] != 200)
    assert "Budget exceeded: global monthly has a limit of $0.25" in refused[0].message
    assert refused[0].response.headers["x-should-retry"] == "false"
    assert len(mock.requests) == 24  # a refused call never reaches the provider


async def test_warning_headers_log_line_and_webhook(mock, launch, caplog):
    hooks: list[dict] = []
    got = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        got.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        mock.on("/v1/chat/completions", echo_usage("flat-1"))
        budgets = {
            "warn_at": 0.8,
            "webhook": f"http://127.0.0.1:{port}/hook",
            "limits": [
                {"scope": "user", "match": "alice", "period": "daily", "usd": 0.05},
                {"scope": "global", "period": "monthly", "usd": 10},
            ],
        }
        proxy = await launch(config(mock.url, budgets))
        async with oai(proxy.url, headers={"x-user-id": "alice"}) as c:
            seen = []
            for _ in range(5):
                r = await flat_call(c)
                seen.append((r.headers.get("x-budget-warning"), r.headers.get("x-budget-remaining")))
            with pytest.raises(openai.RateLimitError, match="user:alice daily has a limit of \\$0.05 and \\$0.05 is spent"):
                await flat_call(c)
        assert seen[:3] == [(None, None)] * 3
        assert seen[3] == ("user:alice daily at 80%", "0.01")  # 3 spent + 1 held of 5 cents
        assert seen[4] == ("user:alice daily at 100%", "0")
        await asyncio.wait_for(got.wait(), 5)
        for _ in range(50):  # the limit's post follows the warning's
            if len(hooks) >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        # Once per budget and period each: the warning at 80%, the limit at the first refusal.
        assert [h["event"] for h in hooks] == ["warning", "limit"]
        assert hooks[0]["budget"] == "user:alice daily" and hooks[0]["limit_usd"] == 0.05
        assert hooks[0]["spent_usd"] == 0.03 and hooks[0]["reserved_usd"] == 0.01 and hooks[0]["percent"] == 80.0
        assert hooks[0]["period_start"].endswith("T00:00:00Z") and hooks[0]["resets_at"].endswith("T00:00:00Z")
        assert hooks[1]["budget"] == "user:alice daily" and hooks[1]["spent_usd"] == 0.05 and hooks[1]["percent"] == 100.0
        assert sum("budget warning: user:alice daily at 80%" in r.getMessage() for r in caplog.records) == 1
        assert sum("budget limit reached: user:alice daily at 100%" in r.getMessage() for r in caplog.records) == 1
        assert len(mock.requests) == 5
        assert all("x-user-id" not in req.headers for req in mock.requests)
    finally:
        await runner.cleanup()


async def test_a_dead_webhook_never_slows_a_call(mock, launch):
    mock.on("/v1/chat/completions", echo_usage("flat-1"))
    sink = socket_that_never_answers()
    budgets = {"webhook": f"http://127.0.0.1:{sink.getsockname()[1]}/hook", "limits": [{"scope": "global", "period": "daily", "usd": 0.01}]}
    proxy = await launch(config(mock.url, budgets))
    try:
        async with oai(proxy.url) as c:
            t0 = time.monotonic()
            r = await flat_call(c)  # 100%: warns and posts to a server that never replies
            assert time.monotonic() - t0 < 1.0
            assert r.headers["x-budget-warning"] == "global daily at 100%"
    finally:
        await proxy.stop()  # waits for the webhook post to time out (2 s), then closes
        sink.close()


def socket_that_never_answers():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def _admin_keys(tmp_path: Path) -> tuple[str, str, Path]:
    """An admin key and a user key, created with the store's own writer."""
    admin, user = new_key(), new_key()
    path = tmp_path / "keys.yml"
    save_keys(
        path,
        [
            KeyEntry(key_hash(admin)[:12], key_hash(admin), "ops", None, None, None, True),
            KeyEntry(key_hash(user)[:12], key_hash(user), "alice", "research"),
        ],
    )
    return admin, user, path


async def test_admin_override_lets_a_blocked_call_through_and_the_record_says_so(mock, launch, tmp_path):
    admin, user, keys_file = _admin_keys(tmp_path)
    mock.on("/v1/chat/completions", echo_usage("flat-1"))
    budgets = {"limits": [{"scope": "team", "match": "research", "period": "weekly", "usd": 0.02}]}
    proxy = await launch(config(mock.url, budgets, auth={"keys_file": str(keys_file)}))
    async with oai(proxy.url, key=user) as c:
        await flat_call(c)
        await flat_call(c)
        with pytest.raises(openai.RateLimitError, match="team:research weekly"):
            await flat_call(c)
        with pytest.raises(openai.RateLimitError):  # a non-admin key is no override
            await flat_call(c, extra_headers={"x-budget-override": user})
        r = await flat_call(c, extra_headers={"x-budget-override": admin})
        assert r.http_response.status_code == 200
    records = await proxy.records()
    assert [(r["status"], r["budget_override"]) for r in records] == [(200, False), (200, False), (429, False), (429, False), (200, True)]
    assert all(r["team"] == "research" and r["user_id"] == "alice" for r in records)
    assert len(mock.requests) == 3 and all("x-budget-override" not in q.headers for q in mock.requests)
    assert admin not in proxy.raw_log() and user not in proxy.raw_log()


async def test_config_override_only_warns(mock, launch):
    mock.on("/v1/chat/completions", echo_usage("flat-1"))
    proxy = await launch(config(mock.url, {"override": True, "limits": [{"scope": "global", "period": "daily", "usd": 0.01}]}))
    async with oai(proxy.url) as c:
        await flat_call(c)
        r = await flat_call(c)
        assert r.headers["x-budget-warning"] == "global daily at 200%"
    records = await proxy.records()
    assert [r["budget_override"] for r in records] == [False, True]


async def test_spend_survives_a_restart(mock, launch, tmp_path):
    admin, user, keys_file = _admin_keys(tmp_path)
    mock.on("/v1/chat/completions", echo_usage("flat-1"))
    log = tmp_path / "cost.jsonl"
    old = _line(time.time() - 45 * 86400, "100")  # last month or earlier: not this month's spend
    log.write_bytes(old)
    budgets = {"limits": [{"scope": "user", "period": "monthly", "usd": 0.03}, {"scope": "global", "period": "monthly", "usd": 5}]}
    cfg = config(mock.url, budgets, auth={"keys_file": str(keys_file)})
    first = await launch(cfg, log)
    async with oai(first.url, key=user) as c:
        for _ in range(3):
            await flat_call(c)
    await first.stop()

    second = await launch(cfg, log)
    async with oai(second.url, key=user) as c:
        with pytest.raises(openai.RateLimitError, match=r"user:alice monthly \(each user\) has a limit of \$0.03 and \$0.03 is spent"):
            await flat_call(c)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{second.url}/health") as r:
            public = json.loads(await r.read())
        async with s.get(f"{second.url}/health", headers={"Authorization": f"Bearer {admin}"}) as r:
            detailed = json.loads(await r.read(), parse_float=Decimal)
    assert public["budgets"] == {"count": 2, "warning": 0, "exhausted": 1}  # no per-user detail
    detail = {d["budget"]: d for d in detailed["budgets"]["detail"]}
    assert (
        detail["user:alice monthly (each user)"]["spent_usd"] == Decimal("0.03")
        and detail["user:alice monthly (each user)"]["remaining_usd"] == 0
    )
    assert detail["global monthly"]["spent_usd"] == Decimal("0.03")
    await second.stop()

    # The operator's view, from the log alone.
    (tmp_path / "config.yml").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COST_TRACKING_FILE": str(log)}
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "budgets", "--config", str(tmp_path / "config.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["BUDGET", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS"]
    alice = next(line for line in lines if line.startswith("user:alice monthly (each user)"))
    assert alice.split()[4:8] == ["$0.03", "$0.03", "$0.00", "100%"] and alice.endswith("EXHAUSTED")
    assert next(line for line in lines if line.startswith("global monthly")).split()[2:6] == ["$5.00", "$0.03", "$4.97", "1%"]


async def test_a_daily_budget_resets_at_midnight_through_the_app(mock, launch):
    clock = Clock(ts(2026, 3, 10, 23, 58))
    mock.on("/v1/chat/completions", echo_usage("flat-1"))
    proxy = await launch(config(mock.url, {"limits": [{"scope": "user", "period": "daily", "usd": 0.02}]}), clock=clock)
    async with oai(proxy.url, headers={"x-user-id": "bob"}) as c:
        await flat_call(c)
        await flat_call(c)
        with pytest.raises(openai.RateLimitError, match="resets at 2026-03-11T00:00:00Z"):
            await flat_call(c)
        clock.t = ts(2026, 3, 11)
        r = await flat_call(c)
        assert r.http_response.status_code == 200


async def test_anthropic_sdk_raises_rate_limit_error_and_does_not_retry(mock, launch):
    mock.on("/v1/messages", lambda request, rec: _anthropic_reply())
    budgets = {"limits": [{"scope": "session", "usd": 0.001}]}
    proxy = await launch(config(mock.url, budgets))
    client = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0)
    async with client as c:
        with pytest.raises(anthropic.RateLimitError) as e:
            # Haiku: up to 1000 output tokens at $5/M = $0.005 > the session's $0.001.
            await c.messages.create(model="claude-haiku-4-5", max_tokens=1000, messages=MSG, extra_headers={"x-session-id": "s-1"})
        assert e.value.body["error"]["type"] == "rate_limit_error" and "session:s-1" in e.value.message
        assert e.value.response.headers["x-should-retry"] == "false"
        ok = await c.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSG, extra_headers={"x-session-id": "s-2"})
        assert ok.content
    [refused, passed] = await proxy.records()
    assert (refused["status"], refused["session_id"], passed["status"], passed["session_id"]) == (429, "s-1", 200, "s-2")
    assert "x-session-id" not in mock.requests[0].headers


async def _anthropic_reply() -> web.Response:
    return web.json_response(anthropic_message("claude-haiku-4-5-20251001", {"input_tokens": 10, "output_tokens": 20}))


def test_the_limit_is_announced_once_and_only_for_a_call_really_refused():
    """An override (budgets.override, an admin's x-budget-override) lets the call through:
    no "limit reached" alert for it, and the first real refusal still gets one."""
    clock = Clock(ts(2026, 5, 5, 12))
    ledger = BudgetLedger([Limit("global", "daily", 10)], clock=clock)
    ledger.settle(ledger.reserve(Subject(), 10).hold, 10)
    overridden = ledger.reserve(Subject(), 5, override=True)
    assert overridden.allowed and overridden.overridden and overridden.new_limit is None
    first = ledger.reserve(Subject(), 5)
    assert not first.allowed and first.new_limit is not None and first.new_limit.name == "global daily"
    assert ledger.reserve(Subject(), 5).new_limit is None  # once per period
    clock.t += 86400
    ledger.settle(ledger.reserve(Subject(), 10).hold, 10)
    assert ledger.reserve(Subject(), 1).new_limit is not None  # the next period announces again
