"""Re-pricing records with today's prices: each record keeps its normalized token
counts, raw usage, timestamp and what priced it, so it can be priced again at the price
in force at its time. Lines in, lines out (``reprice_lines``); pure: the files are
``storage.rewrite``'s."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterator

import orjson

from proxy.core.money import cost_units, units_to_usd
from proxy.core.records import dumps_record, iso_utc
from proxy.core.timestamps import parse_timestamp
from proxy.core.usage import Usage
from proxy.engine.lines import Dedupe
from proxy.engine.totals import well_typed
from proxy.pricing import PriceBook, price_call

_PRICE_FIELDS = ("input_cost", "output_cost", "total_cost", "pricing_source", "price_id", "price_variant")


def usage_from_record(rec: dict[str, Any]) -> Usage | None:
    if rec.get("input_tokens") is None and rec.get("output_tokens") is None:
        return None

    def n(key: str) -> int:
        v = rec.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    return Usage(
        input_tokens=n("input_tokens"),
        output_tokens=n("output_tokens"),
        cache_read_tokens=n("cache_read_tokens"),
        cache_write_tokens=n("cache_write_tokens"),
        cache_write_1h_tokens=n("cache_write_1h_tokens"),
        reasoning_tokens=n("reasoning_tokens"),
        web_search_requests=n("web_search_requests"),
    )


def reprice_record(rec: dict[str, Any], book: PriceBook) -> dict[str, Any] | None:
    """The record with its price fields recomputed, or None if they are unchanged."""
    usage = usage_from_record(rec)
    if usage is None or not (usage.input_tokens or usage.output_tokens or usage.web_search_requests):
        return None  # unknown usage stays unknown; zero usage costs zero at any price
    try:
        when = datetime.fromtimestamp(parse_timestamp(rec["timestamp"]), timezone.utc)
    except (KeyError, TypeError, ValueError):
        return None
    priced = price_call(
        book,
        provider=str(rec.get("provider") or ""),
        family=str(rec.get("provider_type") or rec.get("provider") or ""),
        model=rec.get("model"),
        response_model=rec.get("response_model"),
        usage=usage,
        when=when,
        service_tier=rec.get("service_tier"),
        speed=rec.get("speed"),
    )
    cost, price = priced.cost, priced.price
    new: dict[str, Any] = {
        "input_cost": cost.input_cost if cost else None,
        "output_cost": cost.output_cost if cost else None,
        "total_cost": cost.total_cost if cost else None,
        "pricing_source": price.source if cost and price else None,
        "price_id": price.price_id if cost and price else None,
        "price_variant": priced.variant if cost else None,
    }
    same = all((cost_units(rec.get(k)) == cost_units(new[k])) if k.endswith("_cost") else rec.get(k) == new[k] for k in _PRICE_FIELDS)
    if same:
        return None
    return {**rec, **new}


@dataclass
class RepriceStats:
    records: int = 0
    changed: int = 0  # records whose total cost changed
    relabelled: int = 0  # same cost, but a new price id or source
    newly_priced: int = 0
    now_unpriced: int = 0
    corrupt: int = 0
    duplicates: int = 0  # repeats of a recent line or record id (a retried write): counted once
    old_units: int = 0
    new_units: int = 0

    @property
    def difference(self) -> Decimal:
        return units_to_usd(self.new_units - self.old_units)


def reprice_lines(lines: Iterator[bytes], book: PriceBook, stats: RepriceStats, now: float) -> Iterator[bytes]:
    """Lines in, lines out; unchanged and unreadable lines pass through byte for byte.
    A repeated line (see engine.lines.Dedupe) is counted once but still written, re-priced
    like its first copy: the output stays a faithful copy, and its repeats stay
    byte-identical (or keep their record id), so readers still count them once."""
    stamp = iso_utc(now)
    dedupe = Dedupe()
    for line in lines:
        if not line.strip():
            continue
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not well_typed(rec):
            stats.corrupt += 1
            yield line
            continue
        if dedupe.seen_line(line) or dedupe.seen_record(rec):
            stats.duplicates += 1
            tally = RepriceStats()  # re-priced as usual, counted nowhere
        else:
            tally = stats
        tally.records += 1
        old = cost_units(rec.get("total_cost"))
        new_rec = reprice_record(rec, book)
        if new_rec is None:
            tally.old_units += old or 0
            tally.new_units += old or 0
            yield line
            continue
        new = cost_units(new_rec["total_cost"])
        tally.old_units += old or 0
        tally.new_units += new or 0
        if old != new:
            tally.changed += 1
            if old is None:
                tally.newly_priced += 1
            elif new is None:
                tally.now_unpriced += 1
        else:
            tally.relabelled += 1
        new_rec["repriced_at"] = stamp
        yield dumps_record(new_rec)
