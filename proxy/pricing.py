"""Prices and the arithmetic of cost. Pure: no I/O, no clock.

Rates are USD per 1M tokens (web search: USD per 1,000 calls) held as ``Decimal``,
so that rates like $0.075/MTok never drift. A model's price is a schedule: a list
of periods (``until`` an instant), each with base rates, optional long-context
tiers (the whole call at the tier's rates once input exceeds ``above``) and
optional service-tier variants (``flex``, ``priority``, ``batch``…).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping, Protocol

from proxy.core.money import Cost
from proxy.core.usage import Usage

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
# Costs are kept to 1e-10 USD: far below any single token's price, and few enough
# digits that a cost survives a round trip through a JSON float unchanged.
COST_QUANTUM = Decimal("1e-10")


@dataclass(frozen=True, slots=True)
class Rates:
    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    web_search: Decimal | None = None  # per 1,000 calls


@dataclass(frozen=True, slots=True)
class Tier:
    above: int  # strictly greater than: at exactly ``above`` input tokens the base rates apply
    rates: Rates


@dataclass(frozen=True, slots=True)
class RateCard:
    """Base rates plus long-context tiers: once total input (cache included) exceeds
    a tier's ``above``, the whole call is billed at that tier's rates (a cliff)."""

    rates: Rates
    tiers: tuple[Tier, ...] = ()

    def rates_for(self, input_tokens: int) -> tuple[Rates, int | None]:
        rates, above = self.rates, None
        for tier in self.tiers:
            if input_tokens > tier.above:
                rates, above = tier.rates, tier.above
        return rates, above


@dataclass(frozen=True, slots=True)
class PricePeriod:
    card: RateCard
    until: datetime | None = None  # exclusive; None: still in force
    # Variants named by what the reply reports: flex, priority, batch, fast…
    service_tiers: Mapping[str, RateCard] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's full price history, oldest period first."""

    model: str
    periods: tuple[PricePeriod, ...]
    source: str = "config"  # "config" | "catalog"
    price_id: str = ""  # short hash of the schedule, stored in records for re-pricing

    def period_at(self, when: datetime) -> PricePeriod:
        for period in self.periods:
            if period.until is None or when < period.until:
                return period
        return self.periods[-1]


@dataclass(frozen=True, slots=True)
class FamilyRules:
    """What a missing rate means, per API family (docs/providers.md §6.2)."""

    cached_input: Decimal | None = None  # multiple of input; None: the input rate
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None


FAMILY_RULES: dict[str, FamilyRules] = {
    # Anthropic's cache rates are fixed multiples of the base input rate.
    "anthropic": FamilyRules(Decimal("0.1"), Decimal("1.25"), Decimal("2")),
    # OpenAI cache writes are billed as plain input before GPT-5.6; a model that
    # bills them gets a configured cache_write rate.
    "openai": FamilyRules(),
    "gemini": FamilyRules(),
}


_NO_RULES = FamilyRules()


def family_rules(family: str | None) -> FamilyRules:
    """What a missing rate means for this API family (none: the input rate)."""
    return FAMILY_RULES.get(family or "", _NO_RULES)


def _rate(explicit: Decimal | None, base: Decimal, multiple: Decimal | None) -> Decimal:
    if explicit is not None:
        return explicit
    return base * multiple if multiple is not None else base


def cache_read_rate(rates: Rates, family: str | None) -> Decimal:
    """The rate a cache-read token bills at: the model's own cached rate, else the
    family's rule (a fixed multiple of input on Anthropic), else the input rate. The one
    missing-cache-rate rule: pricing, savings and suggestions all use it."""
    return _rate(rates.cached_input, rates.input, family_rules(family).cached_input)


# How each provider names the variants in its replies, mapped to our variant names.
_VARIANT_NAMES = {
    "on_demand_flex": "flex",
    "on_demand_priority": "priority",
    "flex": "flex",
    "priority": "priority",
    "batch": "batch",
    "fast": "fast",
    "scale": "scale",
}
# The variant names a price's ``service_tiers`` may use (config.py checks them).
SERVICE_TIERS = frozenset(_VARIANT_NAMES.values())


def price_variants(service_tier: str | None, speed: str | None = None) -> tuple[str, ...]:
    """Variant names to try, from what the reply said (never from what was requested)."""
    out = []
    for value in (speed, service_tier):
        if value:
            name = _VARIANT_NAMES.get(value.lower())
            if name and name not in out:
                out.append(name)
    return tuple(out)


def select_rates(price: ModelPrice, usage: Usage, when: datetime, variants: Iterable[str] = ()) -> tuple[Rates, str | None]:
    """The rates that apply to this call, and a label naming any variant or tier used."""
    period = price.period_at(when)
    card, label = period.card, None
    for name in variants:
        if name in period.service_tiers:
            card, label = period.service_tiers[name], name
            break
    rates, above = card.rates_for(usage.input_tokens)
    if above is not None:
        label = f"{label}," if label else ""
        label += f"input>{above}"
    return rates, label


def compute_cost(usage: Usage, rates: Rates, rules: FamilyRules = FamilyRules()) -> Cost:
    """Price one call. ``usage`` has cache-inclusive input (see core/usage.py)."""
    base = rates.input
    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    write_5m = usage.cache_write_tokens - write_1h
    input_cost = (
        usage.uncached_input_tokens * base
        + usage.cache_read_tokens * _rate(rates.cached_input, base, rules.cached_input)
        + write_5m * _rate(rates.cache_write, base, rules.cache_write)
        + write_1h * _rate(rates.cache_write_1h, base, rules.cache_write_1h)
    ) / MILLION
    output_cost = usage.output_tokens * rates.output / MILLION
    if usage.web_search_requests and rates.web_search:
        # Per-call tool fees are charged for what the model did: counted as output.
        output_cost += usage.web_search_requests * rates.web_search / THOUSAND
    return Cost(input_cost.quantize(COST_QUANTUM), output_cost.quantize(COST_QUANTUM))


# --- model names -----------------------------------------------------------------

# Dated snapshot suffixes: -2024-08-06, -20250929, @20250929 (Vertex), -0613.
_SNAPSHOT = re.compile(r"(?:[-@]\d{4}-\d{2}-\d{2}|[-@]\d{8}|-\d{4})$")


def normalize_model(name: str) -> str:
    name = name.strip().lower()
    if name.startswith("models/"):
        name = name[len("models/") :]
    return name


def name_candidates(name: str, aliases: Mapping[str, str]) -> list[str]:
    """Names to look a model up by, most specific first. Never a bare prefix:
    only a dated-snapshot suffix is removed, so gpt-4o-mini never becomes gpt-4o."""
    out: list[str] = []
    current = normalize_model(name)
    for _ in range(4):  # aliases may chain; bounded so a cycle cannot hang us
        for cand in (current, _SNAPSHOT.sub("", current)):
            if cand and cand not in out:
                out.append(cand)
        target = aliases.get(current) or aliases.get(_SNAPSHOT.sub("", current))
        if target is None:
            break
        current = normalize_model(target)
    return out


class PriceCatalog(Protocol):
    """Prices for the models config.yml does not list (``catalog.Catalog``): what a
    ``PriceBook`` falls back to."""

    def lookup(self, provider: str, family: str, model: str) -> ModelPrice | None: ...


class PriceBook:
    """Configured prices per provider, with a memo of name resolution.

    Resolving a name is done once per (provider, model) pair; later calls are a
    dict lookup, which keeps pricing in the microseconds on the hot path.
    """

    _MEMO_LIMIT = 4096

    def __init__(
        self,
        models: Mapping[str, Mapping[str, ModelPrice]],
        aliases: Mapping[str, Mapping[str, str]] | None = None,
        fallback: PriceCatalog | None = None,
    ) -> None:
        self._models = {p: {normalize_model(k): v for k, v in m.items()} for p, m in models.items()}
        self._aliases = {p: {normalize_model(k): v for k, v in a.items()} for p, a in (aliases or {}).items()}
        self._fallback = fallback
        self._memo: dict[tuple[str, tuple[str, ...], str | None], ModelPrice | None] = {}

    def model_names(self, provider: str) -> frozenset[str]:
        """The (normalized) model names config.yml prices for ``provider``."""
        return frozenset(self._models.get(provider, ()))

    def resolve(self, provider: str, *models: str | None, family: str | None = None) -> ModelPrice | None:
        """The price for the first of ``models`` config.yml knows, else the first the
        catalog knows: a configured price always wins over the catalog, whichever of
        the names (the reply's or the request's) it is configured under."""
        names = tuple(m for m in models if m)
        if not names:
            return None
        key = (provider, names, family)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self._resolve(provider, names, family)
        if len(self._memo) >= self._MEMO_LIMIT:
            self._memo.clear()  # unbounded client-chosen names must not grow memory
        self._memo[key] = found
        return found

    def _resolve(self, provider: str, names: tuple[str, ...], family: str | None) -> ModelPrice | None:
        table = self._models.get(provider, {})
        aliases = {**self._aliases.get("*", {}), **self._aliases.get(provider, {})}
        candidates = [c for name in names for c in name_candidates(name, aliases)]
        for cand in candidates:
            if cand in table:
                return table[cand]
        if self._fallback is not None:
            for cand in candidates:
                found = self._fallback.lookup(provider, family or provider, cand)
                if found is not None:
                    return found
        return None


# --- building prices from plain data (config.yml, the catalog) --------------------

_RATE_KEYS = {f.name for f in fields(Rates)}
_PERIOD_KEYS = _RATE_KEYS | {"until", "tiers", "service_tiers"}
# The keys of one price period, of a long-context tier and of a service tier (config.py checks them).
PERIOD_KEYS = frozenset(_PERIOD_KEYS)
TIER_KEYS = frozenset(_RATE_KEYS | {"above"})
SERVICE_TIER_KEYS = frozenset(_RATE_KEYS | {"tiers"})


class PriceSpecError(ValueError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def _decimal(value: object, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise PriceSpecError(key, f"expected a number of USD, got {value!r}")
    try:
        # str() first: Decimal(0.1) would carry the float's binary error.
        d = Decimal(str(value))
    except InvalidOperation:
        raise PriceSpecError(key, f"expected a number of USD, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise PriceSpecError(key, f"must be a non-negative number, got {value!r}")
    return d


def _instant(value: object, key: str) -> datetime:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise PriceSpecError(key, f"expected a date like 2025-06-10, got {value!r}") from None
    else:
        raise PriceSpecError(key, f"expected a date like 2025-06-10, got {value!r}")
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def parse_rates(spec: object, key: str, inherit: Rates | None = None) -> Rates:
    if not isinstance(spec, Mapping):
        raise PriceSpecError(key, f"expected a mapping of rates, got {type(spec).__name__}")
    values: dict[str, Decimal] = {}
    for k, v in spec.items():
        if k in _RATE_KEYS:
            values[k] = _decimal(v, f"{key}.{k}")
    if inherit is not None:
        return replace(inherit, **values)
    for required in ("input", "output"):
        if required not in values:
            raise PriceSpecError(key, f"missing '{required}' (USD per 1M tokens)")
    return Rates(**values)


def parse_period(spec: object, key: str) -> PricePeriod:
    if not isinstance(spec, Mapping):
        raise PriceSpecError(key, f"expected a mapping, got {type(spec).__name__}")
    unknown = set(spec) - _PERIOD_KEYS
    if unknown:
        raise PriceSpecError(f"{key}.{sorted(unknown)[0]}", f"unknown pricing key; known keys: {', '.join(sorted(_PERIOD_KEYS))}")
    card = _parse_card(spec, key, inherit=None)
    service: dict[str, RateCard] = {}
    raw_service = spec.get("service_tiers") or {}
    if not isinstance(raw_service, Mapping):
        raise PriceSpecError(f"{key}.service_tiers", "expected a mapping like {flex: {input: …, output: …}}")
    for name, sspec in raw_service.items():
        skey = f"{key}.service_tiers.{name}"
        if not isinstance(sspec, Mapping):
            raise PriceSpecError(skey, "expected a mapping of rates")
        bad = set(sspec) - _RATE_KEYS - {"tiers"}
        if bad:
            raise PriceSpecError(f"{skey}.{sorted(bad)[0]}", "unknown key in a service tier")
        service[str(name).lower()] = _parse_card(sspec, skey, inherit=card.rates)
    until = _instant(spec["until"], f"{key}.until") if spec.get("until") is not None else None
    return PricePeriod(card, until, service)


def _parse_card(spec: Mapping[str, Any], key: str, inherit: Rates | None) -> RateCard:
    rates = parse_rates(spec, key, inherit=inherit)
    tiers: list[Tier] = []
    raw_tiers = spec.get("tiers") or []
    if not isinstance(raw_tiers, list):
        raise PriceSpecError(f"{key}.tiers", "expected a list of {above: N, input: …, output: …}")
    for i, t in enumerate(raw_tiers):
        tkey = f"{key}.tiers[{i}]"
        if not isinstance(t, Mapping) or isinstance(t.get("above"), bool) or not isinstance(t.get("above"), int) or t["above"] < 0:
            raise PriceSpecError(tkey, "each tier needs 'above': a whole number of input tokens")
        tiers.append(Tier(t["above"], parse_rates(t, tkey, inherit=rates)))
    tiers.sort(key=lambda t: t.above)
    return RateCard(rates, tuple(tiers))


def parse_model_price(model: str, spec: object, key: str, source: str = "config") -> ModelPrice:
    """``spec`` is one period (a mapping) or a list of periods with ``until`` dates."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise PriceSpecError(key, "empty pricing list")
    periods = [parse_period(p, f"{key}[{i}]" if isinstance(spec, list) else key) for i, p in enumerate(items)]
    periods.sort(key=lambda p: (p.until is None, p.until or datetime.max.replace(tzinfo=timezone.utc)))
    for p in periods[:-1]:
        if p.until is None:
            raise PriceSpecError(key, "only the last (current) price may omit 'until'")
    return ModelPrice(model, tuple(periods), source, price_fingerprint(model, periods))


def price_fingerprint(model: str, periods: Iterable[PricePeriod]) -> str:
    return hashlib.sha256(repr((model, tuple(periods))).encode()).hexdigest()[:10]


# --- pricing one call ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Priced:
    price: ModelPrice | None
    cost: Cost | None
    variant: str | None = None  # e.g. "flex", "input>200000": what moved the price


def price_call(
    book: PriceBook,
    *,
    provider: str,
    family: str,
    model: str | None,
    response_model: str | None,
    usage: Usage,
    when: datetime,
    service_tier: str | None = None,
    speed: str | None = None,
) -> Priced:
    """Price one call: the model the reply names first (most specific), then the
    requested one. Used live and when re-pricing history, so both agree."""
    price = book.resolve(provider, response_model, model, family=family)
    if price is None:
        return Priced(None, None)
    rates, variant = select_rates(price, usage, when, price_variants(service_tier, speed))
    # _NO_RULES: get()'s fallback is evaluated on every call, used or not.
    return Priced(price, compute_cost(usage, rates, FAMILY_RULES.get(family, _NO_RULES)), variant)
