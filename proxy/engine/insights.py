"""Report features over a scan: cache-read savings, usage habits for suggestions, and
month-end projections."""

from __future__ import annotations

from calendar import monthrange
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Mapping

from proxy.core.timestamps import UTC
from proxy.core.usage import Usage
from proxy.engine.query import NONE_LABEL
from proxy.pricing import FAMILY_RULES, PriceBook, cache_read_rate, price_variants, select_rates

# --- savings and habits (per record, only when asked) --------------------------------------

SHORT_REPLY_TOKENS = 100
LONG_PROMPT_TOKENS = 1024


# What a record's cache savings rate depends on: (provider, family, response model,
# model, service tier, speed) as the record holds them (JSON values), and its UTC hour.
CacheRateKey = tuple[Any, Any, Any, Any, Any, Any, str]
# Per long-context tier, highest first: (tier bound, rate difference in USD per 1M).
TierDiffs = list[tuple[int, Decimal]]


class CacheRates:
    """Per record: how much each cache-read token saved (input rate minus cached rate).
    Resolved from the price book once per (provider, model, tier, hour) and memoized."""

    def __init__(self, book: PriceBook | None) -> None:
        self.book = book
        self.memo: dict[CacheRateKey, TierDiffs | None] = {}

    def diff(self, rec: Mapping[str, Any], ts: str) -> Decimal | None:
        input_tokens = rec.get("input_tokens") or 0
        key: CacheRateKey = (
            rec.get("provider"),
            rec.get("provider_type"),
            rec.get("response_model"),
            rec.get("model"),
            rec.get("service_tier"),
            rec.get("speed"),
            ts[:13],
        )
        try:
            cached = self.memo[key]
        except KeyError:
            cached = self.memo[key] = self._resolve(key)
        if cached is None:
            return None
        for above, d in cached:  # highest tier first
            if input_tokens > above:
                return d
        return None

    def _resolve(self, key: CacheRateKey) -> TierDiffs | None:
        provider, family, response_model, model, tier, speed, hour = key
        if self.book is None or not provider:
            return None
        price = self.book.resolve(provider, response_model, model, family=family)
        if price is None:
            return None
        when = datetime.fromisoformat(hour + ":00:00+00:00")
        variants = price_variants(tier, speed)
        out: TierDiffs = []
        # Probe each long-context tier boundary: rates are a step function of input size.
        card = price.period_at(when).card
        aboves = sorted({-1, *(t.above for t in card.tiers)}, reverse=True)
        for above in aboves:
            rates, _ = select_rates(price, Usage(input_tokens=above + 1), when, variants)
            out.append((above, rates.input - cache_read_rate(rates, family)))
        return out


def derived_savings_units(rec: Mapping[str, Any]) -> int | None:
    """Without a price: families whose cache rates are fixed multiples of the input rate
    (Anthropic) let the record's own input cost give its input rate, hence its savings."""
    rules = FAMILY_RULES.get(rec.get("provider_type") or "")
    ic = rec.get("input_cost")
    if rules is None or rules.cached_input is None or not ic:
        return None
    read = rec.get("cache_read_tokens") or 0
    write = rec.get("cache_write_tokens") or 0
    w1h = min(rec.get("cache_write_1h_tokens") or 0, write)
    uncached = max(0, (rec.get("input_tokens") or 0) - read - write)
    weighted = uncached + read * rules.cached_input + (write - w1h) * (rules.cache_write or 1) + w1h * (rules.cache_write_1h or 1)
    if not weighted:
        return None
    input_cost = Decimal(repr(ic)) if isinstance(ic, float) else Decimal(ic)
    saved = input_cost * read * (1 - rules.cached_input) / weighted
    return int(saved.scaleb(10).to_integral_value())


# Habit rows are kept per (provider, family, model), as the records name them (JSON
# values; NONE_LABEL for a missing provider or model).
HabitKey = tuple[Any, Any, Any]
# Habit row: ok calls, short replies (n, input, output, cost units), long prompts (n, input, cached)
H_OK, H_SHORT, H_SHORT_IN, H_SHORT_OUT, H_SHORT_COST, H_LONG, H_LONG_IN, H_LONG_CACHED = range(8)


def add_habit(habits: dict[HabitKey, list[int]], rec: Mapping[str, Any], cu: int) -> None:
    status = rec.get("status")
    if rec.get("error") or not isinstance(status, int) or status >= 400:
        return
    out = rec.get("output_tokens") or 0
    inp = rec.get("input_tokens") or 0
    key = (rec.get("provider") or NONE_LABEL, rec.get("provider_type") or "", rec.get("model") or rec.get("response_model") or NONE_LABEL)
    h = habits.get(key)
    if h is None:
        h = habits[key] = [0] * 8
    h[H_OK] += 1
    if 0 < out <= SHORT_REPLY_TOKENS:
        h[H_SHORT] += 1
        h[H_SHORT_IN] += inp
        h[H_SHORT_OUT] += out
        h[H_SHORT_COST] += cu
    if inp >= LONG_PROMPT_TOKENS:
        h[H_LONG] += 1
        h[H_LONG_IN] += inp
        h[H_LONG_CACHED] += rec.get("cache_read_tokens") or 0


# --- projections -----------------------------------------------------------------------------


@dataclass
class Projection:
    month: str  # "2026-11", in the report's time zone
    days_in_month: int
    month_to_date_units: int | None  # None: the data does not reach back to the month's start
    recent_units: int  # cost over the recent span the rate is taken from
    recent_seconds: float
    remaining_seconds: float
    projected_units: int

    @property
    def daily_rate_units(self) -> int:
        return round(self.recent_units * 86400 / self.recent_seconds) if self.recent_seconds else 0


def project_month(
    buckets: Mapping[datetime, int],
    window_start: datetime,
    window_end: datetime,
    tz: tzinfo = UTC,
    bucket_seconds: int = 3600,
    recent_days: int = 7,
) -> Projection:
    """The month (in ``tz``) of ``window_end``: its cost so far plus the recent rate for the
    time left. ``buckets`` maps each time bucket's start (aware, UTC-aligned) to its cost
    units. The recent rate is the cost of the last ``recent_days`` of the window, taken
    from the start of the bucket holding that instant (or the window's start if later),
    over the exact time that spans, so it never mixes a partial bucket with a whole one."""
    end_local = window_end.astimezone(tz)
    month_start = end_local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ndays = monthrange(end_local.year, end_local.month)[1]
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    cut = (window_end - timedelta(days=recent_days)).timestamp()
    cut_bucket = datetime.fromtimestamp(cut - cut % bucket_seconds, UTC)
    span_start = max(window_start, cut_bucket)
    recent = sum(v for b, v in buckets.items() if b >= cut_bucket)
    span = max((window_end - span_start).total_seconds(), 1.0)
    remaining = max(0.0, (next_month - end_local).total_seconds())
    mtd: int | None
    if window_start <= month_start:
        mtd = sum(v for b, v in buckets.items() if b >= month_start)
        projected = mtd + round(recent * remaining / span)
    else:
        mtd = None
        projected = round(recent * ndays * 86400 / span)
    return Projection(month_start.strftime("%Y-%m"), ndays, mtd, recent, span, remaining, projected)
