"""Report sections that interpret the numbers: cache savings, the month-end projection, and suggestions where the data shows them."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable

from proxy.core.money import MILLION_DEC, format_usd, units_to_usd
from proxy.core.text import printable
from proxy.engine.insights import (
    H_LONG,
    H_LONG_CACHED,
    H_LONG_IN,
    H_OK,
    H_SHORT,
    H_SHORT_COST,
    H_SHORT_IN,
    H_SHORT_OUT,
    LONG_PROMPT_TOKENS,
    SHORT_REPLY_TOKENS,
    Projection,
    project_month,
)
from proxy.pricing import cache_read_rate, name_candidates
from proxy.reports.model import Report
from proxy.reports.numbers import share


def savings(r: Report) -> dict[str, Any]:
    res = r.res
    priced_tokens = sum(res.savings_by_rate.values())
    saved = sum((rate * n for rate, n in res.savings_by_rate.items()), Decimal(0)) / MILLION_DEC
    saved = saved.quantize(Decimal("1e-10"), ROUND_HALF_UP) + units_to_usd(res.savings_derived_units)
    tokens = r.res.totals().tokens["cache_read_tokens"]
    return {
        "tokens": tokens,
        "priced_tokens": priced_tokens,
        "derived": res.savings_derived_units,
        "unpriced_tokens": res.savings_unpriced_tokens,
        "saved": saved.normalize() if saved else Decimal(0),
    }


def projection(r: Report) -> Projection | None:
    start, end = r.span()
    if start is None or end is None or not r.res.cells:
        return None
    width = 3600 if r.res.time_width == 13 else 60
    return project_month(r.res.time_buckets(), start, end, r.tz, bucket_seconds=width)


_SIBLING_SWAPS = (("opus", "sonnet"), ("sonnet", "haiku"), ("-pro", "-flash"), ("-flash", "-flash-lite"))


def cheaper_siblings(name: str, known: Iterable[str]) -> list[str]:
    """Smaller models of the same family by naming convention: gpt-4o -> gpt-4o-mini,
    claude-sonnet-4-5 -> claude-haiku-4-5, gemini-2.5-pro -> gemini-2.5-flash."""
    known = set(known)
    cands = [name + s for s in ("-mini", "-nano", "-lite")]
    cands += [name.replace(a, b) for a, b in _SIBLING_SWAPS if a in name and b not in name]
    return [c for c in cands if c in known and c != name]


def suggestions(r: Report) -> list[str]:
    tips: list[tuple[int, str]] = []
    book = r.book
    when = r.now
    for (provider, family, model), h in sorted(r.res.habits.items()):
        ok = h[H_OK]
        family_name = name_candidates(model, {})[-1]
        shown = f"{printable(provider)}/{printable(model)}"  # lookups below use the names as logged
        # Short replies on a big model: would the smaller sibling have done?
        if book is not None and h[H_SHORT] >= 20 and h[H_SHORT] * 4 >= ok:
            table_ = book.model_names(provider)
            for sib in cheaper_siblings(family_name, table_):
                price = book.resolve(provider, sib, family=family)
                if price is None:
                    continue
                rates = _base_rates(price, when)
                est = (h[H_SHORT_IN] * rates.input + h[H_SHORT_OUT] * rates.output) / MILLION_DEC
                actual = units_to_usd(h[H_SHORT_COST])
                if est < actual:
                    saved = actual - est
                    tips.append(
                        (
                            int(saved * 10**10),
                            (
                                f"{shown}: {h[H_SHORT]:,} of {ok:,} successful calls "
                                f"({share(h[H_SHORT], ok)}) returned at most {SHORT_REPLY_TOKENS} tokens and cost "
                                f"{format_usd(actual)}; at {printable(sib)}'s list price they would cost about {format_usd(est)} "
                                f"(save ~{format_usd(saved)}), if it answers them well enough."
                            ),
                        )
                    )
                    break
        # Long prompts that are rarely read from cache.
        if h[H_LONG] >= 20 and h[H_LONG_CACHED] * 10 < h[H_LONG_IN]:
            cached_share = share(h[H_LONG_CACHED], h[H_LONG_IN])
            hint = (
                "mark the stable prefix with cache_control"
                if family == "anthropic"
                else "keep the stable part (system prompt, tools, documents) first and identical"
            )
            tip = (
                f"{shown}: {h[H_LONG]:,} calls sent prompts of {LONG_PROMPT_TOKENS:,}+ tokens "
                f"but only {cached_share} of that input came from cache; if these prompts repeat, {hint}"
            )
            weight = 0
            if book is not None:
                price = book.resolve(provider, model, family=family)
                if price is not None:
                    rates = _base_rates(price, when)
                    cached = cache_read_rate(rates, family)
                    per10 = (Decimal(h[H_LONG_IN] - h[H_LONG_CACHED]) / 10 * (rates.input - cached)) / MILLION_DEC
                    if per10 > 0:
                        tip += f" (each 10% of it cached saves about {format_usd(per10)})"
                        weight = int(per10 * 10**10)
            tips.append((weight, tip + "."))
    return [text for _, text in sorted(tips, key=lambda x: -x[0])]


def _base_rates(price: Any, when: datetime) -> Any:
    period = price.period_at(when)
    card = getattr(period, "card", period)
    return card.rates
