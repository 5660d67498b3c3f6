"""The budget ledger on Redis (``budgets.backend``), against a real ``redis-server``
(tests/support/redis_server.py): the Lua check decides as ``BudgetLedger`` does,
racing calls on two ledgers, two proxy processes and two workers never overspend,
period keys expire at the period's end, a dead worker's hold is released, Redis down
gives 503s in the family's format (or lets calls through with ``allow``), and an
emptied Redis is rebuilt from the log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest
import redis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.budgets import BudgetsConfig, BudgetState, Decision, Limit, Subject, ledger_for
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.storage.redis_ledger import HOLD_SECONDS, LedgerUnreachable, RedisLedger
from proxy.web.state import APP_STATE
from tests.support import ROOT
from tests.support.config import ANTHROPIC_MODELS, CLIENT_ANTHROPIC_KEY, CLIENT_OPENAI_KEY
from tests.support.inproc import ProxyHandle
from tests.support.ports import HOST, free_port
from tests.support.provider_replies import anthropic_message, chat_completion
from tests.support.proxy_process import proxy_command, wait_serving
from tests.support.records import dec, parse_log
from tests.support.redis_server import RedisServer

UTC = timezone.utc
# $10 per 1M output tokens and free input: a call with max_tokens=1000 costs exactly $0.01,
# and reserves exactly that.
FLAT = {"flat-1": {"pricing": {"input": 0, "output": 10}}}
CALL = {"model": "flat-1", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 1000}
CENT = 10**8  # ledger units in $0.01


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: float = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() + second


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: tests here stop and restart it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that never stop it (each under a prefix of its own)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def ledger(
    url: str, limits: tuple[Limit, ...], clock: Clock, log: Path, *, prefix: str | None = None, per_key: bool = False, **kw: Any
) -> RedisLedger:
    # A generous timeout: the suite shares the CPUs; the tests of timeouts set their own.
    cfg = BudgetsConfig(limits=limits, warn_at=0.5, backend=url, backend_timeout=5, redis_prefix=prefix or f"t{uuid.uuid4().hex[:12]}")
    return RedisLedger(ledger_for(cfg, per_key=per_key, clock=clock), cfg, log, **kw)


def config(upstream: str, backend: str, limits: list[dict], **budgets: Any) -> dict:
    return {
        "providers": {
            "openai": {"base_url": upstream, "models": FLAT},
            "anthropic": {"base_url": upstream, "models": ANTHROPIC_MODELS},
        },
        "catalog": {"enabled": False},
        "budgets": {"backend": backend, "limits": limits, "backend_timeout": 5, **budgets},
    }


def echo_usage(delay: float = 0.0):
    """Output = the request's max_tokens: the real cost is the reservation."""

    async def handler(request: web.Request, rec: Any) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        out = rec.json["max_tokens"]
        return web.json_response(chat_completion("flat-1", {"prompt_tokens": 5, "completion_tokens": out, "total_tokens": 5 + out}))

    return handler


async def call(s: aiohttp.ClientSession, url: str, user: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", **({"x-user-id": user} if user else {})}
    # A hang would be a failure, not a slow test: Redis down must answer within its timeout.
    async with asyncio.timeout(10):
        async with s.post(f"{url}/openai/v1/chat/completions", json=CALL, headers=headers) as r:
            return r.status, await r.json(content_type=None)


# --- the Lua check decides as the in-process ledger does ---------------------------------------

SUBJECTS = (
    Subject("alice", "red", "k1", "s1", {"feature": "chat"}),
    Subject("bob", "red", None, None, {}),
    Subject("carol", None, "k2", None, {"feature": "search"}),
    Subject(None, None, None, None, {}),
)
# Round amounts, so that calls land exactly on limits, and bob's user and team budgets
# tie (the one that resets first refuses).
LIMITS = (
    Limit("user", "daily", 100),
    Limit("user", "daily", 60, match="alice"),
    Limit("team", "weekly", 100),
    Limit("global", "monthly", 250),
    Limit("tag", "daily", 90, tag="feature"),
    Limit("session", None, 80),
)
KEY_LIMIT = Limit("key", "monthly", 70, match="k1", source="key")
RESERVE = st.tuples(st.just("reserve"), st.integers(0, 3), st.sampled_from([0, 10, 10, 20, 30, 45]), st.sampled_from([False] * 4 + [True]))
OPS = st.lists(
    st.one_of(
        RESERVE,
        RESERVE,
        st.tuples(st.just("settle"), st.integers(0, 40), st.sampled_from([0, 5, 10, 20, 30])),
        st.tuples(st.just("tick"), st.integers(1, 3)),  # hours: across days, a week and a month
    ),
    min_size=5,
    max_size=40,
)


def view(d: Decision) -> tuple:
    def st_(s: BudgetState | None) -> tuple | None:
        return None if s is None else (s.name, s.spent, s.reserved, s.start, s.end)

    return (
        d.allowed,
        d.worst,
        d.overridden,
        st_(d.refused),
        st_(d.new_limit),
        st_(d.tightest),
        [st_(s) for s in d.warnings],
        [st_(s) for s in d.new_warnings],
    )


def shown(states: list[BudgetState]) -> dict[str, tuple[int, int]]:
    # Redis keeps no field for a value with nothing spent or held; the in-process ledger
    # may keep a counter at zero: the same budgets either way.
    return {s.name: (s.spent, s.reserved) for s in states if s.used or s.limit.match is not None or s.limit.scope == "global"}


# bob's user and team budgets tie: the daily one refuses; an override lets the next through.
BOB_TIES = [("reserve", 1, 45, False), ("reserve", 1, 45, False), ("reserve", 1, 20, False), ("reserve", 1, 30, True), ("settle", 0, 5)]
# bob at his limit exactly: a call of no cost is refused too.
BOB_AT_LIMIT = [("reserve", 1, 45, False), ("reserve", 1, 45, False), ("reserve", 1, 10, False), ("reserve", 1, 0, False)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, start=st.sampled_from([ts(2026, 5, 31, 20), ts(2026, 3, 10, 22, 30)]))
@example(ops=BOB_TIES, start=ts(2026, 3, 10))
@example(ops=BOB_AT_LIMIT, start=ts(2026, 3, 10))
def test_the_lua_check_decides_as_the_in_process_ledger_does(shared_redis: RedisServer, tmp_path: Path, ops: list, start: float):
    """The same reserves and settles, on BudgetLedger and on RedisLedger against the real
    server: the same decisions (refusal, override, warnings and their first time, the
    limit's first refusal, the tightest budget) and the same budgets after each step."""
    clock = Clock(start)
    log = tmp_path / "empty.jsonl"
    log.touch()

    async def run() -> None:
        mem = ledger_for(BudgetsConfig(limits=LIMITS, warn_at=0.5), per_key=True, clock=clock)
        red = ledger(shared_redis.url, LIMITS, clock, log, per_key=True, hold_seconds=30 * 86400)
        holds: list[tuple[Any, Any]] = []
        try:
            for op in ops:
                if op[0] == "reserve":
                    _, who, worst, override = op
                    extra = (KEY_LIMIT,) if SUBJECTS[who].key_id == "k1" else ()
                    a = mem.reserve(SUBJECTS[who], worst, extra, override)
                    b = await red.reserve_shared(SUBJECTS[who], worst, extra, override)
                    assert view(a) == view(b), op
                    if a.hold is not None:
                        holds.append((a.hold, b.hold))
                elif op[0] == "settle" and holds:
                    a_hold, b_hold = holds.pop(op[1] % len(holds))
                    mem.settle(a_hold, op[2])
                    red.settle(b_hold, op[2])
                    assert await red.flush()
                elif op[0] == "tick":
                    clock.t += op[1] * 3600
                await red.refresh()
                assert shown(red.states((KEY_LIMIT,))) == shown(mem.states((KEY_LIMIT,)))
        finally:
            await red.close()

    asyncio.run(run())


# --- atomicity, expiry, holds ---------------------------------------------------------------------


async def test_two_ledgers_racing_one_budget_admit_exactly_what_fits(shared_redis, tmp_path):
    """Two workers' ledgers, 200 reserves at once on one global budget: exactly as many
    as fit are admitted, and what they settle is what Redis holds."""
    clock = Clock(time.time())
    log = tmp_path / "cost.jsonl"
    log.touch()
    limits = (Limit("global", "monthly", 500),)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    a, b = (ledger(shared_redis.url, limits, clock, log, prefix=prefix) for _ in range(2))
    try:
        workers = [a if i % 2 else b for i in range(200)]
        decisions = await asyncio.gather(*(w.reserve_shared(Subject("u"), 7) for w in workers))
        assert sum(d.allowed for d in decisions) == 500 // 7 == 71
        assert all(d.refused is not None and d.refused.name == "global monthly" for d in decisions if not d.allowed)
        for w, d in zip(workers, decisions):
            w.settle(d.hold, 7)
        assert await a.flush() and await b.flush()
        await a.refresh()
        [state] = a.states()
        assert (state.spent, state.reserved) == (71 * 7, 0)
    finally:
        await a.close()
        await b.close()


async def test_period_keys_expire_at_the_period_end_and_the_next_period_starts_from_zero(shared_redis, tmp_path):
    clock = Clock(ts(2026, 6, 30, 23, 59, 58.5))  # 1.5 s before the day and the month end
    log = tmp_path / "cost.jsonl"
    log.touch()
    red = ledger(shared_redis.url, (Limit("user", "daily", 10 * CENT), Limit("global", "monthly", 100 * CENT)), clock, log)
    r = shared_redis.client()
    try:
        d = await red.reserve_shared(Subject("ann"), CENT)
        red.settle(d.hold, CENT)
        assert await red.flush()
        daily = red.counter_key(("user", None, "daily"), ts(2026, 7, 1))
        monthly = red.counter_key(("global", None, "monthly"), ts(2026, 7, 1))
        # The TTL is the time to the period's end on the proxy's clock, not Redis's.
        assert 1000 < r.pttl(daily) <= 1500 and 1000 < r.pttl(monthly) <= 1500
        assert r.hget(daily, "s:ann") == str(CENT)

        clock.t = ts(2026, 7, 1, 0, 0, 1)  # the next day (and month): its own keys, from 0
        d = await red.reserve_shared(Subject("ann"), 2 * CENT)
        assert d.allowed and [(s.name, s.spent, s.reserved) for s in (d.tightest,)] == [("user:ann daily (each user)", 0, 2 * CENT)]
        assert 86_000_000 < r.pttl(red.counter_key(("user", None, "daily"), ts(2026, 7, 2))) <= 86_399_000
        # And the ended day's hash is gone at its end (real time: 1.5 s after it was made).
        deadline = time.monotonic() + 10
        while r.exists(daily) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not r.exists(daily) and not r.exists(monthly)
    finally:
        r.close()
        await red.close()


async def test_a_settle_whose_answer_was_lost_is_counted_once(redis_server, tmp_path):
    # A settle that Redis ran but whose answer came after the timeout is sent again: the
    # second one must change nothing (it used to add the cost twice).
    log = tmp_path / "cost.jsonl"
    log.touch()
    clock = Clock(time.time())
    cfg = BudgetsConfig(limits=(Limit("global", "monthly", 1000),), backend=redis_server.url, backend_timeout=0.3, redis_prefix="lost")
    led = RedisLedger(ledger_for(cfg, per_key=False, clock=clock), cfg, log)
    busy = redis.Redis(host=HOST, port=redis_server.port, socket_timeout=10)
    try:
        warm = await led.reserve_shared(Subject(), 1)
        led.settle(warm.hold, 0)
        assert await led.flush()
        d = await led.reserve_shared(Subject(), 100)
        # A script on another connection keeps Redis busy for 1.5 s: our settle queues
        # behind it, runs when it ends, and its answer is long past our 0.3 s timeout.
        stall = "local t0 = redis.call('TIME') while true do local t = redis.call('TIME') if (t[1]-t0[1])*1000000 + (t[2]-t0[2]) > 1500000 then break end end return 1"
        stalled = asyncio.get_running_loop().run_in_executor(None, busy.eval, stall, 0)
        await asyncio.sleep(0.1)
        led.settle(d.hold, 40)
        assert await led.flush(6.0)
        await stalled
        await led.refresh()
        assert [(s.spent, s.reserved) for s in led.states()] == [(40, 0)]
    finally:
        busy.close()
        await led.close()


async def test_a_dead_workers_hold_is_released_after_its_deadline_and_a_late_settle_only_adds(shared_redis, tmp_path):
    clock = Clock(ts(2026, 8, 3, 9))
    log = tmp_path / "cost.jsonl"
    log.touch()
    limits = (Limit("global", "monthly", 100),)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    dead, alive = ledger(shared_redis.url, limits, clock, log, prefix=prefix), ledger(shared_redis.url, limits, clock, log, prefix=prefix)
    try:
        held = await dead.reserve_shared(Subject(), 60)  # its worker dies: never settled
        late = await dead.reserve_shared(Subject(), 30)
        assert not (await alive.reserve_shared(Subject(), 20)).allowed  # 60 + 30 held: 20 does not fit

        clock.t += HOLD_SECONDS + 1  # past both deadlines: the next reserve releases them
        d = await alive.reserve_shared(Subject(), 20)
        assert d.allowed and d.tightest is not None and (d.tightest.spent, d.tightest.reserved) == (0, 20)
        dead.settle(late.hold, 25)  # a settle after its hold expired: the cost is added, nothing released twice
        assert await dead.flush()
        await alive.refresh()
        assert [(s.spent, s.reserved) for s in alive.states()] == [(25, 20)]
        assert held.hold is not None
    finally:
        await dead.close()
        await alive.close()


def test_backend_config_is_checked_and_a_password_never_shows():
    def err(budgets: dict) -> str:
        with pytest.raises(ConfigError) as e:
            parse_config({"providers": {"openai": {"base_url": "http://127.0.0.1:1"}}, "budgets": budgets}, "c.yml")
        return str(e.value)

    assert "budgets.backend" in err({"backend": "http://:hunter2@127.0.0.1:6379"})
    assert "hunter2" not in err({"backend": "http://:hunter2@127.0.0.1:6379"})
    assert "hunter2" not in err({"backend": "redis://:hunter2@127.0.0.1:port"})
    assert "budgets.on_backend_error" in err({"on_backend_error": "maybe"})
    assert "budgets.backend_timeout" in err({"backend_timeout": 120})
    assert "budgets.redis_prefix" in err({"redis_prefix": "has space"})
    assert "budgets.backend" in err({"backend": "${LCP_TEST_UNSET_REDIS_URL}"})
    # Options the client cannot read are a config error, not a traceback at start-up.
    bad = err({"backend": "redis://:hunter2@127.0.0.1:6379/0?socket_timeout=abc"})
    assert "budgets.backend" in bad and "socket_timeout" in bad and "hunter2" not in bad
    os.environ["LCP_TEST_REDIS_URL"] = "rediss://:hunter2@127.0.0.1:6380/1"
    try:
        cfg = parse_config({"providers": {"openai": {"base_url": "http://127.0.0.1:1"}}, "budgets": {"backend": "${LCP_TEST_REDIS_URL}"}})
    finally:
        del os.environ["LCP_TEST_REDIS_URL"]
    assert cfg.budgets is not None and cfg.budgets.backend.startswith("rediss://") and "hunter2" not in repr(cfg.budgets)
    assert RedisLedger(ledger_for(cfg.budgets, per_key=False), cfg.budgets, "x.jsonl").address == "127.0.0.1:6380"


# --- through the proxy (in this process) -------------------------------------------------------------


@pytest.fixture
def launch(tmp_path, start_proxy):
    async def start(cfg: dict, clock: Any = time.time) -> ProxyHandle:
        return await start_proxy(cfg, tmp_path / "cost.jsonl", clock=clock, config_path=str(tmp_path / "config.yml"))

    return start


async def test_redis_down_refuses_budgeted_calls_with_503_in_each_familys_format(mock, launch, redis_server, http, caplog):
    caplog.set_level(logging.WARNING, "proxy")
    mock.on("/v1/chat/completions", echo_usage())
    mock.on("/v1/messages", lambda request, rec: _anthropic_reply())
    cfg = config(mock.url, redis_server.url, [{"scope": "user", "match": "ann", "period": "monthly", "usd": 1}])
    cfg["budgets"]["backend"] = redis_server.url.replace("redis://", "redis://:pass-4-redis@")
    redis_server.client().config_set("requirepass", "pass-4-redis")
    proxy = await launch(cfg)
    assert (await call(http, proxy.url, "ann"))[0] == 200
    assert await proxy.runner.app[APP_STATE].budgets.flush()
    async with http.get(f"{proxy.url}/health") as r:
        assert (await r.json())["budgets"] == {"count": 1, "warning": 0, "exhausted": 0, "backend": "redis"}
    async with http.get(f"{proxy.url}/metrics") as r:  # the copy of Redis's counters /health refreshed
        spent = [line for line in (await r.text()).splitlines() if line.startswith('llm_proxy_budget_spent_usd{budget="user:ann monthly"')]
    assert len(spent) == 1 and spent[0].endswith(" 0.01")

    redis_server.stop()
    status, body = await call(http, proxy.url, "ann")
    assert status == 503 and body["error"]["message"].startswith("The budget ledger is unreachable")
    async with http.post(
        f"{proxy.url}/anthropic/v1/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "x-user-id": "ann"},
    ) as r:
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert (await r.json())["type"] == "error"
    assert (await call(http, proxy.url, "bob"))[0] == 200  # no budget applies to bob: Redis is not needed
    async with http.get(f"{proxy.url}/health") as r:
        health = await r.json()
    assert health["budgets"]["backend"] == "unreachable" and health["budgets"]["count"] == 1
    async with http.get(f"{proxy.url}/api/budgets") as r:
        assert (await r.json())["backend"] == "unreachable"

    redis_server.start()  # empty
    redis_server.client().config_set("requirepass", "pass-4-redis")
    statuses = await _until_not_503(http, proxy.url, "ann")
    assert statuses[-1] == 200
    records = await proxy.records()
    down = [r for r in records if r["status"] == 503]
    assert len(down) >= 2 and {r["provider"] for r in down} == {"openai", "anthropic"}
    assert all(r["error"] == f"budget ledger unreachable: 127.0.0.1:{redis_server.port} (ConnectionError)" for r in down[:2])
    assert all(r["total_cost"] is None or dec(r["total_cost"]) == 0 for r in down)
    text = caplog.text + proxy.raw_log()
    assert "pass-4-redis" not in text
    assert caplog.text.count("budgeted calls refused with 503") == 1  # one line, not one per call


async def test_a_hung_redis_gives_503_within_the_timeout(mock, launch, redis_server, http):
    mock.on("/v1/chat/completions", echo_usage())
    proxy = await launch(config(mock.url, redis_server.url, [{"scope": "global", "period": "daily", "usd": 1}], backend_timeout=0.3))
    assert (await call(http, proxy.url))[0] == 200
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        status, body = await call(http, proxy.url)
        assert status == 503 and "unreachable" in body["error"]["message"]
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    statuses = await _until_not_503(http, proxy.url)
    assert statuses[-1] == 200


async def test_allow_lets_calls_through_and_an_emptied_redis_is_rebuilt_from_the_log(mock, launch, redis_server, http, caplog):
    """on_backend_error: allow: calls go ahead while Redis is down (one log line); Redis
    back empty: the next call rebuilds it from the log, which has those calls too, and
    their held-back settles are not counted twice."""
    caplog.set_level(logging.WARNING, "proxy")
    mock.on("/v1/chat/completions", echo_usage())
    clock = Clock(time.time())
    limits = [{"scope": "user", "period": "monthly", "usd": 0.045}]
    proxy = await launch(config(mock.url, redis_server.url, limits, on_backend_error="allow"), clock=clock)
    assert (await call(http, proxy.url, "ann"))[0] == 200
    redis_server.stop()
    assert [(await call(http, proxy.url, "ann"))[0] for _ in range(3)] == [200, 200, 200]
    assert caplog.text.count("budgeted calls go ahead unchecked") == 1
    await proxy.wait_records(4)
    clock.t += 60  # the rebuild comes well after those calls ended
    redis_server.start()
    await asyncio.sleep(1.1)  # the proxy leaves a failed Redis alone for a second
    status, body = await call(http, proxy.url, "ann")
    assert status == 429 and "user:ann monthly (each user) has a limit of $0.045 and $0.04 is spent" in body["error"]["message"]
    assert await proxy.runner.app[APP_STATE].budgets.flush(10)  # the held-back settles are sent
    async with http.get(f"{proxy.url}/api/budgets") as r:
        [row] = json.loads(await r.read(), parse_float=Decimal)["budgets"]
    assert row["spent"] == Decimal("0.04") and row["reserved"] == 0
    assert "rebuilt from 4 records" in caplog.text


async def test_spend_in_the_log_is_in_redis_at_start_up(mock, launch, redis_server, http, tmp_path):
    mock.on("/v1/chat/completions", echo_usage())
    cfg = config(mock.url, redis_server.url, [{"scope": "global", "period": "monthly", "usd": 0.025}])
    first = await launch(cfg)
    assert [(await call(http, first.url))[0] for _ in range(3)] == [200, 200, 429]
    await first.stop()
    redis_server.stop()
    redis_server.start()  # empty: the second proxy's start-up rebuilds it from the log
    second = await launch(cfg)
    status, body = await call(http, second.url)
    assert status == 429 and "$0.02 is spent" in body["error"]["message"]


async def test_a_call_recorded_through_the_api_counts_in_redis(mock, launch, redis_server, http):
    cfg = config(mock.url, redis_server.url, [{"scope": "user", "match": "ann", "period": "monthly", "usd": 0.015}])
    proxy = await launch(cfg)
    usage = {"model": "flat-1", "provider": "openai", "input_tokens": 0, "output_tokens": 1000, "user": "ann"}
    async with http.post(f"{proxy.url}/api/usage", json=usage) as r:
        assert r.status == 201
    assert await proxy.runner.app[APP_STATE].budgets.flush()
    mock.on("/v1/chat/completions", echo_usage())
    status, body = await call(http, proxy.url, "ann")
    assert status == 429 and "$0.01 is spent" in body["error"]["message"]


async def _anthropic_reply() -> web.Response:
    return web.json_response(anthropic_message("claude-haiku-4-5-20251001", {"input_tokens": 10, "output_tokens": 20}))


async def _until_not_503(http: aiohttp.ClientSession, url: str, user: str | None = None, timeout: float = 15) -> list[int]:
    """Call until Redis answers again (the proxy retries it after a second)."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while not statuses or statuses[-1] == 503:
        assert time.monotonic() < deadline, f"still 503 after {timeout} s: {statuses}"
        statuses.append((await call(http, url, user))[0])
        if statuses[-1] == 503:
            await asyncio.sleep(0.2)
    return statuses


# --- proxy processes: two on two ports, and serve --workers 2 ---------------------------------------


@asynccontextmanager
async def _processes(tmp: Path, cfg: dict, commands: list[list[str]]) -> AsyncIterator[None]:
    """The commands run in ``tmp`` with ``cfg`` as config.yml, stopped (SIGTERM) after."""
    (tmp / "config.yml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for i, argv in enumerate(commands):
        with open(tmp / f"stderr-{i}.txt", "wb") as err:
            procs.append(subprocess.Popen(argv, cwd=tmp, env=env, stdout=err, stderr=err))
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def _race(http: aiohttp.ClientSession, urls: list[str], n: int = 200) -> list[int]:
    return [s for s, _ in await asyncio.gather(*(call(http, urls[i % len(urls)]) for i in range(n)))]


async def _check_race_then_outage(http, urls: list[str], redis_server: RedisServer, log: Path, tmp: Path) -> None:
    """200 calls racing a $0.57 budget: 57 go through, the log's spend is $0.57 at most;
    Redis killed: 503s, at once; started again, empty: rebuilt from the log, so the
    spent budget still refuses."""
    statuses = await _race(http, urls)
    assert statuses.count(200) == 57 and statuses.count(429) == 143, statuses
    records = parse_log(log.read_text())
    assert len(records) == 200
    assert sum((dec(r["total_cost"]) or Decimal(0) for r in records), Decimal(0)) == Decimal("0.57")

    redis_server.stop()
    for url in urls:
        status, body = await call(http, url)
        assert status == 503, (status, body, [(tmp / f).read_text() for f in os.listdir(tmp) if f.startswith("stderr")])
    redis_server.start()
    for url in urls:
        statuses = await _until_not_503(http, url)
        assert statuses[-1] == 429  # $0.57 of $0.57 spent, from the log


async def test_two_proxy_processes_on_two_ports_share_one_budget(mock, redis_server, http, tmp_path):
    """Two ``python -m proxy`` on two ports, one Redis and one log (as on one machine:
    an emptied Redis is rebuilt from the log that has both proxies' calls)."""
    mock.on("/v1/chat/completions", echo_usage(delay=0.2))  # all in flight together
    log = tmp_path / "cost.jsonl"
    cfg = config(mock.url, redis_server.url, [{"scope": "global", "period": "monthly", "usd": 0.57}])
    ports = [free_port(), free_port()]
    commands = [proxy_command(tmp_path / "config.yml", port, host=HOST, log_file=log) for port in ports]
    urls = [f"http://{HOST}:{port}" for port in ports]
    async with _processes(tmp_path, cfg, commands):
        for url in urls:
            assert await wait_serving(http, f"{url}/health", timeout=60), (tmp_path / "stderr-0.txt").read_text()
        await _check_race_then_outage(http, urls, redis_server, log, tmp_path)


async def test_serve_workers_2_share_one_budget(mock, redis_server, http, tmp_path):
    mock.on("/v1/chat/completions", echo_usage(delay=0.2))
    log = tmp_path / "cost.jsonl"
    cfg = config(mock.url, redis_server.url, [{"scope": "global", "period": "monthly", "usd": 0.57}])
    port = free_port()
    command = [*proxy_command(tmp_path / "config.yml", port, host=HOST, log_file=log), "--workers", "2"]
    url = f"http://{HOST}:{port}"
    async with _processes(tmp_path, cfg, [command]):
        assert await wait_serving(http, f"{url}/health", timeout=60), (tmp_path / "stderr-0.txt").read_text()
        await _check_race_then_outage(http, [url], redis_server, log, tmp_path)
    assert "2 workers" in (tmp_path / "stderr-0.txt").read_text()


def test_unreachable_is_what_a_ledger_raises_without_redis(tmp_path):
    """No server at all: a reserve raises LedgerUnreachable (no hang, no other error)."""
    clock = Clock(time.time())
    red = ledger(f"redis://{HOST}:{free_port()}/0", (Limit("global", "daily", 10),), clock, tmp_path / "cost.jsonl")
    assert red.start_sync() is None

    async def run() -> None:
        try:
            with pytest.raises(LedgerUnreachable) as e:
                await red.reserve_shared(Subject(), 1)
            assert e.value.budgeted and e.value.cause == "ConnectionError"
        finally:
            await red.close()

    asyncio.run(run())
