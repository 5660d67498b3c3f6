"""Money as integer units of 1e-10 USD (the precision records are written with), so
adding a million records gives the exact decimal total, never float drift. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

COST_UNITS_PER_USD = 10**10
MILLION_DEC = Decimal(1_000_000)  # rates are USD per 1M tokens
_UNIT = Decimal(1).scaleb(-10)


def cost_units(value: Any) -> int | None:
    """A record's cost (float from JSON, Decimal live) as integer 1e-10 USD units."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return int(value.scaleb(10).to_integral_value())
    return round(value * COST_UNITS_PER_USD)


def units_to_usd(units: int) -> Decimal:
    """Exact USD for integer units (trailing zeros dropped: 0.02, not 0.0200000000)."""
    return (Decimal(units) * _UNIT).normalize() if units else Decimal(0)


@dataclass(frozen=True, slots=True)
class Cost:
    input_cost: Decimal
    output_cost: Decimal

    @property
    def total_cost(self) -> Decimal:
        return self.input_cost + self.output_cost


def money(units: int) -> str:
    """Cents when exact, else every digit there is ($0.0034): spend is never rounded."""
    d = units_to_usd(units)
    return f"${d:.2f}" if units % 10**8 == 0 else f"${d:f}"


def usd_to_units(value: Any) -> int:
    """A USD amount from config or the command line, as exact integer units."""
    if isinstance(value, bool):
        raise ValueError("expected a number of US dollars")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"expected a number of US dollars, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"expected a non-negative number of US dollars, got {value!r}")
    return int((d * COST_UNITS_PER_USD).to_integral_value())
