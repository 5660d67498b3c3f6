"""The /metrics tally (proxy/engine/metrics_tally.py) over arbitrary record streams: the
label cap keeps each client-chosen label to max_label_values values plus "other",
admits the first values in order of arrival, and loses nothing (its series add up to
one ``Totals`` of every record); histogram buckets are Prometheus's "less or equal"."""

from __future__ import annotations

from decimal import Decimal
from itertools import product

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engine.metrics_tally import DURATION_BUCKETS, OTHER, Histogram, MetricsTally, label_name
from proxy.engine.query import NONE_LABEL
from proxy.engine.totals import Totals

NAMES = ["a", "b", "c", "d", "e", "other", "", None]
# Few draws per record (each costs Hypothesis ~0.1 ms): the five names are the base-8
# digits of one integer, status, error and stream flag the digits of another. Built
# once: a strategy made inside the composite is validated again on every draw.
NAME_DIGITS = st.integers(0, 8**6 - 1)
FLAGS = st.integers(0, 5 * 3 * 2 - 1)
TOKENS = st.one_of(st.none(), st.tuples(st.integers(0, 10**7), st.integers(0, 10**6), st.one_of(st.none(), st.integers(0, 10**12))))
MS = st.one_of(st.none(), st.floats(0, 200_000, allow_nan=False))
PROVIDERS = ["openai", "anthropic", "(unknown)"]
STATUSES = [200, 404, 429, 499, 500]
ERRORS = [None, None, "upstream 500"]


@st.composite
def records(draw: st.DrawFn) -> dict:
    n = draw(NAME_DIGITS)
    model, response_model, user, team, project, has_tags = (NAMES[(n >> (3 * i)) & 7] for i in range(6))
    f = draw(FLAGS)
    usage = draw(TOKENS)
    tokens, out, units = usage if usage is not None else (None, None, None)
    cost = Decimal(units).scaleb(-10) if units is not None else None
    return {
        "provider": PROVIDERS[n % 3],
        "model": model,
        "response_model": response_model,
        "user_id": user,
        "team": team,
        "tags": {"project": project} if has_tags in ("a", "b", "c", "d") else {},
        "status": STATUSES[f % 5],
        "error": ERRORS[f // 5 % 3],
        "input_tokens": tokens,
        "output_tokens": out,
        "total_tokens": tokens + out if tokens is not None and out is not None else None,
        "cache_read_tokens": 0 if tokens is not None else None,
        "total_cost": cost,
        "input_cost": cost,
        "output_cost": Decimal(0) if cost is not None else None,
        "latency_ms": draw(MS),
        "ttft_ms": draw(MS),
        "is_streaming": f // 15 == 1,
    }


def raw_value(rec: dict, label: str) -> str:
    v = {
        "model": rec["model"] or rec["response_model"],
        "user": rec["user_id"],
        "team": rec["team"],
        "tag_project": rec["tags"].get("project"),
    }[label]
    return v if v else NONE_LABEL


@settings(max_examples=100, deadline=None)
@given(recs=st.lists(records(), max_size=40), cap=st.integers(1, 4))
def test_label_cap_bounds_the_series_and_loses_nothing(recs, cap):
    tally = MetricsTally(("user", "team", "tag:project"), cap)
    for rec in recs:
        tally.add(rec, b"")
    assert tally.label_names == ("provider", "model", "user", "team", "tag_project")

    for i, label in enumerate(tally.label_names[1:], 1):
        # Admitted: the first `cap` distinct values, in order of arrival ("(none)" is no
        # value); a model only from a call not refused as the client's fault (4xx but 429).
        admitted: list[str] = []
        overflow = 0
        for r in recs:
            v = raw_value(r, label)
            if v == NONE_LABEL or v in admitted:
                continue
            if len(admitted) < cap and not (label == "model" and 400 <= r["status"] < 499 and r["status"] != 429):
                admitted.append(v)
            else:
                overflow += 1
        seen = {key[i] for key in tally.series}
        assert seen <= {*admitted, OTHER, NONE_LABEL}
        assert seen >= set(admitted)
        assert tally.caps[label].overflow == overflow
    assert len(tally.series) <= 3 * (cap + 2) ** 4

    # Every record counted once, in one series: together they are the Totals of all.
    everything, merged = Totals(), Totals()
    for rec in recs:
        everything.add(rec)
    for s in tally.series.values():
        merged.merge(s.totals)
        assert sum(s.statuses.values()) == s.totals.requests
    assert merged == everything
    series = tally.series.values()
    assert sum(s.duration.count for s in series) == sum(1 for r in recs if r["latency_ms"] is not None)
    assert sum(s.ttft.count for s in series) == sum(1 for r in recs if r["is_streaming"] and r["ttft_ms"] is not None)
    assert sum(s.tokens["input"].count for s in series) == sum(1 for r in recs if r["total_tokens"])
    assert sum(s.tokens["input"].sum for s in series) == sum(r["input_tokens"] for r in recs if r["total_tokens"])


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.one_of(st.floats(0, 100, allow_nan=False), st.sampled_from(DURATION_BUCKETS)), max_size=40))
def test_histogram_buckets_count_values_at_or_below_each_bound(values):
    h = Histogram(DURATION_BUCKETS)
    for v in values:
        h.observe(v)
    buckets = h.cumulative()
    assert [b for b, _ in buckets] == [*DURATION_BUCKETS, float("inf")]
    for bound, n in buckets:
        assert n == sum(1 for v in values if v <= bound)
    assert h.count == len(values) and h.sum == sum(values)


def test_tag_label_names_are_prometheus_names_and_never_collide():
    assert label_name("tag:my-project") == "tag_my_project"
    tally = MetricsTally(("tag:a-b", "tag:a_b", "user"), 5)
    assert tally.label_names == ("provider", "model", "tag_a_b", "tag_a_b_", "user")
    tally.add({"provider": "openai", "model": "m", "tags": {"a-b": "x", "a_b": "y"}, "user_id": "u", "status": 200}, b"")
    assert list(tally.series) == [("openai", "m", "x", "y", "u")]


def test_one_lookup_per_record_once_a_combination_is_known():
    """The hot path: a known combination goes straight to its series; a capped one
    (OTHER) is not remembered by its raw values, so invented names cannot grow memory."""
    tally = MetricsTally(("user",), 2)
    for model, user in product(["m1", "m2", "m3"], [f"u{i}" for i in range(50)]):
        tally.add({"provider": "openai", "model": model, "user_id": user, "status": 200}, b"")
    assert len(tally.series) <= 3 * 3
    assert len(tally._by_raw) == 4  # (m1|m2) x (u0|u1)


def test_combinations_are_bounded_by_max_series_not_only_each_label():
    """Each label's cap bounds its values, not their product: 30 models x 30 users at a
    cap of 30 would be 900 series. Past max_series the rest go to (provider, other, …)."""
    tally = MetricsTally(("user",), max_label_values=30, max_series=50)
    for m in range(30):
        for u in range(30):
            tally.add({"provider": "openai", "model": f"m{m}", "user_id": f"u{u}", "status": 200, "total_tokens": 1}, b"")
    assert len(tally.series) == 51  # 50, and the one they overflow into
    assert ("openai", OTHER, OTHER) in tally.series
    series, overflow = tally.snapshot()
    assert overflow["series"] == 900 - 50 and sum(s.totals.requests for s in series) == 900


def test_a_model_name_the_upstream_refused_takes_no_slot():
    tally = MetricsTally((), max_label_values=2)
    for i in range(5):
        tally.add({"provider": "openai", "model": f"junk-{i}", "status": 404}, b"")
    tally.add({"provider": "openai", "model": "gpt-4o", "status": 200}, b"")
    tally.add({"provider": "openai", "model": "gpt-4o", "status": 404}, b"")  # admitted already: its own series
    assert set(tally.series) == {("openai", OTHER), ("openai", "gpt-4o")}
    assert tally.series[("openai", "gpt-4o")].totals.requests == 2
