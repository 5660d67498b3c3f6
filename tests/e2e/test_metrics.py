"""GET /metrics (docs/metrics.md): the official SDKs and raw HTTP -> proxy -> mock upstream,
then a scrape parsed with prometheus_client's own parser. Every figure is checked
against the JSONL records the proxy wrote, summed here with Decimal; the label cap, the
access rules and the budget gauges (against /api/budgets) too."""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.config import parse_config
from proxy.core.money import usd_to_units
from proxy.keys import KeyEntry, key_hash, new_key
from proxy.storage.keyfile import save_keys
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY, OPENAI_MODELS, PROXY_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply, sse, stream_reply
from tests.support.provider_replies import FLASH_USAGE, anthropic_message, anthropic_stream_events, gemini_response, openai_chat
from tests.support.records import dec

MSG = [{"role": "user", "content": "hi"}]
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
PRO = "/v1beta/models/gemini-2.5-pro:generateContent"
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}]}
TOKEN_TYPES = {"input": "input_tokens", "output": "output_tokens", "cache_read": "cache_read_tokens"}
TOKEN_TYPES |= {"cache_write": "cache_write_tokens", "reasoning": "reasoning_tokens"}
UNKNOWN_PROVIDER = "(unknown)"


# --- helpers ----------------------------------------------------------------------------


class Scrape:
    """One /metrics answer, parsed by prometheus_client's parser: samples by name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        for f in self.families.values():
            for s in f.samples:
                self.samples[s.name].append(s)

    def total(self, name: str, **match: str) -> float:
        return sum(s.value for s in self.samples[name] if all(s.labels.get(k) == v for k, v in match.items()))

    def by(self, name: str, *labels: str, **match: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for s in self.samples[name]:
            if all(s.labels.get(k) == v for k, v in match.items()):
                out[tuple(s.labels[k] for k in labels)] += s.value
        return dict(out)


async def scrape(url: str, headers: dict[str, str] | None = None, status: int = 200) -> Scrape:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", headers=headers or {}) as r:
            text = await r.text()
            assert r.status == status, text
            if status == 200:
                assert r.headers["Content-Type"].startswith("text/plain; version="), r.headers["Content-Type"]
    return Scrape(text)


async def get_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", headers=headers or {}) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body


def labels_of(rec: dict) -> tuple[str, str]:
    """The (provider, model) a record is counted under: as reports name the model, and
    calls to providers nobody configured under one name, as /health counts them."""
    provider = UNKNOWN_PROVIDER if rec["provider_type"] == "unknown" else rec["provider"]
    return provider, rec["model"] or rec["response_model"] or "(none)"


def close(got: float, want: Decimal) -> bool:
    """A float exposition of an exact decimal sum: equal to float rounding."""
    return abs(Decimal(repr(got)) - want) <= abs(want) * Decimal("1e-9")


def oai(url: str, provider: str = "openai", key: str = CLIENT_OPENAI_KEY, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/{provider}/v1", api_key=key, max_retries=0, **kw)


def routes(mock) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/compat/v1/chat/completions", openai_chat(mock, model="mystery-1"))  # no price: unpriced
    mock.on("/v1/messages", json_reply(anthropic_message()))
    mock.on(GEN, json_reply(gemini_response(usage=FLASH_USAGE)))
    mock.on(PRO, json_reply({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}, status=429))


def stream_routes(mock) -> None:
    """/v1/messages streamed (the SDK's messages.stream) once the buffered calls are done."""
    mock.on("/v1/messages", stream_reply(mock, sse(anthropic_stream_events())))


# --- totals equal the records ---------------------------------------------------------


async def test_metrics_equal_the_records_for_every_family(mock, start_proxy, http):
    routes(mock)
    proxy = await start_proxy(make_config(mock.url))
    async with oai(proxy.url) as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG)
        async for _ in await c.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            pass
        await c.chat.completions.create(model="gpt-5", messages=MSG)
    async with oai(proxy.url, "compat") as c:
        await c.chat.completions.create(model="mystery-1", messages=MSG)
    async with anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as c:
        await c.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=MSG)
        stream_routes(mock)
        async with c.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=MSG) as stream:
            await stream.get_final_message()
    key = {"x-goog-api-key": CLIENT_GEMINI_KEY}
    async with http.post(f"{proxy.url}/gemini{GEN}", json=GEMINI_BODY, headers=key) as r:
        assert r.status == 200
    async with http.post(f"{proxy.url}/gemini{PRO}", json=GEMINI_BODY, headers=key) as r:
        assert r.status == 429
    async with http.post(f"{proxy.url}/nosuch/v1/chat/completions", json={"model": "x"}) as r:
        assert r.status == 404

    records = await proxy.wait_records(9)
    m = await scrape(proxy.url)
    await proxy.stop()
    assert len(records) == 9
    assert {labels_of(r)[0] for r in records} == {"openai", "compat", "anthropic", "gemini", UNKNOWN_PROVIDER}

    # Cost: per (provider, model) and in all, Decimal sums of the records' exact costs.
    want_cost: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in records:
        want_cost[labels_of(r)] += dec(r["total_cost"]) or Decimal(0)
    got_cost = m.by("llm_proxy_cost_usd_total", "provider", "model")
    assert set(got_cost) == set(want_cost)
    assert all(close(got_cost[k], want_cost[k]) for k in want_cost), (got_cost, want_cost)
    assert close(m.total("llm_proxy_cost_usd_total"), sum(want_cost.values(), Decimal(0)))
    assert sum(want_cost.values()) > 0

    # Tokens by type, per series.
    for kind, field in TOKEN_TYPES.items():
        want = Counter()
        for r in records:
            want[labels_of(r)] += r[field] or 0
        got = m.by("llm_proxy_tokens_total", "provider", "model", type=kind)
        assert got == {k: float(v) for k, v in want.items()}, kind
    assert m.total("llm_proxy_tokens_total", type="input") == sum(r["input_tokens"] or 0 for r in records) > 0

    # Requests by status, errors, unpriced and unknown usage.
    want_status = Counter((*labels_of(r), str(r["status"])) for r in records)
    assert m.by("llm_proxy_requests_total", "provider", "model", "status") == {k: float(v) for k, v in want_status.items()}
    assert {k[2] for k in want_status} >= {"200", "429", "404"}
    assert m.total("llm_proxy_errors_total") == sum(1 for r in records if r["error"] or r["status"] >= 400) == 2
    assert m.total("llm_proxy_unpriced_requests_total") == sum(1 for r in records if r["total_cost"] is None and r["total_tokens"]) == 1
    assert m.total("llm_proxy_unknown_usage_requests_total") == sum(1 for r in records if r["total_tokens"] is None)

    # Histograms: one duration per call, a first chunk per stream, token usage per call that used tokens.
    per_series = Counter(labels_of(r) for r in records)
    assert m.by("gen_ai_client_operation_duration_seconds_count", "provider", "model") == {k: float(v) for k, v in per_series.items()}
    assert close(m.total("gen_ai_client_operation_duration_seconds_sum"), sum(dec(r["latency_ms"]) for r in records) / 1000)
    assert m.total("gen_ai_client_operation_duration_seconds_bucket", le="+Inf") == len(records)
    streams = [r for r in records if r["is_streaming"]]
    assert len(streams) == 2
    assert m.total("gen_ai_client_operation_time_to_first_chunk_seconds_count") == len(streams)
    assert close(m.total("gen_ai_client_operation_time_to_first_chunk_seconds_sum"), sum(dec(r["ttft_ms"]) for r in streams) / 1000)
    used = [r for r in records if r["total_tokens"]]
    for kind in ("input", "output"):
        assert m.total("gen_ai_client_token_usage_count", gen_ai_token_type=kind) == len(used) == 7
        assert m.total("gen_ai_client_token_usage_sum", gen_ai_token_type=kind) == sum(r[f"{kind}_tokens"] for r in used)
    # Buckets are cumulative and end with every observation.
    for s in m.samples["gen_ai_client_token_usage_bucket"]:
        assert float(s.labels["le"]) in {float("inf"), *(4.0**i for i in range(14))}
    for name in ("gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage"):
        series = defaultdict(list)
        for s in m.samples[f"{name}_bucket"]:
            series[tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))].append(s.value)
        assert series and all(v == sorted(v) for v in series.values())
    assert "sk-" not in m.text and "AIza" not in m.text  # no key material in any label


# --- the label cap -----------------------------------------------------------------------


async def test_label_cap_counts_later_values_as_other(mock, start_proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    cfg = make_config(mock.url)
    cfg["metrics"] = {"labels": ["user", "tag:project"], "max_label_values": 2}
    cfg["budgets"] = {"limits": [{"scope": "user", "period": "daily", "usd": 100}]}
    proxy = await start_proxy(cfg)
    calls = [("gpt-4o", f"u{i % 5}", f"p{i % 3}") for i in range(6)] + [("gpt-5", "u0", "p0"), ("o4-mini", "u1", "p1")]
    async with oai(proxy.url) as c:
        for model, user, project in calls:
            await c.chat.completions.create(model=model, messages=MSG, extra_headers={"x-user-id": user, "x-project": project})
    records = await proxy.wait_records(len(calls))
    m = await scrape(proxy.url)
    await proxy.stop()

    def admitted(values: list[str], cap: int = 2) -> list[str]:
        return list(dict.fromkeys(values))[:cap]  # the first distinct values, in order of arrival

    users = admitted([r["user_id"] for r in records])
    models = admitted([r["model"] for r in records])
    projects = admitted([r["tags"]["project"] for r in records])
    assert users == ["u0", "u1"] and models == ["gpt-4o", "gpt-5"] and projects == ["p0", "p1"]
    series = m.samples["llm_proxy_cost_usd_total"]
    assert {s.labels["user"] for s in series} == {*users, "other"}
    assert {s.labels["model"] for s in series} == {*models, "other"}
    assert {s.labels["tag_project"] for s in series} == {*projects, "other"}
    assert len(series) <= 3 * 3 * 3  # each capped label: 2 values and "other"

    # Nothing is lost: "other" is counted, the totals are the records'.
    want = Counter()
    for r in records:
        user = r["user_id"] if r["user_id"] in users else "other"
        model = r["model"] if r["model"] in models else "other"
        want[(model, user)] += 1
    assert m.by("llm_proxy_requests_total", "model", "user") == {k: float(v) for k, v in want.items()}
    assert close(m.total("llm_proxy_cost_usd_total"), sum(dec(r["total_cost"]) for r in records))
    overflow = m.by("llm_proxy_label_overflow_total", "label")
    assert overflow[("user",)] == sum(1 for r in records if r["user_id"] not in users) > 0
    assert overflow[("tag_project",)] == sum(1 for r in records if r["tags"]["project"] not in projects) > 0

    # Budgets that apply to each user: the most used max_label_values of them only.
    spent = Counter()
    for r in records:
        spent[r["user_id"]] += dec(r["total_cost"])
    top = sorted(spent, key=lambda u: (-spent[u], u))[:2]
    budgets = m.by("llm_proxy_budget_spent_usd", "budget")
    assert set(budgets) == {(f"user:{u} daily (each user)",) for u in top}


# --- access ------------------------------------------------------------------------------


def _keys(tmp_path: Path) -> tuple[str, str, Path]:
    admin, user = new_key(), new_key()
    path = tmp_path / "keys.yml"
    save_keys(
        path,
        [
            KeyEntry(key_hash(admin)[:12], key_hash(admin), "ops", None, None, None, True),
            KeyEntry(key_hash(user)[:12], key_hash(user), "alice", "research", None, usd_to_units("0.5")),
        ],
    )
    return admin, user, path


def _auth_config(upstream: str, keys_file: Path, metrics: dict | None = None) -> dict:
    # With auth: every provider sends the proxy's own key upstream.
    cfg = make_config(upstream)
    cfg["providers"] = {"openai": {"base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS}}
    cfg["auth"] = {"keys_file": str(keys_file)}
    cfg["budgets"] = {"limits": [{"scope": "global", "period": "monthly", "usd": 10}, {"scope": "user", "period": "daily", "usd": 1}]}
    if metrics is not None:
        cfg["metrics"] = metrics
    return cfg


async def test_access_with_auth_needs_an_admin_key_or_the_scrape_token(mock, start_proxy, tmp_path, monkeypatch):
    admin, user, keys_file = _keys(tmp_path)
    token = "scrape-token-0123456789abcdef"
    monkeypatch.setenv("LCP_TEST_SCRAPE_TOKEN", token)
    proxy = await start_proxy(parse_config(_auth_config(mock.url, keys_file, {"scrape_token_env": "LCP_TEST_SCRAPE_TOKEN"}), "cfg.yml"))

    assert (await scrape(proxy.url, {"Authorization": f"Bearer {admin}"})).families
    assert (await scrape(proxy.url, {"Authorization": f"Bearer {token}"})).families
    for headers in ({}, {"Authorization": f"Bearer {user}"}, {"Authorization": f"Bearer {token}x"}, {"Authorization": token}):
        status, body = await get_status(proxy.url, headers)
        assert status == 401 and body["error"]["type"] == "authentication_error", (headers, body)
        assert "Bearer" in body["error"]["message"]

    # Without a scrape token configured, the token is no way in; the admin key still is.
    second = await start_proxy(_auth_config(mock.url, keys_file))
    assert (await get_status(second.url, {"Authorization": f"Bearer {token}"}))[0] == 401
    assert (await get_status(second.url, {"Authorization": f"Bearer {admin}"}))[0] == 200


async def test_access_without_auth_is_open_unless_a_scrape_token_is_set(mock, start_proxy, monkeypatch):
    open_proxy = await start_proxy(make_config(mock.url))
    assert "llm_proxy_cost_usd" in (await scrape(open_proxy.url)).families
    # Budgets name users: without auth, a request addressed to another name (a page
    # rebinding its own name to 127.0.0.1) is refused, as the analytics API refuses it.
    for headers in ({"Host": "attacker.example"}, {"Origin": "http://attacker.example"}):
        status, body = await get_status(open_proxy.url, headers)
        assert status == 403 and "scrape_token_env" in body["error"]["message"], headers
    public_cfg = make_config(mock.url)
    public_cfg["dashboard"] = {"public": True}
    public = await start_proxy(public_cfg)
    assert (await get_status(public.url, {"Host": "proxy.internal:9002"}))[0] == 200

    monkeypatch.setenv("LCP_TEST_SCRAPE_TOKEN", "another-scrape-token-0123")
    cfg = make_config(mock.url)
    cfg["metrics"] = {"scrape_token_env": "LCP_TEST_SCRAPE_TOKEN"}
    guarded = await start_proxy(parse_config(cfg, "cfg.yml"))
    status, body = await get_status(guarded.url)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert (await get_status(guarded.url, {"Authorization": "Bearer another-scrape-token-0123"}))[0] == 200


async def test_disabled_metrics_have_no_route(mock, start_proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    cfg = make_config(mock.url)
    cfg["metrics"] = {"enabled": False}
    proxy = await start_proxy(cfg)
    async with oai(proxy.url) as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert (await get_status(proxy.url))[0] == 404
    [rec] = await proxy.records()  # calls are recorded as ever
    assert rec["status"] == 200


# --- budget gauges -----------------------------------------------------------------------


async def test_budget_gauges_equal_the_budgets_api(mock, start_proxy, tmp_path):
    mock.on("/v1/chat/completions", openai_chat(mock))
    admin, user, keys_file = _keys(tmp_path)
    proxy = await start_proxy(_auth_config(mock.url, keys_file))
    async with oai(proxy.url, key=user) as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG)
        await c.chat.completions.create(model="gpt-5", messages=MSG)
    records = await proxy.wait_records(2)
    admin_header = {"Authorization": f"Bearer {admin}"}
    m = await scrape(proxy.url, admin_header)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/api/budgets", headers=admin_header) as r:
            assert r.status == 200
            rows = (await r.json())["budgets"]
    await proxy.stop()

    # The global, alice's daily (each user) and her key's monthly budget.
    assert {row["scope"] for row in rows} == {"global", "user", "key"}
    spent = sum(dec(r["total_cost"]) for r in records)
    assert spent > 0
    for row in rows:
        labels = {"budget": row["name"], "scope": row["scope"], "period": row["period"] or "none"}
        for gauge, field in (("spent", "spent"), ("limit", "limit"), ("remaining", "remaining"), ("reserved", "reserved")):
            [sample] = [s for s in m.samples[f"llm_proxy_budget_{gauge}_usd"] if s.labels == labels]
            assert close(sample.value, Decimal(str(row[field]))), (row, gauge, sample)
        assert Decimal(str(row["spent"])) == spent
    assert len(m.samples["llm_proxy_budget_limit_usd"]) == len(rows)
