"""``Report``: a finished scan and what is needed to describe it, shared by every format."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Sequence

from proxy.core.timestamps import ts_to_datetime
from proxy.engine.cube import ScanResult
from proxy.engine.query import TIME_DIMS
from proxy.engine.totals import Totals
from proxy.reports.request import ReportRequest
from proxy.reports.window import Window


@dataclass
class Report:
    """Everything a format prints: the scan plus the context to describe it."""

    request: ReportRequest
    window: Window
    now: datetime
    files: list[Path]
    res: ScanResult
    group_dims: list[str]
    config: Any = None
    book: Any = None
    filters: dict[str, Any] = field(default_factory=dict)
    extras: Any = None  # reports.extra.Extras: the sections with scans of their own
    # --latency with --group-by: per group, (requests, errors, timed calls, p50 ms, p95 ms)
    group_latency: dict[tuple[Any, ...], tuple[int, int, int, float | None, float | None]] | None = None

    @property
    def tz(self) -> tzinfo:
        return self.window.tz

    def span(self) -> tuple[datetime | None, datetime]:
        """The time the report covers: the window, or the data where the window is open."""
        start = self.window.start or (ts_to_datetime(self.res.first_ts) if self.res.first_ts else None)
        # A calendar period still running ends now, not at its end.
        end = min(self.window.end, self.now) if self.window.end else self.now
        return start, end

    def shown_span(self) -> tuple[datetime | None, datetime]:
        """``span`` as the text formats print it: a window reaching far back before the
        log (--since 100000) is shown from the first record."""
        start, end = self.span()
        if start is not None and self.res.first_ts:
            first = ts_to_datetime(self.res.first_ts)
            if first - start > timedelta(days=1):
                start = first
        return start, end


def sorted_groups(r: Report, dims: Sequence[str]) -> list[tuple[tuple, Totals]]:
    groups = r.res.rollup(dims)
    if dims and dims[0] in TIME_DIMS:
        return sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
    return sorted(groups.items(), key=lambda kv: (-kv[1].cost_units, tuple(str(x) for x in kv[0])))
