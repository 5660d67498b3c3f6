"""Money as integer units of 1e-10 USD (the precision records are written with), so
adding a million records gives the exact decimal total, never float drift. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

COST_UNITS_PER_USD = 10**10
MILLION_DEC = Decimal(1_000_000)  # rates are USD per 1M tokens
_UNIT = Decimal(1).scaleb(-10)


def cost_units(value: Decimal | float | None) -> int | None:
    """A record's cost (float from JSON, Decimal live) as integer 1e-10 USD units."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return int(value.scaleb(10).to_integral_value())
    return round(value * COST_UNITS_PER_USD)


def decimal_text(value: Decimal) -> str:
    """A Decimal as its exact digits, no exponent, no trailing zeros (0.0000426, not
    4.26E-5): how records, reply headers and the stream comment write money."""
    return format(value.normalize(), "f")


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


_CENT = Decimal("0.01")


def format_usd(amount: Decimal | int, *, exact: bool = False, at_least: bool = False) -> str:
    """The one money formatter. ``amount`` is USD, or integer units when an int.

    Reports (default): four decimals, more for amounts under a cent so two significant
    digits show ($12.3457, $0.0200, $0.000123), grouped by thousands; ``at_least``
    prefixes ≥ for a lower bound. ``exact`` (budgets, keys, the console line): cents
    when the amount is whole cents, else every digit there is ($5.00, $0.0034), since
    spend against a limit is never rounded."""
    value = units_to_usd(amount) if isinstance(amount, int) else amount
    sign = "-" if value < 0 else ""
    v = abs(value)
    if exact:
        text = f"{v:.2f}" if v == v.quantize(_CENT) else format(v.normalize(), "f")
    elif v == 0 or v >= _CENT:
        text = f"{v.quantize(Decimal('0.0001'), ROUND_HALF_UP):,}"
    else:
        exp = v.adjusted()  # 0.000123 -> -4
        places = min(10, max(4, -exp + 1))
        text = f"{v.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP):f}"
    return f"{'≥' if at_least else ''}{sign}${text}"


def format_usd_places(amount: Decimal | int, places: int = 6) -> str:
    """USD with exactly ``places`` decimals and no thousands separator ($12.345678,
    $1234.500000), rounded half-up from the exact amount (integer units when an int):
    the user guide's summary lines, which scripts parse with a plain number pattern."""
    value = units_to_usd(amount) if isinstance(amount, int) else amount
    text = f"{abs(value).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP):f}"
    return f"{'-' if value < 0 else ''}${text}"


def usd_to_units(value: object) -> int:
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
