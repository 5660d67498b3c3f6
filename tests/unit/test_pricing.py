"""Pricing core: config and catalog prices, dates, tiers, variants, name matching.

Expected totals are the test vectors of docs/providers.md §7 (computed with
genai-prices 0.2.3), not figures read back from this code.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import anthropic
import pytest

from proxy.catalog import Catalog
from proxy.config import parse_config, pricebook_for
from proxy.core.usage import Usage
from proxy.errors import ConfigError
from proxy.pricing import PriceBook, name_candidates, parse_model_price, price_call
from tests.support.config import CLIENT_ANTHROPIC_KEY, make_config
from tests.support.mock_upstream import json_reply, sse, stream_reply
from tests.support.provider_replies import anthropic_message, anthropic_stream_events
from tests.support.records import dec

NOW = datetime(2026, 11, 22, tzinfo=timezone.utc)


def book(models: dict, provider: str = "p", family: str = "openai", catalog: bool = False, aliases=None) -> PriceBook:
    cfg = parse_config(
        {
            "catalog": {"enabled": catalog},
            "aliases": aliases or {},
            "providers": {
                provider: {"type": family, "base_url": "http://127.0.0.1:1", "models": {m: {"pricing": p} for m, p in models.items()}}
            },
        }
    )
    return pricebook_for(cfg)


def total(b: PriceBook, model: str, usage: Usage, *, family="openai", provider="p", when=NOW, tier=None, speed=None, response_model=None):
    priced = price_call(
        b,
        provider=provider,
        family=family,
        model=model,
        response_model=response_model,
        usage=usage,
        when=when,
        service_tier=tier,
        speed=speed,
    )
    return None if priced.cost is None else priced.cost.total_cost


GPT4O = {"input": 2.50, "output": 10.00, "cached_input": 1.25}


def test_openai_cached_tokens_priced_at_cached_rate():
    assert total(book({"gpt-4o": GPT4O}), "gpt-4o", Usage(10000, 500, cache_read_tokens=8000)) == Decimal("0.020")


def test_reasoning_tokens_are_not_billed_twice():
    b = book({"gpt-5": {"input": 1.25, "output": 10, "cached_input": 0.125}})
    assert total(b, "gpt-5", Usage(2000, 3000, reasoning_tokens=2500)) == Decimal("0.0325")


def test_anthropic_one_hour_writes_cost_twice_input_and_reads_a_tenth():
    b = book({"claude-sonnet-4-5": {"input": 3, "output": 15}}, family="anthropic")  # multipliers by family rule
    u = Usage(12050, 400, cache_read_tokens=10000, cache_write_tokens=2000, cache_write_1h_tokens=2000)
    assert total(b, "claude-sonnet-4-5-20250929", u, family="anthropic") == Decimal("0.02115")


def test_anthropic_five_minute_writes_and_web_search():
    b = book({"claude-haiku-4-5": {"input": 1, "output": 5, "cache_write": 1.25}}, family="anthropic")
    assert total(b, "claude-haiku-4-5-20251001", Usage(3100, 200, cache_write_tokens=3000), family="anthropic") == Decimal("0.00485")
    b = book({"claude-opus-4-1": {"input": 15, "output": 75, "cached_input": 1.5, "web_search": 10}}, family="anthropic")
    u = Usage(50010, 1000, cache_read_tokens=50000, web_search_requests=2)
    assert total(b, "claude-opus-4-1", u, family="anthropic") == Decimal("0.17015")


def test_long_context_tier_is_a_cliff_on_total_input():
    b = book(
        {
            "gemini-2.5-pro": {
                "input": 1.25,
                "output": 10,
                "cached_input": 0.125,
                "tiers": [{"above": 200000, "input": 2.5, "output": 15, "cached_input": 0.25}],
            }
        },
        family="gemini",
    )
    assert total(b, "gemini-2.5-pro", Usage(250000, 3000, reasoning_tokens=2000), family="gemini") == Decimal("0.670")
    # exactly at the threshold the base rates still apply
    assert total(b, "gemini-2.5-pro", Usage(200000, 0), family="gemini") == Decimal("0.25")
    assert total(b, "gemini-2.5-pro", Usage(200001, 0), family="gemini") == Decimal("0.5000025")


def test_service_tier_from_the_reply_selects_its_rates():
    b = book({"gpt-5": {"input": 1.25, "output": 10, "service_tiers": {"flex": {"input": 0.625, "output": 5}}}})
    u = Usage(1_000_000, 1_000_000)
    assert total(b, "gpt-5", u, tier="flex") == Decimal("5.625")
    assert total(b, "gpt-5", u, tier="default") == Decimal("11.25")
    # Vertex reports trafficType
    assert total(b, "gpt-5", u, tier="ON_DEMAND_FLEX") == Decimal("5.625")


def test_effective_dated_prices_price_each_call_at_its_time():
    b = book({"o3": [{"input": 10, "output": 40, "until": "2025-06-10"}, {"input": 2, "output": 8}]})
    u = Usage(1_000_000, 0)
    assert total(b, "o3", u, when=datetime(2025, 5, 1, tzinfo=timezone.utc)) == Decimal("10.00")
    assert total(b, "o3", u, when=datetime(2025, 6, 10, tzinfo=timezone.utc)) == Decimal("2")


def test_price_list_order_does_not_matter_but_only_one_may_lack_until():
    b = book({"o3": [{"input": 2, "output": 8}, {"input": 10, "output": 40, "until": "2025-06-10"}]})
    assert total(b, "o3", Usage(1_000_000, 0), when=datetime(2025, 1, 1, tzinfo=timezone.utc)) == Decimal("10")
    with pytest.raises(ConfigError) as e:
        book({"o3": [{"input": 2, "output": 8}, {"input": 10, "output": 40}]})
    assert e.value.key == "providers.p.models.o3.pricing" and "until" in e.value.reason


@pytest.mark.parametrize(
    "asked, priced_as",
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o3-mini", None),
        ("gemini-2.5-flash-lite", None),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("sonnet", "claude-sonnet-4-5"),
        ("GPT-4O", "gpt-4o"),
    ],
)
def test_snapshots_and_aliases_resolve_to_family_never_by_prefix(asked, priced_as):
    models = {m: {"input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini", "o3", "gemini-2.5-flash", "claude-sonnet-4-5")}
    b = book(models, aliases={"sonnet": "claude-sonnet-4-5"})
    price = b.resolve("p", asked, family="openai")
    assert (price.model if price else None) == priced_as


def test_name_candidates_strip_only_a_date_suffix():
    assert name_candidates("gpt-4o-mini-2024-07-18", {}) == ["gpt-4o-mini-2024-07-18", "gpt-4o-mini"]


def test_reply_model_is_priced_before_the_requested_one():
    b = book({"gpt-4o": GPT4O, "gpt-4o-2024-05-13": {"input": 5, "output": 15}})
    u = Usage(1_000_000, 0)
    assert total(b, "gpt-4o", u, response_model="gpt-4o-2024-05-13") == Decimal("5")
    assert total(b, "gpt-4o", u, response_model="gpt-4o-2024-08-06") == Decimal("2.5")


def test_unconfigured_model_is_priced_from_the_catalog_and_marked():
    b = book({"gpt-4o": GPT4O}, provider="openai", catalog=True)
    priced = price_call(
        b,
        provider="openai",
        family="openai",
        model="o4-mini",
        response_model="o4-mini-2025-04-16",
        usage=Usage(5000, 800, cache_read_tokens=4096),
        when=NOW,
    )
    assert priced.price.source == "catalog"
    assert priced.cost.total_cost == Decimal("0.0056408")
    assert price_call(
        b, provider="openai", family="openai", model="text-embedding-3-small", response_model=None, usage=Usage(1000, 0), when=NOW
    ).cost.total_cost == Decimal("0.00002")


def test_catalog_historic_price_and_flex_tier():
    b = book({"x": {"input": 1, "output": 1}}, provider="openai", catalog=True)
    u = Usage(1_000_000, 0)
    assert total(b, "o3", u, provider="openai", when=datetime(2025, 5, 1, tzinfo=timezone.utc)) == Decimal("10.00")
    assert total(b, "gpt-5", Usage(1_000_000, 1_000_000), provider="openai", tier="flex") == Decimal("5.625")


def test_catalog_agrees_with_genai_prices_own_calculation():
    """Our one-time conversion must price like the catalog itself does."""
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    cases = [
        (
            "anthropic",
            "anthropic",
            "claude-sonnet-4-5",
            Usage(262050, 400, cache_read_tokens=10000, cache_write_tokens=2000, cache_write_1h_tokens=2000),
        ),
        ("openai", "openai", "gpt-5.6-sol", Usage(300000, 1000, cache_read_tokens=100000, cache_write_tokens=5000)),
        ("gemini", "gemini", "gemini-2.5-flash", Usage(12000, 1000, cache_read_tokens=10000)),
    ]
    cat = Catalog()
    for provider, family, model, u in cases:
        ours = price_call(
            book({"x": {"input": 1, "output": 1}}, provider=provider, family=family, catalog=True),
            provider=provider,
            family=family,
            model=model,
            response_model=None,
            usage=u,
            when=NOW,
        )
        gp = {"gemini": "google"}.get(provider, provider)
        theirs = calc_price(
            GUsage(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                cache_read_tokens=u.cache_read_tokens,
                cache_write_tokens=u.cache_write_tokens,
                **(
                    {
                        "cache_write_1h_tokens": u.cache_write_1h_tokens,
                        "cache_write_5m_tokens": u.cache_write_tokens - u.cache_write_1h_tokens,
                    }
                    if family == "anthropic"
                    else {}
                ),
            ),
            model,
            provider_id=gp,
            genai_request_timestamp=NOW,
        )
        assert ours.price.source == "catalog" and cat.lookup(provider, family, model) is not None
        assert ours.cost.total_cost == theirs.total_price.quantize(Decimal("1e-10")), model


def test_config_overrides_catalog():
    b = book({"o4-mini": {"input": 1, "output": 1}}, provider="openai", catalog=True)
    priced = price_call(b, provider="openai", family="openai", model="o4-mini", response_model=None, usage=Usage(1_000_000, 0), when=NOW)
    assert priced.price.source == "config" and priced.cost.total_cost == Decimal("1")


def test_unknown_model_stays_unpriced():
    b = book({"gpt-4o": GPT4O}, provider="openai", catalog=True)
    assert (
        price_call(b, provider="openai", family="openai", model="my-finetune-xyz", response_model=None, usage=Usage(10, 10), when=NOW).cost
        is None
    )


def test_money_is_exact_over_many_additions():
    b = book({"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}})
    one = total(b, "gpt-4o-mini", Usage(7, 3, cache_read_tokens=1))
    assert one == Decimal("0.0000027750") and one * 1_000_000 == Decimal("2.775")


@pytest.mark.parametrize(
    "pricing, key",
    [
        ({"input": -1, "output": 1}, "input"),
        ({"input": "cheap", "output": 1}, "input"),
        ({"output": 1}, "pricing"),
        ({"input": 1, "output": 1, "cached_inpt": 1}, "cached_inpt"),
        ({"input": 1, "output": 1, "tiers": [{"input": 2}]}, "tiers[0]"),
    ],
)
def test_bad_prices_name_the_key(pricing, key):
    with pytest.raises(ConfigError) as e:
        book({"m": pricing})
    assert key in e.value.key and "providers.p.models.m.pricing" in e.value.key


def test_price_id_changes_with_the_price():
    a = parse_model_price("m", {"input": 1, "output": 2}, "k")
    b = parse_model_price("m", {"input": 1, "output": 3}, "k")
    assert a.price_id != b.price_id and len(a.price_id) == 10


def test_configured_price_beats_the_catalog_under_either_name():
    """Config lists the requested name; the reply names a snapshot only the catalog
    knows. The configured (negotiated) price must still win."""
    b = book({"claude-3-5-sonnet-latest": {"input": 1, "output": 1}}, provider="anthropic", family="anthropic", catalog=True)
    priced = price_call(
        b,
        provider="anthropic",
        family="anthropic",
        model="claude-3-5-sonnet-latest",
        response_model="claude-3-5-sonnet-20241022",
        usage=Usage(1_000_000, 0),
        when=NOW,
    )
    assert priced.price.source == "config" and priced.cost.total_cost == Decimal("1")
    assert b.resolve("anthropic", "claude-3-5-sonnet-20241022", family="anthropic").source == "catalog"


def test_catalog_variants_apply_before_a_scheduled_price_change():
    """A model whose catalog entry already holds a future price: today's flex and
    priority rates must be today's, as genai-prices itself computes them."""
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    cat = Catalog()
    candidates = ("gemini-3.8-flash-tts", "gemini-3.6-flash", "gemini-3.8-flash")
    model = next(
        (m for m in candidates if cat.lookup("gemini", "gemini", m) is not None and len(cat.lookup("gemini", "gemini", m).periods) > 1),
        None,
    )
    if model is None:
        pytest.skip("the pinned catalog has no model with a scheduled price change")
    b = book({"x": {"input": 1, "output": 1}}, provider="gemini", family="gemini", catalog=True)
    u = Usage(1000, 500)
    for tier in ("flex", "priority"):
        theirs = calc_price(
            GUsage(input_tokens=1000, output_tokens=500),
            model,
            provider_id="google",
            genai_request_timestamp=NOW,
            price_context={"service_tier": tier},
        )
        ours = total(b, model, u, family="gemini", provider="gemini", tier=tier)
        assert ours == theirs.total_price.quantize(Decimal("1e-10")), (model, tier)


# --- price variants end to end: the reply's service tier and speed, through the proxy ---------

# USD per 1M. Standard and fast give input and output only: their cache rates are
# Anthropic's fixed multiples of their own input rate. Batch gives every rate.
# (A variant inherits the rates the base card states explicitly, so the base here
# states none: stated standard cache rates would price a fast call's cache at them.)
STANDARD = {"input": 3, "output": 15}
BATCH = {
    "input": Decimal("1.5"),
    "output": Decimal("7.5"),
    "cached_input": Decimal("0.15"),
    "cache_write": Decimal("1.875"),
    "cache_write_1h": 3,
}
FAST = {"input": 18, "output": 90}
ANTHROPIC_CACHE_MULTIPLES: dict[str, Decimal | int] = {"cached_input": Decimal("0.1"), "cache_write": Decimal("1.25"), "cache_write_1h": 2}
VARIANT_MODELS = {"claude-sonnet-4-5": {"pricing": {**STANDARD, "service_tiers": {"batch": BATCH, "fast": FAST}}}}
# 50 uncached, 2,000 written to the 1-hour cache, 1,000 to the 5-minute one, 10,000 read, 400 out.
USAGE = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 10000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 400,
}


def expected(rates: dict) -> tuple[Decimal, Decimal]:
    r = {k: Decimal(str(v)) for k, v in rates.items()}
    for k, mult in ANTHROPIC_CACHE_MULTIPLES.items():
        r.setdefault(k, r["input"] * mult)
    inp = (50 * r["input"] + 10000 * r["cached_input"] + 1000 * r["cache_write"] + 2000 * r["cache_write_1h"]) / 1_000_000
    return inp, 400 * r["output"] / 1_000_000


@pytest.mark.parametrize(
    "reply,variant,rates",
    [
        ({"service_tier": "batch"}, "batch", BATCH),
        ({"service_tier": "standard", "speed": "fast"}, "fast", FAST),
        ({"service_tier": "batch", "speed": "fast"}, "fast", FAST),  # the speed is the more specific
        ({"service_tier": "priority"}, None, STANDARD),  # a tier without its own rates: the standard ones
        ({"service_tier": "standard"}, None, STANDARD),
    ],
    ids=["batch", "fast", "fast-batch", "unpriced-tier", "standard"],
)
async def test_price_variant_from_the_reply(mock, start_proxy, reply, variant, rates):
    mock.on("/v1/messages", json_reply(anthropic_message(usage={**USAGE, **reply})))
    proxy = await start_proxy(make_config(mock.url, variants={"type": "anthropic", "base_url": mock.url, "models": VARIANT_MODELS}))
    async with anthropic.AsyncAnthropic(base_url=f"{proxy.url}/variants", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as c:
        await c.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    [rec] = await proxy.records()
    inp, out = expected(rates)
    assert rec["price_variant"] == variant
    assert (rec["service_tier"], rec["speed"]) == (reply["service_tier"], reply.get("speed"))
    assert (dec(rec["input_cost"]), dec(rec["output_cost"]), dec(rec["total_cost"])) == (inp, out, inp + out)


async def test_price_variant_of_a_streamed_batch_reply(mock, start_proxy):
    evs = anthropic_stream_events(model="claude-sonnet-4-5-20250929")
    evs[0][1]["message"]["usage"]["service_tier"] = "batch"  # message_start carries the tier
    mock.on("/v1/messages", stream_reply(mock, sse(evs)))
    proxy = await start_proxy(make_config(mock.url, variants={"type": "anthropic", "base_url": mock.url, "models": VARIANT_MODELS}))
    async with anthropic.AsyncAnthropic(base_url=f"{proxy.url}/variants", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as c:
        async with c.messages.stream(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
            await s.get_final_message()
    [rec] = await proxy.records()
    # The stream's usage: 100 uncached, 3,000 written to the 5-minute cache, 200 out.
    r = {k: Decimal(str(v)) for k, v in BATCH.items()}
    inp = (100 * r["input"] + 3000 * r["cache_write"]) / 1_000_000
    assert rec["price_variant"] == "batch" and rec["service_tier"] == "batch"
    assert dec(rec["total_cost"]) == inp + 200 * r["output"] / 1_000_000
