"""What the roll-up index keeps of each line (``INDEX_DIMS``, ``index_key``,
``index_plan``) and the roll-up of a segment's lines (``roll_up``): msgspec's fast path
where it is installed and the lines are plain, the scan's own loop otherwise. Both give
the same cells, counts and repeats; the tests check one against the other."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from proxy.engine.cube import ScanResult, new_result
from proxy.engine.lines import Dedupe, accumulate, select
from proxy.engine.query import Plan, Query

try:
    from proxy.engine import rollup_msgspec
except ImportError:  # msgspec is an optional extra ("reports"): the pure loop does the same job
    rollup_msgspec = None  # type: ignore[assignment]

INDEX_DIMS = ("provider", "provider_type", "model", "response_model", "endpoint", "status")


def index_key(r: Mapping[str, Any], ts: str) -> tuple[Any, ...]:
    """A roll-up cell: the record's INDEX_DIMS as JSON values, whether it failed, its UTC hour."""
    status = r.get("status")
    return (
        r.get("provider"),
        r.get("provider_type"),
        r.get("model"),
        r.get("response_model"),
        r.get("endpoint"),
        status,
        1 if (r.get("error") or (type(status) is int and status >= 400)) else 0,
        ts[:13],
    )


def index_plan() -> Plan:
    return Plan(None, None, None, None, None, index_key, 13, Query(dims=()), spans=True)


def fast_path() -> bool:
    """Whether ``roll_up`` can take msgspec's path."""
    return rollup_msgspec is not None


def roll_up(lines: Sequence[bytes], plan: Plan, res: ScanResult, dedupe: Dedupe, fast: bool = True) -> tuple[list[int], list[Any]] | None:
    """Add ``lines`` (an index segment's, in order; ``plan`` from ``index_plan``) to
    ``res`` as ``accumulate`` does. When every line took the fast path, returns each
    line's hash and ``record_id``: what the next segment's ``Dedupe`` is primed from."""
    if fast and rollup_msgspec is not None:
        seen = rollup_msgspec.roll_up(lines, res, dedupe)
        if seen is not None:
            return seen
    accumulate(lines, plan, res, dedupe)
    return None


def primed_from(lines: Iterable[bytes], plan: Plan) -> Dedupe:
    """A Dedupe that has seen ``lines`` as ``select`` sees them (``storage.tasks.primed``
    reads the lines before a byte range and calls this)."""
    chunk = list(lines)
    if rollup_msgspec is not None:
        rids = rollup_msgspec.record_ids(chunk)
        if rids is not None:
            dd = Dedupe()
            for line, rid in zip(chunk, rids):
                dd.feed(hash(line), rid)
            return dd
    dd = Dedupe()
    for _ in select(chunk, plan, new_result(plan), dd):
        pass
    return dd
