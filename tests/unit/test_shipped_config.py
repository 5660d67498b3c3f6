"""The repository's own config.yml, loaded as the proxy loads it, and forward-only mode.

Expected prices are computed here from the YAML text itself (the rates as written,
Anthropic's documented cache multiples where a rate is left out), never read back
from the price book under test.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import Config, load_config, pricebook_for
from proxy.core.usage import Usage
from proxy.pricing import price_call
from tests.support import ROOT
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply, raw_reply, sse, stream_reply
from tests.support.provider_replies import anthropic_message, gemini_response
from tests.support.records import dec

SHIPPED = ROOT / "config.yml"
RAW = yaml.safe_load(SHIPPED.read_text())
ENV_REFS = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}", SHIPPED.read_text())))
NOW = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)
MILLION = Decimal(1_000_000)
# What a missing cache-read rate means, per family: Anthropic a tenth of input, else input.
CACHED_SHARE = {"anthropic": Decimal("0.1"), "openai": Decimal(1), "gemini": Decimal(1)}


def family(name: str, spec: dict[str, Any]) -> str:
    return spec.get("type", name)


def period_at(pricing: Any, when: datetime) -> dict[str, Any]:
    """The price period in force at ``when``: the first whose ``until`` is still ahead."""
    periods = pricing if isinstance(pricing, list) else [pricing]
    dated = sorted((p for p in periods if p.get("until") is not None), key=lambda p: str(p["until"]))
    for p in dated:
        if when.date().isoformat() < str(p["until"]):
            return p
    [open_ended] = [p for p in periods if p.get("until") is None]
    return open_ended


def rates_for(period: dict[str, Any], input_tokens: int, tier: str | None = None) -> dict[str, Decimal]:
    card = dict(period)
    if tier is not None:
        card = {**card, **period["service_tiers"][tier]}
    for t in sorted(card.get("tiers") or [], key=lambda t: t["above"]):
        if input_tokens > t["above"]:
            card = {**card, **t}
    return {k: Decimal(str(v)) for k, v in card.items() if k in ("input", "output", "cached_input")}


def expected_cost(fam: str, rates: dict[str, Decimal], inp: int, cached: int, out: int) -> Decimal:
    cached_rate = rates.get("cached_input", rates["input"] * CACHED_SHARE[fam])
    return ((inp - cached) * rates["input"] + cached * cached_rate + out * rates["output"]) / MILLION


def priced_models() -> list[tuple[str, str, str]]:
    return [
        (name, family(name, spec), model)
        for name, spec in RAW["providers"].items()
        for model, mspec in (spec.get("models") or {}).items()
        if "pricing" in mspec
    ]


def test_the_shipped_config_lists_every_family() -> None:
    assert {family(n, s) for n, s in RAW["providers"].items()} == {"openai", "anthropic", "gemini"}
    assert len(priced_models()) >= 10 and ENV_REFS  # the provider keys come from the environment


@pytest.mark.parametrize("env", ["unset", "set"])
def test_shipped_config_loads_with_its_environment(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    for var in ENV_REFS:
        if env == "set":
            monkeypatch.setenv(var, f"value-of-{var}")
        else:
            monkeypatch.delenv(var, raising=False)
    cfg = load_config(SHIPPED)
    assert set(cfg.providers) == set(RAW["providers"])
    for name, spec in RAW["providers"].items():
        p = cfg.providers[name]
        assert p.type == family(name, spec) and p.base_url == spec["base_url"].rstrip("/")
        ref = re.fullmatch(r"\$\{(\w+)\}", str(spec.get("api_key", "")))
        if ref is None:
            assert p.api_key == spec.get("api_key")
        else:
            # Unset: no key, so the client's own key passes through (never an empty header).
            assert p.api_key == (f"value-of-{ref.group(1)}" if env == "set" else None)
        assert set(p.models) == {m for m, ms in (spec.get("models") or {}).items() if "pricing" in ms}
    features = RAW.get("features", {}).get("cost_tracking", {})
    assert cfg.cost_tracking is features.get("enabled", True)
    server = RAW.get("server", {})
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.max_body_mb, cfg.shutdown_timeout) == (
        server.get("connect_timeout", 10),
        server.get("read_timeout", 600),
        server.get("max_body_mb", 64),
        server.get("shutdown_timeout", 30),
    )
    assert dict(cfg.aliases) == RAW.get("aliases", {})


@pytest.mark.parametrize("provider,fam,model", priced_models(), ids=lambda x: str(x))
def test_every_shipped_model_prices_a_sample_call(provider: str, fam: str, model: str) -> None:
    cfg = load_config(SHIPPED)
    book = pricebook_for(cfg)
    pricing = RAW["providers"][provider]["models"][model]["pricing"]
    samples = [(10_000, 2_000, 1_000), (300_000, 50_000, 2_000)]  # the second past any long-context tier
    whens = [NOW] + [
        datetime.fromisoformat(f"{p['until']}T00:00:00+00:00").replace(day=1)
        for p in (pricing if isinstance(pricing, list) else [])
        if p.get("until")
    ]
    for when in whens:
        period = period_at(pricing, when)
        for tier in [None, *(period.get("service_tiers") or {})]:
            for inp, cached, out in samples:
                usage = Usage(inp, out, cache_read_tokens=cached)
                got = price_call(
                    book, provider=provider, family=fam, model=model, response_model=None, usage=usage, when=when, service_tier=tier
                )
                assert got.cost is not None and got.price is not None, (provider, model)
                assert got.price.source == "config"
                want = expected_cost(fam, rates_for(period, inp, tier), inp, cached, out)
                assert got.cost.total_cost == want, (provider, model, when, tier, inp)
                assert got.cost.total_cost > 0 or not (Decimal(str(period["input"])) or Decimal(str(period["output"])))


def test_shipped_aliases_price_as_their_targets() -> None:
    cfg = load_config(SHIPPED)
    book = pricebook_for(cfg)
    usage = Usage(10_000, 1_000, cache_read_tokens=2_000)
    for alias, target in RAW.get("aliases", {}).items():
        provider = next(n for n, s in RAW["providers"].items() if target in (s.get("models") or {}))
        fam = family(provider, RAW["providers"][provider])
        via_alias = price_call(book, provider=provider, family=fam, model=alias, response_model=None, usage=usage, when=NOW)
        direct = price_call(book, provider=provider, family=fam, model=target, response_model=None, usage=usage, when=NOW)
        assert via_alias.cost is not None and via_alias.cost == direct.cost, alias


async def test_shipped_config_meters_a_call_per_family(mock, start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped file, its upstreams pointed at the mock: one call per family, priced
    at the YAML's rates."""
    for var in ENV_REFS:
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(SHIPPED)
    cfg = dataclasses.replace(
        cfg, providers={n: dataclasses.replace(p, base_url=mock.url) for n, p in cfg.providers.items()}, catalog=False
    )
    assert isinstance(cfg, Config)
    usage = {"prompt_tokens": 10_000, "completion_tokens": 1_000, "total_tokens": 11_000, "prompt_tokens_details": {"cached_tokens": 2_000}}
    mock.on(
        "/v1/chat/completions",
        json_reply(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": usage,
            }
        ),
    )
    mock.on(
        "/v1/messages",
        json_reply(
            anthropic_message(
                "claude-haiku-4-5-20251001",
                {"input_tokens": 8_000, "cache_read_input_tokens": 2_000, "cache_creation_input_tokens": 0, "output_tokens": 1_000},
            )
        ),
    )
    mock.on(
        "/v1beta/models/gemini-2.5-flash:generateContent",
        json_reply(
            gemini_response(
                usage={
                    "promptTokenCount": 10_000,
                    "cachedContentTokenCount": 2_000,
                    "candidatesTokenCount": 1_000,
                    "totalTokenCount": 11_000,
                }
            )
        ),
    )
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for path, body, headers in (
            (
                "/openai/v1/chat/completions",
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"},
            ),
            (
                "/anthropic/v1/messages",
                {"model": "haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                {"x-api-key": CLIENT_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
            ),
            (
                "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                {"contents": [{"parts": [{"text": "hi"}]}]},
                {"x-goog-api-key": CLIENT_GEMINI_KEY},
            ),
        ):
            async with s.post(proxy.url + path, json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
    records = await proxy.records()
    models = RAW["providers"]
    for rec, (provider, model) in zip(
        records, [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"), ("gemini", "gemini-2.5-flash")]
    ):
        fam = family(provider, models[provider])
        rates = rates_for(period_at(models[provider]["models"][model]["pricing"], NOW), 10_000)
        assert rec["provider"] == provider and rec["pricing_source"] == "config"
        assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"]) == (10_000, 2_000, 1_000)
        assert dec(rec["total_cost"]) == expected_cost(fam, rates, 10_000, 2_000, 1_000), provider
    # The client's key went upstream: the shipped file configures none without its env vars.
    assert mock.requests[0].headers["Authorization"] == f"Bearer {CLIENT_OPENAI_KEY}"


# --- forward-only: cost tracking off ------------------------------------------------------------

ODD_JSON = '{ "id":"c9",  "model":"gpt-4o-2024-08-06", "note":"caf\\u00e9 \u2028", "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n'


async def test_forward_only_mode_relays_byte_for_byte_and_writes_no_log(mock, start_proxy, tmp_path: Path) -> None:
    cfg = make_config(mock.url)
    cfg["features"] = {"cost_tracking": {"enabled": False}}
    mock.on("/v1/chat/completions", raw_reply(ODD_JSON.encode(), content_type="application/json", headers={"x-request-id": "req-77"}))
    events = sse([(None, {"id": "s1", "choices": [{"delta": {"content": "Hi"}}]}), (None, "[DONE]")])
    mock.on("/v1/responses", stream_reply(mock, events))
    mock.on("/v1/messages", raw_reply(b'{"type":"error","error":{"type":"overloaded_error"}}', status=529, content_type="application/json"))
    log = tmp_path / "forward-only.jsonl"
    proxy = await start_proxy(cfg, log)
    sent = [
        b'{"model": "gpt-4o",\n "messages": [{"role":"user","content":"h\\u00e9"}]}',
        b'{"model":"gpt-5","stream":true,"input":"hi"}',  # no stream_options: none may be added
        b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[]}',
    ]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/openai/v1/chat/completions",
            data=sent[0],
            headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200 and await r.read() == ODD_JSON.encode()
            assert r.headers["x-request-id"] == "req-77"
        async with s.post(
            f"{proxy.url}/openai/v1/responses",
            data=sent[1],
            headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200 and await r.read() == b"".join(events)
        async with s.post(
            f"{proxy.url}/anthropic/v1/messages",
            data=sent[2],
            headers={"x-api-key": CLIENT_ANTHROPIC_KEY, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 529 and await r.read() == b'{"type":"error","error":{"type":"overloaded_error"}}'
        async with s.get(f"{proxy.url}/health") as r:
            health = json.loads(await r.read())
    assert [m.body for m in mock.requests] == sent
    assert mock.requests[0].headers["Authorization"] == f"Bearer {CLIENT_OPENAI_KEY}"
    assert health["features"]["cost_tracking"] is False
    assert health["cost_stats_24h"]["requests"] == 0
    await proxy.stop()
    assert not log.exists() and list(tmp_path.glob("*.jsonl*")) == []
