"""Prices for models config.yml does not list, from the genai-prices catalog.

genai-prices (MIT, pydantic/genai-prices) ships its price table inside the wheel
and works offline. Its own ``calc_price`` costs ~200 µs a call, so instead each
catalog entry is converted once into our ``ModelPrice`` schedule and priced by
``pricing.compute_cost`` like a configured one; ``PriceBook`` memoizes the lookup.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from datetime import datetime, time, timezone
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

from proxy.pricing import ModelPrice, PricePeriod, RateCard, Rates, Tier

if TYPE_CHECKING:  # imported where used at run time, so a missing package only disables the catalog
    from genai_prices import types as catalog_types
    from genai_prices.data_snapshot import DataSnapshot

log = logging.getLogger("proxy")

# Our API family -> the catalog's provider id.
FAMILY_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}

# Catalog price keys we bill, mapped to our rate names. Audio, image and storage
# rates are not priced by this proxy (see docs/pricing.md, "What is not priced").
_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cached_input",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "web_searches_kcount": "web_search",
}


@lru_cache(maxsize=1)
def _snapshot() -> tuple[DataSnapshot, frozenset[str]] | None:
    try:
        from genai_prices import data_snapshot
    except ImportError:
        return None
    snapshot = data_snapshot.get_snapshot()
    return snapshot, frozenset(p.id for p in snapshot.providers)


# Model names come from clients: the memo is bounded so they cannot grow memory.
@lru_cache(maxsize=4096)
def context_window(provider: str, model: str, family: str | None = None) -> int | None:
    """The catalog's context window of ``model`` (input and output tokens together),
    or None when the catalog is not installed, does not list the model or gives no
    window. ``provider`` is a catalog provider id (``openai``, ``groq``…) or one of our
    families; a configured provider name the catalog does not know falls back to
    ``family``, as price lookups do."""
    found = _snapshot()
    if found is None or not model:
        return None
    snapshot, known = found
    provider_id = provider if provider in known else FAMILY_PROVIDER.get(family or "") or FAMILY_PROVIDER.get(provider)
    if provider_id is None:
        return None
    try:
        _, info = snapshot.find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None
    window = getattr(info, "context_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def catalog_version() -> str | None:
    try:
        import genai_prices
    except ImportError:
        return None
    return str(genai_prices.__version__)


class Catalog:
    """Looks models up in the bundled genai-prices data (never fetched at run time)."""

    def __init__(self) -> None:
        from genai_prices import data_snapshot

        self._snapshot = data_snapshot.get_snapshot()
        self.version = catalog_version() or "?"
        self._known_providers = {p.id for p in self._snapshot.providers}

    def lookup(self, provider: str, family: str, model: str) -> ModelPrice | None:
        provider_id = provider if provider in self._known_providers else FAMILY_PROVIDER.get(family)
        if provider_id is None:
            return None
        try:
            _, info = self._snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            return None
        try:
            return convert(info, self.version)
        except Exception as e:  # a catalog shape we do not understand: unpriced, not a crash
            log.warning("catalog entry %s/%s could not be converted: %s", provider_id, info.id, e)
            return None


def _rates(price: catalog_types.ModelPrice, at: int | None, inherit: Rates | None) -> Rates | None:
    """Rates of one catalog ModelPrice, taking tiered values at input size ``at``."""
    values: dict[str, Decimal] = {}
    for key, ours in _KEYS.items():
        v: Decimal | catalog_types.TieredPrices | None = getattr(price, key, None)
        if v is None:
            continue
        if not isinstance(v, Decimal):  # TieredPrices
            chosen = v.base
            for tier in v.tiers:
                if at is not None and at >= tier.start:
                    chosen = tier.price
            v = chosen
        values[ours] = v
    if inherit is not None:
        return replace(inherit, **values)
    if "input" not in values:
        return None
    values.setdefault("output", Decimal(0))
    return Rates(**values)


def _card(price: catalog_types.ModelPrice, inherit: Rates | None) -> RateCard | None:
    base = _rates(price, None, inherit)
    if base is None:
        return None
    starts = sorted(
        {t.start for key in _KEYS if (v := getattr(price, key, None)) is not None and not isinstance(v, Decimal) for t in v.tiers}
    )
    tiers = []
    for start in starts:
        tier_rates = _rates(price, start, inherit)
        assert tier_rates is not None
        tiers.append(Tier(start, tier_rates))
    return RateCard(base, tuple(tiers))


def _variant_name(when: Mapping[str, str]) -> str | None:
    if when.get("service_tier") and when["service_tier"] != "default":
        return str(when["service_tier"]).lower()
    if when.get("processing") == "batch":
        return "batch"
    if when.get("speed") == "fast":
        return "fast"
    return None


def _input_rate(price: catalog_types.ModelPrice) -> Decimal:
    v: Decimal | catalog_types.TieredPrices | None = getattr(price, "input_mtok", None)
    if v is None:
        return Decimal(0)
    return v if isinstance(v, Decimal) else v.base


def convert(info: catalog_types.ModelInfo, version: str) -> ModelPrice | None:
    """One catalog model -> our schedule: date-conditional prices become periods,
    price variants become service tiers, tiered values become long-context tiers."""
    prices = info.prices
    conditionals: list[tuple[datetime | None, catalog_types.ModelPrice]] = []
    undated: list[catalog_types.ModelPrice] = []
    for cp in prices if isinstance(prices, list) else ():
        start = getattr(cp.constraint, "start_date", None)
        if start is not None:
            conditionals.append((datetime.combine(start, time(), timezone.utc), cp.prices))
        else:
            # No constraint, or a time-of-day one (DeepSeek off-peak), which a dated
            # schedule cannot express: keep the highest rate rather than under-bill.
            undated.append(cp.prices)
    if not isinstance(prices, list):
        undated.append(prices)
    if undated:
        conditionals.append((None, max(undated, key=_input_rate)))
    conditionals.sort(key=lambda x: x[0] or datetime.min.replace(tzinfo=timezone.utc))

    periods: list[PricePeriod] = []
    for i, (_, price) in enumerate(conditionals):
        card = _card(price, None)
        if card is None:
            return None
        until = conditionals[i + 1][0] if i + 1 < len(conditionals) else None
        periods.append(PricePeriod(card, until, {}))
    # Variants (flex, priority, batch…) are dated like prices: a period takes, per name,
    # the first listed variant that starts before the period ends, which is the one the
    # catalog itself picks at request time. A start date inside the period marks when the
    # catalog began modelling the variant, not a price change, so it is not a bound.
    named = [(name, v) for v in info.price_variants or () if (name := _variant_name(v.when)) is not None]
    if named:
        for i, period in enumerate(periods):
            variants: dict[str, RateCard] = {}
            for name, variant in named:
                start = getattr(variant.constraint, "start_date", None)
                if start is not None and period.until is not None and datetime.combine(start, time(), timezone.utc) >= period.until:
                    continue
                card = _card(variant.prices, period.card.rates)
                if card is not None and name not in variants:
                    variants[name] = card
            periods[i] = PricePeriod(period.card, period.until, variants)
    digest = hashlib.sha256(repr((info.id, version, tuple(periods))).encode()).hexdigest()[:10]
    return ModelPrice(info.id, tuple(periods), source="catalog", price_id=digest)
