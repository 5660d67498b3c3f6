"""What ``GET /metrics`` reports, kept as records are written: per label set a
``Totals`` (the one aggregation engine: cost, tokens, requests, errors, unpriced and
unknown usage), request counts by HTTP status and the histogram buckets of duration,
time to first chunk and tokens per call. Pure: the Prometheus rendering is in
``proxy.web.metrics``.

Labels are provider and model (the requested model, else the one the reply named, as
reports name it), plus the opt-in ``user``, ``team`` and ``tag:NAME`` of
``metrics.labels``. Each client-chosen label keeps at most ``max_label_values``
distinct values; later values are counted under ``other``, so a client inventing model
names or user ids cannot grow the series (or this process's memory) without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeGuard

from proxy.engine.query import NONE_LABEL
from proxy.engine.totals import Totals

OTHER = "other"
# OpenTelemetry GenAI semantic conventions' advisory boundaries: seconds for
# gen_ai.client.operation.duration and .time_to_first_chunk, tokens for .token.usage.
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(14))  # 1, 4, 16 … 67108864
# gen_ai.token.type values and the record field each counts (the semconv's two
# well-known types; cache and reasoning counts are parts of these).
HISTOGRAM_TOKEN_TYPES: tuple[tuple[str, str], ...] = (("input", "input_tokens"), ("output", "output_tokens"))

Getter = Callable[[Mapping[str, Any]], Any]


class Histogram:
    """Bucket counts (not cumulative) for fixed upper bounds, the last one +Inf."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": a value on a bound is in it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts, h.sum, h.count = self.counts.copy(), self.sum, self.count
        return h

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class Series:
    """One label set's tallies."""

    labels: tuple[str, ...]
    totals: Totals = field(default_factory=Totals)
    statuses: dict[str, int] = field(default_factory=dict)
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    ttft: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    tokens: dict[str, Histogram] = field(default_factory=lambda: {t: Histogram(TOKEN_BUCKETS) for t, _ in HISTOGRAM_TOKEN_TYPES})

    def add(self, rec: Mapping[str, Any]) -> None:
        # Run for every call the proxy makes: type() tests where _number would be a call
        # (bool is not a number here: type(True) is bool).
        get = rec.get
        self.totals.add(rec)
        status = str(get("status"))
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        latency = get("latency_ms")
        if type(latency) is float or type(latency) is int:  # null for a call recorded by `proxy log`: nothing was timed
            self.duration.observe(latency / 1000)
        if get("is_streaming"):
            # The semconv's time to first chunk is for streams only; a buffered reply's
            # first byte comes with its last.
            ttft = get("ttft_ms")
            if _number(ttft):
                self.ttft.observe(ttft / 1000)
        # Token usage only for calls that used tokens: not for unknown usage (a cut
        # stream), nor for calls nobody bills (upstream errors, model lists: 0 tokens).
        if get("total_tokens"):
            for kind, name in HISTOGRAM_TOKEN_TYPES:
                n = get(name)
                if type(n) is int or type(n) is float:
                    self.tokens[kind].observe(n)

    def copy(self) -> Series:
        totals = Totals()
        totals.merge(self.totals)
        return Series(
            self.labels,
            totals,
            self.statuses.copy(),
            self.duration.copy(),
            self.ttft.copy(),
            {kind: h.copy() for kind, h in self.tokens.items()},
        )


class LabelCap:
    """The distinct values one client-chosen label has had, at most ``limit`` of them;
    a value first seen after that is ``OTHER``. Admitted values stay for the process's
    life, so a counter never moves between series."""

    __slots__ = ("limit", "seen", "overflow")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.overflow = 0  # records counted under OTHER

    def admit(self, value: str, may_add: bool = True) -> bool:
        """Whether ``value`` has (or now gets) a series of its own; ``may_add`` False: only
        if it has one already (a failed call's model name must not take a slot)."""
        if value in self.seen or value == NONE_LABEL:
            return True
        if not may_add or len(self.seen) >= self.limit:
            self.overflow += 1
            return False
        self.seen.add(value)
        return True


def label_name(option: str) -> str:
    """The Prometheus label for a ``metrics.labels`` entry: ``user``, ``team``, and
    ``tag:NAME`` as ``tag_NAME`` with ``-`` as ``_`` (label names allow no dash)."""
    if option.startswith("tag:"):
        return "tag_" + option[4:].replace("-", "_")
    return option


def _getter(option: str) -> Getter:
    if option == "user":
        return lambda r: r.get("user_id")
    if option == "team":
        return lambda r: r.get("team")
    if option.startswith("tag:"):
        name = option[4:]

        def tag(r: Mapping[str, Any]) -> Any:
            tags = r.get("tags")
            return tags.get(name) if isinstance(tags, dict) else None

        return tag
    raise ValueError(f"unknown metrics label {option!r}")


def _text(value: Any) -> str:
    if value is None or value == "":
        return NONE_LABEL
    return value if isinstance(value, str) else str(value)


class MetricsTally:
    """Fed every record the proxy writes (``add(record, line)``, a record sink)."""

    def __init__(self, labels: Sequence[str] = (), max_label_values: int = 100, max_series: int = 1000) -> None:
        names = ["provider", "model"]
        for option in labels:
            name = label_name(option)
            while name in names:  # tag:a-b and tag:a_b: both would be tag_a_b
                name += "_"
            names.append(name)
        self.label_names: tuple[str, ...] = tuple(names)
        self._getters: tuple[Getter, ...] = tuple(_getter(o) for o in labels)
        # The provider is a config.yml name (or "(unknown)"): not client-chosen, not capped.
        self.caps: dict[str, LabelCap] = {name: LabelCap(max_label_values) for name in self.label_names[1:]}
        self._cap_list = tuple(self.caps[name] for name in self.label_names[1:])
        self.series: dict[tuple[str, ...], Series] = {}
        # Each label's cap bounds its values, not their combinations (100 models x 100
        # users): past ``max_series`` a new combination is counted under its provider
        # with every other label OTHER.
        self.max_series = max_series
        self.series_overflow = 0
        # Raw label values -> their series: one lookup per record once a combination
        # has been seen. Only combinations without an OTHER are kept here, so its size
        # is bounded by the caps like the series themselves.
        self._by_raw: dict[tuple[Any, ...], Series] = {}

    def add(self, rec: Mapping[str, Any], line: bytes = b"") -> None:
        model = rec.get("model") or rec.get("response_model")
        if self._getters:
            raw: tuple[Any, ...] = (rec.get("provider"), model, *(g(rec) for g in self._getters))
        else:
            raw = (rec.get("provider"), model)
        series = self._by_raw.get(raw)
        if series is None:
            status = rec.get("status")
            # Refused as the client's fault (no such model, bad key): not a rate limit,
            # nor a client that left (499).
            refused = isinstance(status, int) and 400 <= status < 499 and status != 429
            series = self._place(raw, refused)
        series.add(rec)

    def snapshot(self) -> tuple[list[Series], dict[str, int]]:
        """A copy of every series and of each capped label's overflow count, to render
        elsewhere (another thread) while records keep arriving here."""
        overflow = {name: cap.overflow for name, cap in self.caps.items()}
        overflow["series"] = self.series_overflow
        return [s.copy() for s in self.series.values()], overflow

    def _place(self, raw: tuple[Any, ...], refused: bool) -> Series:
        values = [_text(v) for v in raw]
        capped = False
        for i, cap in enumerate(self._cap_list, 1):
            # A model name from a call refused as the client's fault (404: no such model)
            # is whatever the client typed: it gets no slot of its own.
            if not cap.admit(values[i], may_add=not (refused and i == 1)):
                values[i] = OTHER
                capped = True
        key = tuple(values)
        series = self.series.get(key)
        if series is None and len(self.series) >= self.max_series:
            self.series_overflow += 1
            key = (values[0], *([OTHER] * (len(values) - 1)))
            capped = True
            series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(key)
        if not capped:
            self._by_raw[raw] = series
        return series
