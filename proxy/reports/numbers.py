"""Numbers as reports print them: counts, shares, ratios, exact JSON decimals."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson


def fmt_int(n: int) -> str:
    return f"{n:,}"


def exact(d: Decimal) -> orjson.Fragment:
    """A Decimal as an exact JSON number (never through a float)."""
    return orjson.Fragment(format(d, "f"))


def ratio(num: Decimal, den: int, scale: int = 1) -> Decimal:
    if not den:
        return Decimal(0)
    return (num * scale / den).quantize(Decimal("1e-10"), ROUND_HALF_UP).normalize()


def share(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.1f}%" if whole else "-"


def ms_text(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def count_text(v: Any) -> str:
    return "-" if v is None else f"{v:,}"


def record_decimal(v: Any) -> Decimal:
    # repr of a float is the shortest text that round-trips: the digits the log holds.
    return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
