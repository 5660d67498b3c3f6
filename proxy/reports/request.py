"""What a report is asked for: ``ReportRequest``, built by the command line from its
options (and, to come, by the analytics HTTP API from a query). Plain values only; parsing them into a
time window, filters and dimensions is ``reports.window`` and ``reports.build``."""

from __future__ import annotations

from dataclasses import dataclass, replace

FORMATS = ("summary", "detailed", "csv", "json", "hourly", "daily", "weekly", "monthly")
SERIES = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}


@dataclass(frozen=True)
class ReportRequest:
    # input
    file: tuple[str, ...] = ()  # log files, globs or directories; () = the default log
    no_rotated: bool = False
    config: str = "config.yml"
    jobs: int | None = None
    no_index: bool = False
    # time
    since: str | None = None  # "24", "36h", "7d", "all"; None with no other window: 24 hours
    start_date: str | None = None
    end_date: str | None = None
    period: str | None = None  # one of core.periods.NAMED_PERIODS
    tz: str = "UTC"
    # output
    format: str = "summary"
    output: str | None = None
    group_by: tuple[str, ...] = ()
    limit: int | None = None
    latency: bool = False
    top: int = 0
    savings: bool = False
    projection: bool = False
    suggest: bool = False
    shares: bool = False  # the provider and model tables with shares and averages
    compare: bool = False  # today vs yesterday, this week vs last week
    sessions: bool = False
    sessions_sort: str = "recent"  # recent, cost, tokens or requests
    min_cost: str | None = None  # a session's cost range (USD), for --sessions
    max_cost: str | None = None
    users: bool = False  # active users and cost per active user
    # filters
    provider: tuple[str, ...] = ()
    model: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    team: tuple[str, ...] = ()  # the record's own team (its proxy key's)
    status: tuple[str, ...] = ()
    errors_only: bool = False
    tag: tuple[str, ...] = ()  # KEY=VALUE

    def with_all_sections(self) -> ReportRequest:
        """``--all``: every extra section, and the top 10 requests unless a count was given."""
        return replace(
            self,
            latency=True,
            savings=True,
            projection=True,
            suggest=True,
            shares=True,
            compare=True,
            sessions=True,
            users=True,
            top=self.top or 10,
        )

    @property
    def any_section(self) -> bool:
        return bool(
            self.latency
            or self.top
            or self.savings
            or self.projection
            or self.suggest
            or self.shares
            or self.compare
            or self.sessions
            or self.users
        )
