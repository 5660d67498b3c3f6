"""Budget spend rebuilt from the log at start-up and by the ``budgets`` and ``keys``
commands: the records of the current periods, read from the log's tail, handed to
``engine.replay``."""

from __future__ import annotations

import os

from proxy.budgets import BudgetLedger
from proxy.engine.replay import LATE_SLACK, replay_records, replay_start
from proxy.storage.logfiles import records_since


def replay_log(
    ledger: BudgetLedger, path: str | os.PathLike[str], now: float | None = None, until: tuple[int, int, int] | None = None
) -> tuple[int, int]:
    """Rebuild the current periods' spend from the log at ``path``: (records read, records
    counted); ``until``: up to where a log follower takes over (``records_since``)."""
    now = ledger.clock() if now is None else now
    if not ledger.dims:
        return 0, 0
    return replay_records(ledger, records_since(path, replay_start(ledger, now), slack=LATE_SLACK, until=until), now)
