"""Who may see what through the analytics API (docs/api.md#access): with `auth:` an admin key
sees everyone's numbers and a user's key only its own user's, no key or a bad one is a
401 and no key ever shows up in an answer or the log; without `auth:` the API and the
dashboard are served only on a loopback address (or with dashboard.public), and a
provider may not take the API's own path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.cli.keys import keys_main
from proxy.config import load_config, parse_config
from proxy.errors import ConfigError
from proxy.keys import key_hash, new_key
from proxy.web.app import create_app
from tests.support import ROOT
from tests.support.api import Answer, Call, api_get, get_ok, install_upstream, make_calls, sums
from tests.support.config import ANTHROPIC_MODELS, GEMINI_MODELS, OPENAI_MODELS, PROXY_ANTHROPIC_KEY, PROXY_GEMINI_KEY, PROXY_OPENAI_KEY

GETS = [
    "/api/whoami",
    "/api/budgets",
    "/api/events",
    "/api/analytics/usage",
    "/api/analytics/costs",
    "/api/analytics/provider/openai",
    "/api/analytics/latency",
    "/api/analytics/expensive-requests",
    "/api/analytics/users",
    "/api/analytics/users/alice",
    "/api/analytics/sessions",
    "/api/analytics/export",
]
# The endpoints whose numbers a user's key must see narrowed to its user.
NUMBERS = [
    ("/api/analytics/usage", {"interval": "hour", "days": "2"}),
    ("/api/analytics/costs", {}),
    ("/api/analytics/provider/openai", {}),
    ("/api/analytics/latency", {}),
    ("/api/analytics/expensive-requests", {"limit": "100"}),
    ("/api/analytics/sessions", {"sort": "cost"}),
    ("/api/analytics/users/alice", {}),
]
CALLS = [
    Call("openai", "gpt-4o", inp=1200, out=80, session="a1", feature="search"),
    Call("openai", "gpt-4o", stream=True, inp=3000, out=150, cached=1024, session="a1"),
    Call("anthropic", "claude-sonnet-4-5", inp=12050, out=400, cached=10000, write=2000, session="a2"),
    Call("gemini", "gemini-2.5-flash", stream=True, inp=800, out=60),
    Call("openai", "gpt-4o", status=429),
]
BOB_CALLS = [
    Call("anthropic", "claude-haiku-4-5", inp=300, out=40, session="b1"),
    Call("gemini", "gemini-2.5-flash", inp=12000, out=1000, cached=10000, session="b1"),
    Call("anthropic", "claude-haiku-4-5", status=500),
]
CONFIG_ADMIN = new_key()  # an admin key given in config.yml as its hash


class Keys:
    """A config.yml with `auth:` and budgets in a temp dir; keys made by the keys command."""

    def __init__(self, tmp: Path, upstream: str) -> None:
        self.config_path, self.log = tmp / "config.yml", tmp / "cost.jsonl"
        cfg = {
            "providers": {
                "openai": {"base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
                "anthropic": {"base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
                "gemini": {"base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
            },
            "catalog": {"enabled": False},
            "auth": {"keys_file": "keys.yml", "admin_keys": [f"sha256:{key_hash(CONFIG_ADMIN)}"]},
            "budgets": {
                "limits": [
                    {"scope": "global", "period": "monthly", "usd": 100},
                    {"scope": "user", "match": "alice", "period": "daily", "usd": 10},
                    {"scope": "user", "match": "bob", "period": "daily", "usd": 10},
                    {"scope": "team", "match": "research", "period": "weekly", "usd": 50},
                ]
            },
        }
        self.config_path.write_text(yaml.safe_dump(cfg))

    def create(self, *args: str, subprocess_run: bool = False) -> tuple[str, str]:
        """(key, key id), by `python -m proxy keys create` (in this process unless asked)."""
        argv = ["--config", str(self.config_path), "create", *args]
        if subprocess_run:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "COST_TRACKING_FILE": str(self.log)}
            p = subprocess.run([sys.executable, "-m", "proxy", "keys", *argv], capture_output=True, text=True, env=env, timeout=60)
            assert p.returncode == 0, p.stderr
            out = p.stdout
        else:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert keys_main(argv) == 0
            out = buf.getvalue()
        [key] = [w for w in out.split() if w.startswith("lcp-")]
        return key, hashlib.sha256(key.encode()).hexdigest()[:12]

    def revoke(self, kid: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert keys_main(["--config", str(self.config_path), "revoke", kid]) == 0


@pytest.fixture
async def authed(tmp_path, mock, start_proxy) -> dict[str, Any]:
    """The proxy with auth:, alice's and bob's calls made with their own keys."""
    install_upstream(mock)
    keys = Keys(tmp_path, mock.url)
    alice, alice_id = keys.create("--user", "alice", "--team", "research", "--budget-monthly", "20", subprocess_run=True)
    bob, _ = keys.create("--user", "bob")
    admin, _ = keys.create("--user", "ops", "--admin")
    service, _ = keys.create("--team", "infra")  # a key without a user
    revoked, revoked_id = keys.create("--user", "mallory")
    keys.revoke(revoked_id)
    proxy = await start_proxy(load_config(keys.config_path), keys.log)
    assert await make_calls(proxy.url, CALLS, alice) == [c.status for c in CALLS]
    assert await make_calls(proxy.url, BOB_CALLS, bob) == [c.status for c in BOB_CALLS]
    await proxy.wait_raw_log(len(CALLS) + len(BOB_CALLS))
    return dict(
        url=proxy.url,
        log=keys.log,
        alice=alice,
        alice_id=alice_id,
        bob=bob,
        admin=admin,
        config_admin=CONFIG_ADMIN,
        service=service,
        revoked=revoked,
    )


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in log.read_text().splitlines()]


def timeless(doc: Any) -> Any:
    """An answer without the times that move with each request's "now"."""
    if isinstance(doc, dict):
        return {k: timeless(v) for k, v in doc.items() if k not in ("period", "start", "end", "projection", "projected_monthly_cost")}
    if isinstance(doc, list):
        return [timeless(v) for v in doc]
    return doc


async def test_without_a_valid_key_every_api_endpoint_is_401(authed, http):
    url = authed["url"]
    for key in (None, "lcp-" + "A" * 43, authed["revoked"], "not-even-a-key"):
        for path in GETS:
            a = await api_get(http, url, path, key=key)
            assert a.status == 401, (path, key, a)
            assert a.json["error"]["type"] == "authentication_error" and a.json["error"]["param"] is None
            assert "proxy key" in a.json["error"]["message"]
            assert not key or key not in a.text  # a key sent is never echoed back
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with http.post(f"{url}/api/usage", json={"model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}, headers=headers) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
    # x-api-key is read as well as Authorization (a bad one is still a 401).
    async with http.get(f"{url}/api/whoami", headers={"x-api-key": "lcp-" + "B" * 43}) as r:
        assert r.status == 401
    # Nothing was recorded for the refused POSTs: the log holds the calls only.
    assert len(records(authed["log"])) == len(CALLS) + len(BOB_CALLS)
    # The OpenAPI document (no numbers in it) is the one /api/ path open without a key.
    doc = await api_get(http, url, "/api/openapi.json")
    assert doc.status == 200 and doc.json["openapi"].startswith("3.1")


async def test_admin_sees_everyone_a_user_only_their_own(authed, http):
    url, alice, bob = authed["url"], authed["alice"], authed["bob"]
    texts: list[str] = []

    async def get(path: str, params: Any = (), key: str | None = None) -> Answer:
        a = await api_get(http, url, path, params, key)
        texts.append(a.text)
        return a

    recs = records(authed["log"])
    mine = [r for r in recs if r["user_id"] == "alice"]
    assert len(mine) == len(CALLS) and {r["team"] for r in mine} == {"research"}
    assert {r["user_id"] for r in recs} == {"alice", "bob"}
    for admin in (authed["admin"], authed["config_admin"]):
        assert get_ok(await get("/api/whoami", key=admin)) == {"role": "admin", "user": None, "auth": True}
        usage = get_ok(await get("/api/analytics/usage", key=admin))
        assert {k: usage[k] for k in ("requests", "errors", "total_tokens", "total_cost")} == {
            k: sums(recs)[k] for k in ("requests", "errors", "total_tokens", "total_cost")
        }
        users = get_ok(await get("/api/analytics/users", key=admin))
        assert {u["user"] for u in users["users"]} == {"alice", "bob"}
    assert get_ok(await get("/api/whoami", key=alice)) == {"role": "user", "user": "alice", "auth": True}
    usage = get_ok(await get("/api/analytics/usage", key=alice))
    assert usage["filters"] == {"user": ["alice"]}
    assert {k: usage[k] for k in ("requests", "errors", "input_tokens", "total_tokens", "total_cost")} == {
        k: sums(mine)[k] for k in ("requests", "errors", "input_tokens", "total_tokens", "total_cost")
    }
    # Every endpoint's numbers as alice's key sees them are the admin's for user=alice.
    for path, params in NUMBERS:
        own = get_ok(await get(path, params, key=alice))
        as_admin = get_ok(await get(path, {**params, "user": "alice"}, key=authed["admin"]))
        assert timeless(own) == timeless(as_admin), path
    expensive = get_ok(await get("/api/analytics/expensive-requests", {"limit": "100"}, key=alice))
    assert expensive["requests"] and {r["user_id"] for r in expensive["requests"]} == {"alice"}
    users = get_ok(await get("/api/analytics/users", key=alice))
    assert [u["user"] for u in users["users"]] == ["alice"] and users["active_users"] == 1
    assert users["total_cost"] == sums(mine)["total_cost"]
    async with http.get(f"{url}/api/analytics/export", params={"format": "jsonl"}, headers={"x-api-key": alice}) as r:
        lines = (await r.text()).splitlines()
    assert r.status == 200 and [json.loads(x)["record_id"] for x in lines] == [m["record_id"] for m in mine]
    # Another user's numbers: refused, in the path (403) and in the parameter (400).
    other = await get("/api/analytics/users/bob", key=alice)
    assert other.status == 403 and other.json["error"]["type"] == "permission_error"
    for params in ({"user": "bob"}, [("user", "alice"), ("user", "bob")]):
        a = await get("/api/analytics/usage", params, key=alice)
        assert a.status in (400, 403) and a.json["error"]["param"] == "user", a
    assert get_ok(await get("/api/analytics/usage", {"user": "alice"}, key=alice))["requests"] == len(mine)
    # Budgets: only alice's own (her user limit and her key's monthly budget), spent as the log says.
    theirs = get_ok(await get("/api/budgets", key=alice))["budgets"]
    assert {(b["scope"], b["value"]) for b in theirs} == {("user", "alice"), ("key", authed["alice_id"])}
    assert all(b["spent"] == sums(mine)["total_cost"] for b in theirs)
    everyone = get_ok(await get("/api/budgets", key=authed["admin"]))["budgets"]
    field = {"global": None, "user": "user_id", "team": "team", "key": "key_id"}
    assert {(b["scope"], b["value"]) for b in everyone} == {
        ("global", "*"),
        ("user", "alice"),
        ("user", "bob"),
        ("team", "research"),
        ("key", authed["alice_id"]),
    }
    for b in everyone:
        f = field[b["scope"]]
        assert b["spent"] == sums(r for r in recs if f is None or r[f] == b["value"])["total_cost"], b
        assert b["reserved"] == 0 and b["remaining"] == b["limit"] - b["spent"]
    # Recording usage is for admins.
    body = {"model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}
    async with http.post(f"{url}/api/usage", json=body, headers={"Authorization": f"Bearer {alice}"}) as r:
        assert r.status == 403 and (await r.json())["error"]["type"] == "permission_error"
    async with http.post(f"{url}/api/usage", json={**body, "user": "carol"}, headers={"Authorization": f"Bearer {authed['admin']}"}) as r:
        assert r.status == 201
        texts.append(await r.text())
    # A key with no user sees nothing (it has no "own" numbers).
    a = await get("/api/analytics/usage", key=authed["service"])
    assert a.status == 403 and a.json["error"]["type"] == "permission_error"
    # Bob's view holds nothing of alice's.
    bob_usage = get_ok(await get("/api/analytics/usage", key=bob))
    assert bob_usage["requests"] == len(BOB_CALLS) and bob_usage["filters"] == {"user": ["bob"]}
    # No key, proxy or provider, in any answer or in the log.
    log = authed["log"].read_text()
    for secret in (
        alice,
        bob,
        authed["admin"],
        authed["config_admin"],
        authed["service"],
        PROXY_OPENAI_KEY,
        PROXY_ANTHROPIC_KEY,
        PROXY_GEMINI_KEY,
    ):
        assert all(secret not in t and secret[4:] not in t for t in texts), secret[:8]
        assert secret not in log and secret[4:] not in log, secret[:8]


# --- without auth: loopback only ----------------------------------------------------------------


def plain_config(**dashboard: bool) -> Any:
    cfg: dict[str, Any] = {"providers": {"openai": {"base_url": "http://127.0.0.1:9"}}, "catalog": {"enabled": False}}
    if dashboard:
        cfg["dashboard"] = dashboard
    return parse_config(cfg, "config.yml")


@pytest.mark.parametrize(
    "host,dashboard,served,why",
    [
        ("0.0.0.0", {}, False, "listens on 0.0.0.0 without auth"),
        ("::", {}, False, "listens on :: without auth"),
        ("0.0.0.0", {"public": True}, True, None),
        ("127.0.0.1", {}, True, None),
        ("::1", {}, True, None),
        ("127.0.0.1", {"enabled": False}, False, "dashboard.enabled is false"),
    ],
)
async def test_without_auth_the_api_is_served_on_loopback_only(tmp_path, caplog, host, dashboard, served, why):
    caplog.set_level(logging.WARNING, logger="proxy")
    app = create_app(plain_config(**dashboard), tmp_path / "cost.jsonl", host=host, console=False)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "analytics API and dashboard off" in r.getMessage()]
    async with TestClient(TestServer(app)) as client:  # the test server itself listens on 127.0.0.1
        for path in ("/api/whoami", "/api/analytics/usage", "/api/budgets", "/dashboard", "/dashboard/static/dashboard.js"):
            r = await client.get(path)
            if served:
                assert r.status == 200, (path, await r.text())
            else:
                body = await r.json()
                assert r.status == 404 and body["error"]["type"] == "not_found_error", path
                assert why in body["error"]["message"] and "off" in body["error"]["message"], body
        if served:
            assert (await (await client.get("/api/whoami")).json()) == {"role": "local", "user": None, "auth": False}
            page = await client.get("/dashboard")
            assert page.headers["Content-Type"].startswith("text/html")
        # The proxy itself works either way.
        assert (await client.get("/health")).status == 200
    if served or not dashboard.get("enabled", True):
        assert not warned  # turned off on purpose: nothing to warn about
    else:
        [w] = warned
        assert why in w.getMessage() and "auth" in w.getMessage() and "dashboard.public" in w.getMessage()


async def test_serve_on_port_0_answers_whoami_local(tmp_path, http):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({"providers": {"openai": {"base_url": "http://127.0.0.1:9"}}, "catalog": {"enabled": False}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-file",
        str(tmp_path / "cost.jsonl"),
        cwd=str(ROOT),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "serve exited before its banner"
            m = re.search(r"llm-cost-proxy on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port
        a = await api_get(http, f"http://127.0.0.1:{port}", "/api/whoami")
        assert get_ok(a) == {"role": "local", "user": None, "auth": False}
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def test_a_provider_may_not_take_the_apis_path(tmp_path):
    for name in ("api", "dashboard"):
        spec = {"providers": {name: {"type": "openai", "base_url": "http://127.0.0.1:9"}}}
        with pytest.raises(ConfigError) as e:
            parse_config(spec, str(tmp_path / "config.yml"))
        assert e.value.key == f"providers.{name}" and f"/{name}" in e.value.reason
    # The command line says it in one line, naming the key path, and starts nothing.
    (tmp_path / "config.yml").write_text(yaml.safe_dump(spec))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(tmp_path / "config.yml"),
            "--port",
            "0",
            "--log-file",
            str(tmp_path / "cost.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 2 and f"providers.{name}" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "cost.jsonl").exists()


async def test_a_call_record_is_shown_to_an_admin_and_its_own_user_only(authed, http):
    """GET /api/calls/{id}: an admin reads anyone's record, a user's key only its own
    user's (another user's is a 404, as if it did not exist), no key a 401."""
    url, recs = authed["url"], records(authed["log"])
    alice_rec = next(r for r in recs if r["user_id"] == "alice")
    bob_rec = next(r for r in recs if r["user_id"] == "bob")
    for rec in (alice_rec, bob_rec):
        a = await api_get(http, url, f"/api/calls/{rec['record_id']}", key=authed["admin"])
        assert json.loads(a.text, parse_float=Decimal)["record"] == rec
    mine = await api_get(http, url, f"/api/calls/{alice_rec['record_id']}", key=authed["alice"])
    assert json.loads(mine.text, parse_float=Decimal)["record"] == alice_rec
    theirs = await api_get(http, url, f"/api/calls/{bob_rec['record_id']}", key=authed["alice"])
    assert theirs.status == 404 and bob_rec["record_id"] in theirs.json["error"]["message"]
    assert "bob" not in theirs.text
    anonymous = await api_get(http, url, f"/api/calls/{alice_rec['record_id']}")
    assert anonymous.status == 401
