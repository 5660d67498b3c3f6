"""What a report reads and keeps: record filters, dimensions, ``Query`` and its compiled ``Plan``."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Callable, Mapping, Sequence

from proxy.core.timestamps import UTC, iso_ms
from proxy.pricing import PriceBook, name_candidates, normalize_model

# A cube cell's key: the record dims' values as the records hold them (JSON values;
# ``NONE_LABEL`` for a missing one), then the time key ("2026-11-23T18") if time is kept.
CellKey = tuple[Any, ...]

# --- filters ---------------------------------------------------------------------------


class ModelMatcher:
    """``--model`` semantics: a name matches its own dated snapshots and whatever an alias
    points to, never a longer name (gpt-4o matches gpt-4o-2024-08-06, not gpt-4o-mini).
    A record matches on its requested ``model`` or its ``response_model``."""

    def __init__(self, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = {normalize_model(k): v for k, v in (aliases or {}).items()}
        wanted: set[str] = set()
        for name in names:
            current = normalize_model(name)
            for _ in range(4):  # alias chains, bounded against cycles
                wanted.add(current)
                target = self.aliases.get(current)
                if target is None:
                    break
                current = normalize_model(target)
        self.wanted = frozenset(wanted)
        self._memo: dict[str, bool] = {}

    def name_matches(self, name: object) -> bool:
        if not isinstance(name, str) or not name:
            return False
        hit = self._memo.get(name)
        if hit is None:
            hit = self._memo[name] = any(c in self.wanted for c in name_candidates(name, self.aliases))
        return hit

    def __call__(self, rec: Mapping[str, Any]) -> bool:
        return self.name_matches(rec.get("model")) or self.name_matches(rec.get("response_model"))


def is_error(rec: Mapping[str, Any]) -> bool:
    status = rec.get("status")
    return bool(rec.get("error")) or (isinstance(status, int) and status >= 400)


def status_matcher(specs: Sequence[str]) -> Callable[[Mapping[str, Any]], bool]:
    """``200``, ``429``, ``4xx``, ``5xx``, ``ok`` or ``error``; several are alternatives."""
    exact: set[int] = set()
    classes: set[int] = set()
    want_ok = want_err = False
    for spec in specs:
        s = spec.strip().lower()
        if s in ("ok", "success"):
            want_ok = True
        elif s in ("error", "errors", "failed"):
            want_err = True
        elif re.fullmatch(r"[1-5]xx", s):
            classes.add(int(s[0]))
        elif re.fullmatch(r"\d{3}", s):
            exact.add(int(s))
        else:
            raise ValueError(f"bad status {spec!r}: use a code (429), a class (5xx), ok or error")

    def match(rec: Mapping[str, Any]) -> bool:
        status = rec.get("status")
        if isinstance(status, int) and (status in exact or status // 100 in classes):
            return True
        if want_ok or want_err:
            err = is_error(rec)
            return (want_err and err) or (want_ok and not err)
        return False

    return match


def tag_value(rec: Mapping[str, Any], key: str) -> Any:
    """A tag, or a top-level attribution field of that name (``team``, ``session_id``),
    which later records carry outside ``tags``."""
    tags = rec.get("tags")
    if isinstance(tags, dict) and key in tags:
        return tags[key]
    if key in _TOP_LEVEL_TAGS:
        return rec.get(key)
    return None


_TOP_LEVEL_TAGS = frozenset({"team", "session_id", "session"})


# --- dimensions --------------------------------------------------------------------------

NONE_LABEL = "(none)"
# Internal (no --group-by takes it): a call's latency in whole milliseconds, so that a
# cube keyed by any dimensions and this one holds latency histograms per group.
LATENCY_DIM = "_latency_ms"
TTFT_DIM = "_ttft_ms"  # the same for the time to the reply's first byte


def _whole_ms(field_name: str) -> Callable[[Mapping[str, Any]], Any]:
    def get(r: Mapping[str, Any]) -> Any:
        ms = r.get(field_name)
        return int(ms + 0.5) if (type(ms) is float or type(ms) is int) and ms >= 0 else NONE_LABEL

    return get


def record_team(r: Mapping[str, Any]) -> Any:
    """The record's own team, as budgets count it (a team is its proxy key's, never a
    client's x-tag-team); only records older than the field fall back to the tag."""
    return r.get("team") if "team" in r else tag_value(r, "team")


def _dim_getter(dim: str) -> Callable[[Mapping[str, Any]], Any]:
    if dim.startswith("tag:"):
        key = dim[4:]
        return lambda r: tag_value(r, key) or NONE_LABEL
    simple = {
        "provider": "provider",
        "provider_type": "provider_type",
        "family": "provider_type",
        "response_model": "response_model",
        "user": "user_id",
        "key": "key_id",
        "endpoint": "endpoint",
        "service_tier": "service_tier",
        "finish_reason": "finish_reason",
    }
    if dim in simple:
        field_name = simple[dim]
        return lambda r: r.get(field_name) or NONE_LABEL
    if dim == "model":
        return lambda r: r.get("model") or r.get("response_model") or NONE_LABEL
    if dim == LATENCY_DIM:
        return _whole_ms("latency_ms")
    if dim == TTFT_DIM:
        return _whole_ms("ttft_ms")
    if dim == "status":
        return lambda r: str(r.get("status"))
    if dim in ("team", "session"):
        # The record's own field, as budgets count it (a team is its proxy key's, never a
        # client's x-tag-team); only records older than the field fall back to the tag.
        key = "session_id" if dim == "session" else dim
        return lambda r: (r.get(key) if key in r else tag_value(r, key)) or NONE_LABEL
    raise ValueError(dim)


TIME_DIMS = ("hour", "day", "week", "month")
RECORD_DIMS = (
    "provider",
    "model",
    "response_model",
    "provider_type",
    "user",
    "key",
    "endpoint",
    "status",
    "service_tier",
    "finish_reason",
    "team",
    "session",
)


def check_dim(dim: str) -> str:
    if dim in TIME_DIMS or dim in RECORD_DIMS or (dim.startswith("tag:") and len(dim) > 4):
        return dim
    raise ValueError(f"unknown group-by {dim!r}; use {', '.join(RECORD_DIMS + TIME_DIMS)} or tag:KEY")


# --- the query ---------------------------------------------------------------------------


@dataclass
class Query:
    """What to read and what to keep. Times are epoch seconds, ``end`` exclusive."""

    start: float | None = None
    end: float | None = None
    providers: Sequence[str] = ()
    models: Sequence[str] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    users: Sequence[str] = ()
    teams: Sequence[str] = ()  # the record's own team (record_team), not a tag
    statuses: Sequence[str] = ()
    errors_only: bool = False
    tags: Sequence[tuple[str, str]] = ()
    # Cube dimensions: record dims and at most the time dims; time is kept per UTC
    # hour (or minute, for a --tz with a half-hour offset) and rolled up later.
    dims: Sequence[str] = ("provider", "model")
    tz: tzinfo = UTC
    latency: bool = False  # per (provider, model) latency histograms
    top: int = 0  # keep the N most expensive requests
    pricebook: PriceBook | None = None  # for cache savings and suggestions; None: derive what we can
    savings: bool = False
    habits: bool = False  # per-model reply-length and cache-use counters, for suggestions

    def memo_key(self, time_width: int) -> tuple[Any, ...] | None:
        """Every term of the query but its window, as a hashable key (storage/memo.py);
        None when a term cannot be keyed. The price book counts by identity."""
        try:
            key = (
                tuple(self.providers),
                tuple(self.models),
                tuple(sorted(self.aliases.items())),
                tuple(self.users),
                tuple(self.teams),
                tuple(self.statuses),
                self.errors_only,
                tuple(self.tags),
                tuple(self.dims),
                self.tz,
                self.latency,
                self.top,
                id(self.pricebook) if self.pricebook is not None else None,
                self.savings,
                self.habits,
                time_width,
            )
            hash(key)
        except TypeError:
            return None
        return key

    def record_filter(self) -> Callable[[Mapping[str, Any]], bool] | None:
        tests: list[Callable[[Mapping[str, Any]], bool]] = []
        if self.providers:
            wanted = {p.lower() for p in self.providers}
            tests.append(lambda r: str(r.get("provider") or "").lower() in wanted)
        if self.models:
            tests.append(ModelMatcher(self.models, self.aliases))
        if self.users:
            users = set(self.users)
            tests.append(lambda r: r.get("user_id") in users)
        if self.teams:
            teams = set(self.teams)
            tests.append(lambda r: record_team(r) in teams)
        if self.statuses:
            tests.append(status_matcher(self.statuses))
        if self.errors_only:
            tests.append(is_error)
        if self.tags:
            by_key: dict[str, set[str]] = {}
            for k, v in self.tags:
                by_key.setdefault(k, set()).add(v)

            # Same key repeated: alternatives; different keys: all must hold.
            def has_tag(k: str, vs: set[str]) -> Callable[[Mapping[str, Any]], bool]:
                return lambda r: tag_value(r, k) in vs

            tests.extend(has_tag(k, vs) for k, vs in by_key.items())
        if not tests:
            return None
        if len(tests) == 1:
            return tests[0]
        return lambda r: all(t(r) for t in tests)


def _whole_hour_tz(tz: tzinfo, start: float | None, end: float | None) -> bool:
    probes = [t for t in (start, end) if t is not None] + [time.time()]
    year = datetime.now(UTC).year
    probes += [datetime(year, m, 1, tzinfo=UTC).timestamp() for m in (1, 7)]
    for t in probes:
        off = datetime.fromtimestamp(t, UTC).astimezone(tz).utcoffset()
        if off is not None and off.total_seconds() % 3600:
            return False
    return True


@dataclass(slots=True)
class Plan:
    lo: str | None
    hi: str | None
    lo_b: bytes | None
    hi_b: bytes | None
    keep: Callable[[Mapping[str, Any]], bool] | None
    key: Callable[[Mapping[str, Any], str], CellKey] | None  # None: (provider, model), inlined
    time_width: int  # 0: no time dim; 13: UTC hour; 16: UTC minute
    query: Query
    spans: bool = False  # keep each cell's first and last timestamp (index builds)


def compile_query(q: Query) -> Plan:
    rec_dims = [d for d in q.dims if d not in TIME_DIMS]
    getters = [_dim_getter(d) for d in rec_dims]
    width = 0
    if any(d in TIME_DIMS for d in q.dims):
        width = 13 if _whole_hour_tz(q.tz, q.start, q.end) else 16
    # The key function is the hot path: the common shapes get a closure without loops.
    key: Callable[[Mapping[str, Any], str], CellKey] | None
    if rec_dims == ["provider", "model"] and not width:
        key = None  # inlined in accumulate
    elif rec_dims == ["provider", "model"]:

        def key(r: Mapping[str, Any], ts: str) -> CellKey:
            return (r.get("provider") or NONE_LABEL, r.get("model") or r.get("response_model") or NONE_LABEL, ts[:width])
    elif width:

        def key(r: Mapping[str, Any], ts: str) -> CellKey:
            return (*[g(r) for g in getters], ts[:width])
    else:

        def key(r: Mapping[str, Any], ts: str) -> CellKey:
            return tuple([g(r) for g in getters])

    lo = iso_ms(q.start, ceil=True) if q.start is not None else None
    hi = iso_ms(q.end, ceil=True) if q.end is not None else None
    return Plan(lo, hi, lo.encode() if lo else None, hi.encode() if hi else None, q.record_filter(), key, width, q)
