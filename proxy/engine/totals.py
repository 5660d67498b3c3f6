"""The one aggregation engine: every sum of records (CLI reports, /health, the
analytics API, the dashboard) goes through ``Totals``.

Money is summed as integer units of 1e-10 USD (see ``proxy.core.money``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Mapping

from proxy.core.money import cost_units, units_to_usd
from proxy.core.timestamps import parse_timestamp

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
MONEY_FIELDS = ("total_cost", "input_cost", "output_cost")
# Every field a reader adds up. A record that gives one of them as anything but a number
# (or null) is corrupt: summing it would crash the reader or, for a string cost, build
# a string ten billion times its length (``"1" * 10**10``).
NUMERIC_FIELDS = (*MONEY_FIELDS, *TOKEN_FIELDS)
NUMBER_TYPES = frozenset({int, float, type(None)})
# No call costs this much; a larger float (1e300) would overflow when made into units.
MAX_USD = 1e12


def well_typed(rec: Mapping[str, Any]) -> bool:
    """Whether every field readers add up is a number or null (and an amount of money
    below ``MAX_USD``): the one test every reader
    (reports, /health, budget replay, reprice) applies before counting a record. The
    scan's hot loop (``engine.lines.accumulate``) applies it to the values it already
    holds; a change here goes there too."""
    if not NUMBER_TYPES.issuperset(map(type, map(rec.get, NUMERIC_FIELDS))):
        return False
    return all(v is None or -MAX_USD < v < MAX_USD for v in map(rec.get, MONEY_FIELDS))


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    priced: int = 0
    unpriced: int = 0  # records with tokens but no cost: totals are then "at least"
    cost_units: int = 0
    input_cost_units: int = 0
    output_cost_units: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_FIELDS, 0))
    # Records whose usage is unknown (a stream cut before its usage arrived): their
    # cost is unknown too, so a total that includes them is also "at least".
    unknown: int = 0

    def add(self, rec: Mapping[str, Any]) -> None:
        self.requests += 1
        status = rec.get("status")
        if rec.get("error") or (isinstance(status, int) and status >= 400):
            self.errors += 1
        total = cost_units(rec.get("total_cost"))
        if total is None:
            tokens_total = rec.get("total_tokens")
            if tokens_total:
                self.unpriced += 1
            elif tokens_total is None:
                self.unknown += 1
        else:
            self.priced += 1
            self.cost_units += total
            self.input_cost_units += cost_units(rec.get("input_cost")) or 0
            self.output_cost_units += cost_units(rec.get("output_cost")) or 0
        tokens = self.tokens
        for name in TOKEN_FIELDS:
            v = rec.get(name)
            if v:
                tokens[name] += v

    def merge(self, other: "Totals") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.priced += other.priced
        self.unpriced += other.unpriced
        self.cost_units += other.cost_units
        self.input_cost_units += other.input_cost_units
        self.output_cost_units += other.output_cost_units
        self.unknown += other.unknown
        for k, v in other.tokens.items():
            self.tokens[k] = self.tokens.get(k, 0) + v

    @property
    def total_cost(self) -> Decimal:
        return units_to_usd(self.cost_units)

    @property
    def incomplete(self) -> bool:
        """True when some requests' cost is missing, so ``total_cost`` is a lower bound."""
        return bool(self.unpriced or self.unknown)


class RollingWindow:
    """Totals over the last ``seconds``, per provider, in one-minute buckets.

    Adding a record is O(1); reading the window merges at most one bucket per minute.
    """

    def __init__(self, seconds: int = 86400, bucket: int = 60, clock: Callable[[], float] = time.time) -> None:
        self.seconds, self.bucket, self._clock = seconds, bucket, clock
        self._buckets: deque[tuple[int, dict[str, Totals]]] = deque()

    def add(self, rec: Mapping[str, Any], ts: float | None = None) -> None:
        if ts is None:
            ts = parse_timestamp(rec["timestamp"])
        b = int(ts // self.bucket)
        if self._buckets and self._buckets[-1][0] == b:
            slot = self._buckets[-1][1]
        elif not self._buckets or self._buckets[-1][0] < b:
            slot = {}
            self._buckets.append((b, slot))
        else:
            # An out-of-order record (long call finishing late): find its bucket.
            found = next((s for k, s in self._buckets if k == b), None)
            if found is not None:
                slot = found
            else:
                slot = {}
                self._buckets.append((b, slot))
                self._buckets = deque(sorted(self._buckets, key=lambda x: x[0]))
        provider = rec.get("provider") or "unknown"
        t = slot.get(provider)
        if t is None:
            t = slot[provider] = Totals()
        t.add(rec)

    def totals(self) -> tuple[Totals, dict[str, Totals]]:
        cutoff = int((self._clock() - self.seconds) // self.bucket)
        while self._buckets and self._buckets[0][0] <= cutoff:
            self._buckets.popleft()
        overall = Totals()
        by_provider: dict[str, Totals] = {}
        for _, slot in self._buckets:
            for provider, t in slot.items():
                overall.merge(t)
                by_provider.setdefault(provider, Totals()).merge(t)
        return overall, by_provider
