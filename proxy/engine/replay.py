"""Budget spend rebuilt from records: the current periods' sums per (dimension, value),
added to a ledger in one step. Pure: the records come from the caller
(``storage.replay.replay_log`` reads them from the log).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from proxy.budgets import SESSION_WINDOW, BudgetLedger
from proxy.core.money import cost_units
from proxy.core.timestamps import iso_ms, parse_timestamp

_INF = math.inf


_FIELDS = {"user": "user_id", "team": "team", "key": "key_id", "session": "session_id"}
# Records are written when a call ends but stamped when it began: a long call's line
# can sit after later ones. Reading the log from this much before a period start is
# enough to find them all (the proxy gives up on a silent upstream after read_timeout).
LATE_SLACK = 86400


class _Spend:
    """One (dimension, value)'s spend in the records so far: cost units, latest record time."""

    __slots__ = ("units", "last")

    def __init__(self, units: int, last: str) -> None:
        self.units = units
        self.last = last


def replay_start(ledger: BudgetLedger, now: float) -> float:
    """The earliest record time a replay at ``now`` needs (read from ``LATE_SLACK`` before it)."""
    return ledger.window_start(now) - 1


def replay_records(ledger: BudgetLedger, records: Iterable[Mapping[str, Any]], now: float) -> tuple[int, int]:
    """Add the current periods' spend in ``records`` to ``ledger``: (records read, records counted).

    Fast path for a month of records: timestamps compare as text (the proxy writes one
    canonical UTC form), and integer units are summed per (dimension, value) before the
    ledger is touched."""
    if not ledger.dims:
        return 0, 0
    plan = []
    for dim in ledger.dims:
        scope, tag, period = dim
        lo, hi = (now - SESSION_WINDOW, _INF) if period is None else ledger.bounds(period, now)
        plan.append((dim, _FIELDS.get(scope), scope == "global", tag, iso_ms(max(lo, 0.0)), "~" if hi == _INF else iso_ms(hi)))
    sums: dict[tuple[tuple[str, str | None, str | None], str], _Spend] = {}
    read = counted = 0
    for rec in records:
        read += 1
        ts = rec["timestamp"]  # canonical UTC text: compares as time
        units = cost_units(rec.get("total_cost")) or 0
        hit = False
        for dim, field_name, is_global, tag, lo_ts, hi_ts in plan:
            if not (lo_ts <= ts < hi_ts):
                continue
            if is_global:
                value: object = "*"
            elif tag is not None:
                tags = rec.get("tags")
                value = tags.get(tag) if isinstance(tags, dict) else None
            else:
                value = rec.get(field_name) if field_name else None
            if not isinstance(value, str):
                continue
            acc = sums.get((dim, value))
            if acc is None:
                sums[(dim, value)] = _Spend(units, ts)
            else:
                acc.units += units
                if ts > acc.last:
                    acc.last = ts
            hit = True
        counted += hit
    for (dim, value), acc in sums.items():
        ledger.add_spent(dim, value, acc.units, parse_timestamp(acc.last), now)
    return read, counted
