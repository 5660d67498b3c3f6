"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the real
proxy run as a process over a synthetic log (a few thousand calls over ten days, sessions,
known users, budgets) in front of a mock upstream. Every number the page shows is held
against the API's own answer for the filters the page used, every chart's marks against
what that answer implies; then sorting from the keyboard, a provider filter kept in the
URL, a live call showing up without a reload, the CSV export, the page's weight, that
nothing leaves 127.0.0.1, a phone-sized viewport, and (second test) keys and roles."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import yaml
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.support import ROOT
from tests.support.api import Answer, Call, api_get, get_ok, in_window, install_upstream, make_call, period_bounds, when
from tests.support.config import (
    ANTHROPIC_MODELS,
    GEMINI_MODELS,
    OPENAI_MODELS,
    PROXY_ANTHROPIC_KEY,
    PROXY_GEMINI_KEY,
    PROXY_OPENAI_KEY,
    make_config,
)
from tests.support.ports import HOST, free_port
from tests.support.proxy_process import proxy_command, wait_serving
from tests.support.synthlog import REALISTIC, records, write_log

SEED = 20261202
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
CARD_FIELDS = {  # card -> (endpoint, field)
    "total_cost": ("usage", "total_cost"),
    "requests": ("usage", "requests"),
    "success_rate": ("usage", "success_rate"),
    "avg_cost": ("usage", "avg_cost_per_request"),
    "projected_month": ("costs", "projected_monthly_cost"),
}
# Answers are reused until a record is written or the 30-second period of the clock turns
# (docs/api.md, "How answers are computed"): the projection moves with "now", so the page's
# answer and ours are the same answer only when both were asked within one period.
CACHE_PERIOD = 30
ALLOWED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of (401|400)\b")
ALL_RENDERED = "() => [...document.querySelectorAll('[data-chart]')].every((e) => e.dataset.rendered === 'true')"


# --------------------------------------------------------------------------- the log and the proxy


def synthetic_log(path: Path, now: float) -> list[dict[str, Any]]:
    """~3000 REALISTIC calls over ten days, with sessions, users alice and bob, and 14 models
    (so the per-model chart sums a tail). No call in the minute before now or near the 7-day
    window's start: no record enters or leaves a window while the test runs."""
    edge = now - 7 * 86400
    out = []
    for i, r in enumerate(records(3000, mix=REALISTIC, seed=SEED, end=now - 300, days=10)):
        ts = when(r).timestamp()
        if ts > now - 60 or edge - 60 <= ts <= edge + 300:
            continue
        if i % 11 == 0:
            r["user_id"] = "alice"
        elif i % 13 == 0:
            r["user_id"] = "bob"
        if i % 4 == 0:
            r["session_id"] = f"sess-{i % 37:02d}"
        if r["provider"] == "openai" and i % 25 in (1, 2):
            r["model"] = r["response_model"] = "gpt-4.1-mini" if i % 25 == 1 else "o4-mini"
        out.append(r)
    # A session of one cheap recent call, so the sessions table shows a green chip too.
    min(out[-30:], key=lambda r: r["total_cost"] or 1)["session_id"] = "sess-one"
    write_log(path, out)
    return out


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"Chromium is needed for the dashboard's browser test and {path} is missing: scripts/test.sh installs it (apt-get install chromium)"
        )
    return path


@asynccontextmanager
async def proxy_process(tmp: Path, cfg: dict[str, Any], log: Path) -> AsyncIterator[str]:
    """``python -m proxy`` on 127.0.0.1 with ``cfg`` over ``log``: its base URL."""
    (tmp / "config.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(tmp / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(proxy_command(tmp / "config.yml", port, host=HOST, log_file=log), cwd=tmp, env=env, stdout=err, stderr=err)
    url = f"http://{HOST}:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            if not await wait_serving(s, f"{url}/health", exited=lambda: proc.poll() is not None, timeout=30):
                raise AssertionError(f"the proxy did not start: {(tmp / 'stderr.txt').read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def chromium_browser() -> AsyncIterator[Browser]:
    path = chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Watched:
    """A browser context whose every request URL, first responses and console errors are kept."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.first: dict[str, Any] = {}  # path -> its first response
        context.on("request", lambda r: self.urls.append(r.url))
        context.on("response", lambda r: self.first.setdefault(urlsplit(r.url).path, r))
        context.on("page", self._watch)

    def _watch(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def query_of(self, path: str) -> list[tuple[str, str]]:
        """The query of the page's last request to ``path``."""
        [*_, last] = [u for u in self.urls if urlsplit(u).path == path]
        return parse_qsl(urlsplit(last).query)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not ALLOWED_CONSOLE.search(e)]


# --------------------------------------------------------------------------- reading the page


async def cards(page: Page) -> dict[str, tuple[str, str]]:
    """card -> (its text, its data-value)"""
    rows = await page.eval_on_selector_all("[data-card]", "(ns) => ns.map((n) => [n.dataset.card, n.textContent, n.dataset.value])")
    return {name: (text, value) for name, text, value in rows}


async def charts(page: Page) -> dict[str, tuple[int, int, str]]:
    """chart -> (data-points, marks drawn, its text)"""
    rows = await page.eval_on_selector_all(
        "[data-chart]", "(ns) => ns.map((n) => [n.dataset.chart, n.dataset.points, n.querySelectorAll('.mark').length, n.textContent])"
    )
    return {name: (int(points), marks, text) for name, points, marks, text in rows}


async def table(page: Page, name: str) -> list[list[str]]:
    """The rows of a table as cell texts, the row header first."""
    return await page.eval_on_selector_all(
        f'[data-table="{name}"] tbody tr', "(rs) => rs.map((r) => [...r.children].map((c) => c.textContent.trim()))"
    )


def agrees(text: str, value: Decimal) -> bool:
    """A card's text ("$9.7947", "2,074", "97.5%", "$0.00472261") is ``value`` rounded to the
    places it shows."""
    m = re.fullmatch(r"\$?(-?[\d,]+(?:\.(\d+))?)(%?)", text)
    assert m, text
    shown, places = Decimal(m[1].replace(",", "")), len(m[2] or "")
    if m[3]:
        shown, places = shown / 100, places + 2
    return abs(shown - value) <= Decimal(5).scaleb(-places - 1) + Decimal("1e-12")


def cost_class(v: Decimal) -> str:
    return "cost-high" if v > Decimal("0.10") else "cost-mid" if v >= Decimal("0.01") else "cost-low"


async def get(http: aiohttp.ClientSession, url: str, path: str, params: list[tuple[str, str]], key: str | None = None) -> Any:
    a: Answer = await api_get(http, url, path, params, key)  # numbers parsed as Decimal
    return get_ok(a)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- the dashboard, no auth


async def test_dashboard_shows_the_apis_numbers(tmp_path: Path, mock, http: aiohttp.ClientSession) -> None:
    install_upstream(mock)
    now = time.time()
    log = tmp_path / "cost.jsonl"
    recs = synthetic_log(log, now)
    cfg = make_config(mock.url)
    # A session budget never resets: nine tenths of sess-05's whole spend is used, amber.
    session = sum((Decimal(str(r["total_cost"] or 0)) for r in recs if r.get("session_id") == "sess-05"), Decimal(0))
    cfg["budgets"] = {
        "limits": [
            {"scope": "global", "period": "monthly", "usd": 1000},
            {"scope": "session", "match": "sess-05", "usd": str(round(session / Decimal("0.9"), 6))},
        ]
    }
    async with proxy_process(tmp_path, cfg, log) as url, chromium_browser() as browser:
        w = Watched(await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True))
        page = await w.context.new_page()

        # -- first load: every card is the API's answer for the query the page sent
        for _ in range(3):
            t0 = time.time()
            await page.goto(f"{url}/dashboard")
            await page.wait_for_function(ALL_RENDERED, timeout=20000)
            q = w.query_of("/api/analytics/usage")
            answers = {
                "usage": await get(http, url, "/api/analytics/usage", q),
                "costs": await get(http, url, "/api/analytics/costs", w.query_of("/api/analytics/costs")),
            }
            shown = await cards(page)
            if int(t0 // CACHE_PERIOD) == int(time.time() // CACHE_PERIOD):
                break
        assert set(parse_qsl(urlsplit(page.url).query)) <= set(q), (page.url, q)
        assert dict(q).get("days") == "7" and "interval" not in dict(q)  # the default view: the last 7 days, per day
        for name, (endpoint, field) in CARD_FIELDS.items():
            text, value = shown[name]
            want = answers[endpoint][field]
            assert want is not None and Decimal(value) == Decimal(want), (name, value, want)
            assert agrees(text, Decimal(value)), (name, text, value)
        assert shown["requests"][0].replace(",", "") == str(answers["usage"]["requests"])
        today = answers["costs"]["compare"]["today"]["total_cost"]
        assert Decimal(shown["today_vs_yesterday"][1]) == today and agrees(shown["today_vs_yesterday"][0], today)
        usage = answers["usage"]
        start, end = period_bounds(usage)
        assert usage["requests"] == len(in_window(recs, start, end)) > 1000

        # -- charts: the marks the answers imply
        latency = await get(http, url, "/api/analytics/latency", w.query_of("/api/analytics/latency"))
        drawn = await charts(page)
        n_models = len(usage["by_model"])
        assert n_models == 14
        fresh = usage["input_tokens"] - usage["cache_read_tokens"] - usage["cache_write_tokens"]
        want_points = {
            "cost_over_time": len(usage["daily"]),
            "cost_by_model": min(n_models, 12),
            "tokens": sum(1 for v in (fresh, usage["output_tokens"], usage["cache_read_tokens"], usage["cache_write_tokens"]) if v),
            "requests_per_day": len(usage["daily"]),
            "latency": sum(1 for p in latency["by_provider"] for v in p["latency_ms"].values() if v is not None),
        }
        assert {k: v[0] for k, v in drawn.items()} == want_points
        assert all(points == marks for points, marks, _ in drawn.values()), drawn
        assert f"{n_models - 11} other models" in drawn["cost_by_model"][2]
        assert len(usage["daily"]) == 8 and want_points["latency"] == 8  # 7 x 24 h touch 8 days; 4 providers

        # -- tables
        users_q = w.query_of("/api/analytics/users")
        users = await get(http, url, "/api/analytics/users", users_q)
        every_user = await get(http, url, "/api/analytics/users", [*[(k, v) for k, v in users_q if k != "limit"], ("limit", "1000")])
        limit = int(dict(users_q)["limit"])
        rows = await table(page, "users")
        assert len(rows) == int(await page.get_attribute('[data-table="users"]', "data-rows") or -1) == min(len(every_user["users"]), limit)
        assert len(every_user["users"]) > limit
        assert [r[0] for r in rows] == [u["user"] for u in users["users"]]
        expensive = await get(http, url, "/api/analytics/expensive-requests", w.query_of("/api/analytics/expensive-requests"))
        chips = [
            Decimal(v)
            for v in await page.eval_on_selector_all('[data-table="expensive_requests"] .cost', "(ns) => ns.map((n) => n.dataset.value)")
        ]
        assert chips == sorted(chips, reverse=True) == [r["total_cost"] for r in expensive["requests"]] and len(chips) == 10
        sessions = await get(http, url, "/api/analytics/sessions", w.query_of("/api/analytics/sessions"))
        assert [r[0] for r in await table(page, "sessions")] == [s["session"] for s in sessions["sessions"]] and sessions["sessions"]
        every_chip = await page.eval_on_selector_all(".cost", "(ns) => ns.map((n) => [n.dataset.value, n.className])")
        classes = {cost_class(Decimal(v)) for v, _ in every_chip}
        assert all(cls.split() == ["cost", cost_class(Decimal(v))] for v, cls in every_chip), every_chip
        assert classes == {"cost-low", "cost-mid", "cost-high"}, classes
        budgets = await get(http, url, "/api/budgets", [])
        budget_rows = await page.eval_on_selector_all('[data-table="budgets"] tbody tr', "(rs) => rs.map((r) => r.className)")
        colour = {"ok": "budget-ok", "warning": "budget-warn", "exceeded": "budget-over"}
        assert budget_rows == [colour[b["status"]] for b in budgets["budgets"]]
        assert sorted(budget_rows) == ["budget-ok", "budget-warn"], budgets

        # -- sorting from the keyboard: a header button, Enter, and Enter again
        button = page.locator('[data-table="users"] th[scope=col] > button.sort[data-key="requests"]')
        await button.focus()
        for direction in ("descending", "ascending"):
            await page.keyboard.press("Enter")
            th = page.locator('[data-table="users"] th[scope=col]:has(> button.sort[data-key="requests"])')
            assert await th.get_attribute("aria-sort") == direction
            order = sorted(users["users"], key=lambda u: u["requests"], reverse=direction == "descending")
            assert [r[0] for r in await table(page, "users")] == [u["user"] for u in order]
            assert await page.evaluate("() => document.activeElement.dataset.key") == "requests"
        assert [u["user"] for u in order] != [u["user"] for u in users["users"]]  # the sort did reorder

        # -- live: a call through the proxy shows without a reload
        assert await page.get_attribute("#live", "data-state") == "live"
        before = await cards(page)
        assert await make_call(url, Call("openai", "gpt-4o", inp=2000, out=300, user="carol", session="sess-live")) == 200
        await page.wait_for_function(
            "(n) => document.querySelector('[data-card=requests]').dataset.value === String(n)", arg=usage["requests"] + 1, timeout=10000
        )
        [*_, live] = read_log(log)
        assert live["model"] == "gpt-4o" and live["total_cost"] > 0
        assert Decimal((await cards(page))["total_cost"][1]) == Decimal(before["total_cost"][1]) + live["total_cost"]

        # -- a provider filter: in the URL, in the numbers, and back after a reload
        await page.select_option("#f-provider", "anthropic")
        await page.wait_for_url(re.compile(r"[?&]provider=anthropic(&|$)"))
        total_before = (await cards(page))["total_cost"][1]
        await page.wait_for_function("(v) => document.querySelector('[data-card=total_cost]').dataset.value !== v", arg=total_before)
        filters = parse_qsl(urlsplit(page.url).query)
        assert ("provider", "anthropic") in filters
        filtered = await get(http, url, "/api/analytics/usage", filters)
        value = (await cards(page))["total_cost"][1]
        assert Decimal(value) == filtered["total_cost"] != Decimal(total_before)
        assert filtered["requests"] == len([r for r in in_window(read_log(log), *period_bounds(filtered)) if r["provider"] == "anthropic"])
        await page.reload()
        await page.wait_for_function(ALL_RENDERED, timeout=20000)
        assert await page.input_value("#f-provider") == "anthropic"
        assert Decimal((await cards(page))["total_cost"][1]) == filtered["total_cost"]

        # -- CSV export: one row per record of the window under the current filters
        async with page.expect_download() as dl:
            await page.click("#export-csv")
        download = await dl.value
        text = Path(await download.path()).read_text()
        after = await get(http, url, "/api/analytics/usage", filters)
        in_view = [r for r in in_window(read_log(log), *period_bounds(after)) if r["provider"] == "anthropic"]
        assert len(list(csv.reader(io.StringIO(text)))) - 1 == len(in_view) == after["requests"]
        assert download.suggested_filename.endswith(".csv")

        # -- a screenshot (into tmp_path, not the repo)
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000

        # -- a phone: no sideways scrolling
        phone = Watched(await browser.new_context(viewport={"width": 390, "height": 844}))
        small = await phone.context.new_page()
        await small.goto(f"{url}/dashboard")
        await small.wait_for_function(ALL_RENDERED, timeout=20000)
        width, inner = await small.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
        assert width <= inner + 1, (width, inner)
        # A bad view in the URL: the API's 400, named once in the banner.
        await small.goto(f"{url}/dashboard?days=0")
        await small.wait_for_selector("#error-banner", state="visible")
        bad = await api_get(http, url, "/api/analytics/usage", [("days", "0")])
        assert bad.status == 400 and bad.json["error"]["param"] == "days"
        banner = await small.inner_text("#error-text")
        assert banner.count(bad.json["error"]["message"]) == 1 and banner.startswith("Usage, Costs"), banner
        await small.click("#error-close")
        assert await small.is_hidden("#error-banner")
        # The view is in the URL: the last 24 hours, drawn per hour.
        await small.goto(f"{url}/dashboard?days=1")
        await small.wait_for_function(ALL_RENDERED, timeout=20000)
        hourly_q = phone.query_of("/api/analytics/usage")
        assert ("interval", "hour") in hourly_q and await small.input_value("#f-range") == "1"
        hourly = await get(http, url, "/api/analytics/usage", hourly_q)
        assert (await charts(small))["cost_over_time"][:2] == (len(hourly["hourly"]),) * 2 and len(hourly["hourly"]) >= 24

        # -- the first load's weight, and nothing asked of any other host
        first = [w.first[p] for p in ("/dashboard", "/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js")]
        sizes = [await r.request.sizes() for r in first]
        weight = sum(s["responseBodySize"] + s["responseHeadersSize"] for s in sizes)
        assert all(r.status == 200 for r in first) and 0 < weight < 300_000, weight
        for seen in (w, phone):
            away = [u for u in seen.urls if not u.startswith("data:") and urlsplit(u.removeprefix("blob:")).hostname != HOST]
            assert not away, away
            assert not seen.unexpected_errors(), seen.errors


# --------------------------------------------------------------------------- keys and roles


def create_key(config: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "--config", str(config), "create", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    [key] = [w for w in p.stdout.split() if w.startswith("lcp-")]
    return key


async def sign_in(page: Page, key: str) -> None:
    await page.fill("#key-input", key)
    await page.click("#key-submit")


async def test_dashboard_with_keys_shows_each_role_its_own(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    now = time.time()
    log = tmp_path / "cost.jsonl"
    recs = synthetic_log(log, now)
    upstream = f"http://{HOST}:{free_port()}"  # no call is made: nothing listens there
    cfg: dict[str, Any] = {
        "providers": {
            "openai": {"base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
            "anthropic": {"base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
            "gemini": {"base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
        },
        "catalog": {"enabled": False},
        "auth": {"keys_file": "keys.yml"},
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    alice = create_key(tmp_path / "config.yml", "--user", "alice")
    admin = create_key(tmp_path / "config.yml", "--user", "ops", "--admin")
    async with proxy_process(tmp_path, cfg, log) as url, chromium_browser() as browser:
        w = Watched(await browser.new_context(viewport={"width": 1280, "height": 900}))
        page = await w.context.new_page()
        await page.goto(f"{url}/dashboard")
        await page.wait_for_selector("#login", state="visible")
        assert await page.is_hidden("#dashboard")

        await sign_in(page, "lcp-not-a-key")
        await page.wait_for_selector("#key-error", state="visible")
        assert "not accepted" in await page.inner_text("#key-error")

        # A user's key: only her numbers, no users panel, no user filter.
        await sign_in(page, alice)
        await page.wait_for_function(ALL_RENDERED, timeout=20000)
        own = await get(http, url, "/api/analytics/usage", w.query_of("/api/analytics/usage"), key=alice)
        hers = [r for r in in_window(recs, *period_bounds(own)) if r["user_id"] == "alice"]
        shown = await cards(page)
        assert int(shown["requests"][1]) == own["requests"] == len(hers) > 0
        assert Decimal(shown["total_cost"][1]) == own["total_cost"]
        assert await page.is_hidden("#panel-users") and await page.is_hidden("#f-user-field")
        assert "alice" in await page.inner_text("#scope")
        assert await page.evaluate("() => sessionStorage.getItem('llm-cost-proxy.key')") == alice

        # Signed out, then an admin key: everyone's numbers and the users panel.
        await page.click("#sign-out")
        await page.wait_for_selector("#login", state="visible")
        assert await page.evaluate("() => sessionStorage.getItem('llm-cost-proxy.key')") is None
        await sign_in(page, admin)
        await page.wait_for_function(ALL_RENDERED, timeout=20000)
        everyone = await get(http, url, "/api/analytics/usage", w.query_of("/api/analytics/usage"), key=admin)
        await page.wait_for_function(
            "(n) => document.querySelector('[data-card=requests]').dataset.value === String(n)", arg=everyone["requests"]
        )
        assert everyone["requests"] == len(in_window(recs, *period_bounds(everyone))) > len(hers)
        assert await page.is_visible("#panel-users") and await page.is_visible("#f-user-field")
        assert int(await page.get_attribute('[data-table="users"]', "data-rows") or 0) > 1
        away = [u for u in w.urls if urlsplit(u).hostname != HOST]
        assert not away, away
        assert not w.unexpected_errors(), w.errors
