"""Prices as people read them: a model's schedule as text (`pricing show`), and as
config.yml entries (`pricing sync`), inserted into the file without disturbing the rest."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from proxy.core.money import decimal_text
from proxy.pricing import ModelPrice, RateCard, Rates

_RATE_COLUMNS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "web_search")


def _fmt(d: Decimal | None) -> str:
    return "-" if d is None else decimal_text(d)


def _card_lines(label: str, card: RateCard) -> list[str]:
    def row(name: str, r: Rates) -> str:
        return f"  {name:<28}" + "".join(f"{_fmt(getattr(r, c)):>15}" for c in _RATE_COLUMNS)

    out = [row(label, card.rates)]
    out += [row(f"{label}, input > {t.above:,}", t.rates) for t in card.tiers]
    return out


def describe(price: ModelPrice, asked: str, provider: str) -> str:
    source = "config.yml" if price.source == "config" else "genai-prices catalog"
    lines = [f"{asked} ({provider}) -> {price.model}, from the {source} [price id {price.price_id}]"]
    lines.append(f"  {'USD per 1M tokens':<28}" + "".join(f"{c:>15}" for c in _RATE_COLUMNS[:-1]) + f"{'web_search/1K':>15}")
    start = None
    for period in price.periods:
        if period.until is None:
            span = f"from {start}" if start else "always"
        else:
            span = f"{start} .. {period.until.date()}" if start else f"before {period.until.date()}"
        lines += _card_lines(span, period.card)
        for name, card in period.service_tiers.items():
            lines += _card_lines(f"  {name}", card)
        start = str(period.until.date()) if period.until else start
    return "\n".join(lines)


def _yaml_number(d: Decimal) -> str:
    return decimal_text(d)


def _rates_yaml(r: Rates) -> str:
    return ", ".join(f"{k}: {_yaml_number(v)}" for k in _RATE_COLUMNS if (v := getattr(r, k)) is not None)


def price_yaml(model: str, price: ModelPrice) -> str:
    """A config.yml ``models:`` entry reproducing a catalog price, as one flow-style
    line: every period with its ``until`` date (so old calls keep old prices, and a
    scheduled price change takes effect on its day), with tiers and service tiers."""

    def card(c: RateCard) -> str:
        s = _rates_yaml(c.rates)
        if c.tiers:
            s += ", tiers: [" + ", ".join(f"{{above: {t.above}, {_rates_yaml(t.rates)}}}" for t in c.tiers) + "]"
        return s

    def period(p: Any) -> str:
        body = card(p.card)
        if p.service_tiers:
            body += ", service_tiers: {" + ", ".join(f"{n}: {{{card(c)}}}" for n, c in p.service_tiers.items()) + "}"
        if p.until is not None:
            body += f", until: {p.until.isoformat().replace('+00:00', 'Z')}"
        return "{" + body + "}"

    periods = [period(p) for p in price.periods]
    pricing = periods[0] if len(periods) == 1 else "[" + ", ".join(periods) + "]"
    return f'"{model}": {{pricing: {pricing}}}  # from genai-prices, {datetime.now(timezone.utc).date()}'


def insert_models(text: str, provider: str, entries: list[str]) -> str:
    """Insert ``entries`` under ``providers.<provider>.models`` as text, so every
    comment and the layout of config.yml survive."""
    lines = text.splitlines(keepends=True)
    prov_re = re.compile(r"^(\s*)" + re.escape(provider) + r"\s*:\s*(#.*)?$")
    in_providers, prov_indent, prov_line = False, None, None
    for i, line in enumerate(lines):
        if re.match(r"^providers\s*:", line):
            in_providers = True
            continue
        if in_providers and prov_line is None:
            m = prov_re.match(line)
            if m and len(m.group(1)) > 0:
                prov_indent, prov_line = len(m.group(1)), i
                break
    if prov_line is None or prov_indent is None:
        raise ValueError(f"providers.{provider} not found")
    end = len(lines)
    models_line = None
    for j in range(prov_line + 1, len(lines)):
        stripped = lines[j].strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(lines[j]) - len(lines[j].lstrip())
        if indent <= prov_indent:
            end = j
            break
        if re.match(r"models\s*:\s*(#.*)?$", stripped):
            models_line = j
    if models_line is not None:
        indent = len(lines[models_line]) - len(lines[models_line].lstrip()) + 2
        at = models_line + 1
        block = [" " * indent + e + "\n" for e in entries]
    else:
        child = prov_indent + 2
        at = end
        while at > prov_line + 1 and not lines[at - 1].strip():
            at -= 1
        block = [" " * child + "models:\n"] + [" " * (child + 2) + e + "\n" for e in entries]
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    return "".join(lines[:at] + block + lines[at:])
