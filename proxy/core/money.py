"""Money as integer units of 1e-10 USD (the precision records are written with), so
adding a million records gives the exact decimal total, never float drift. Pure."""

from __future__ import annotations

from decimal import Decimal
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
