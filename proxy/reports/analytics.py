"""The analytics API's answers (docs/api.md): a query string made into the report
request the CLI would build, run by the one engine (``build.prepare`` and ``aggregate``),
and shaped as each endpoint's JSON. No aiohttp here: the web shell calls ``answer`` in a
worker process and sends the bytes it returns."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Sequence

import orjson

from proxy.config import Config, pricebook_for
from proxy.core.money import units_to_usd, usd_to_units
from proxy.core.records import json_default
from proxy.engine.cube import ScanResult
from proxy.engine.query import NONE_LABEL
from proxy.engine.totals import Totals
from proxy.errors import UsageError
from proxy.reports.advice import projection, savings, suggestions
from proxy.reports.api_query import (
    EPOCH,
    MAX_DAYS,
    MAX_HOURLY_DAYS,
    MAX_LIMIT,
    Asked,
    Viewer,
    parse_params,
    usd_param,
    whole_number,
)
from proxy.reports.build import Prepared, aggregate, prepare
from proxy.reports.csvfile import write_request_csv
from proxy.reports.extra import SESSION_SORTS
from proxy.reports.jsondoc import projection_json
from proxy.reports.model import Report
from proxy.reports.numbers import exact, ratio, record_decimal
from proxy.reports.request import ReportRequest
from proxy.reports.text import tz_name
from proxy.reports.window import get_tz, parse_when
from proxy.storage.logfiles import log_files, order_files
from proxy.storage.memo import SegmentMemo
from proxy.storage.orphan import exit_with_parent
from proxy.storage.scan import iter_selected

# --- shaping --------------------------------------------------------------------------------


def rate(t: Totals) -> float | None:
    return round((t.requests - t.errors) / t.requests, 6) if t.requests else None


def token_counts(t: Totals) -> dict[str, int]:
    tok = t.tokens
    return {
        "input_tokens": tok["input_tokens"],
        "output_tokens": tok["output_tokens"],
        "cache_read_tokens": tok["cache_read_tokens"],
        "cache_write_tokens": tok["cache_write_tokens"],
        "total_tokens": tok["total_tokens"],
    }


def totals_fields(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "errors": t.errors,
        "success_rate": rate(t),
        **token_counts(t),
        "reasoning_tokens": t.tokens["reasoning_tokens"],
        "total_cost": exact(t.total_cost),
        "avg_cost_per_request": exact(ratio(t.total_cost, t.requests)),
        "unpriced_requests": t.unpriced,
        "cost_is_lower_bound": t.incomplete,
    }


def period_json(r: Report) -> dict[str, Any]:
    start, end = r.span()
    return {
        "start": start.isoformat() if start else None,
        "end": end.isoformat(),
        "tz": tz_name(r.tz),
        "label": r.window.label,
    }


def _by_cost(rows: dict[tuple[Any, ...], Totals]) -> list[tuple[tuple[Any, ...], Totals]]:
    return sorted(rows.items(), key=lambda kv: (-kv[1].cost_units, tuple(str(x) for x in kv[0])))


def by_provider(res: ScanResult) -> list[dict[str, Any]]:
    return [
        {
            "provider": k[0],
            "requests": t.requests,
            "errors": t.errors,
            "success_rate": rate(t),
            "total_tokens": t.tokens["total_tokens"],
            "total_cost": exact(t.total_cost),
        }
        for k, t in _by_cost(res.rollup(["provider"]))
    ]


def by_model(res: ScanResult) -> list[dict[str, Any]]:
    return [
        {"provider": k[0], "model": k[1], "requests": t.requests, "errors": t.errors, **token_counts(t), "total_cost": exact(t.total_cost)}
        for k, t in _by_cost(res.rollup(["provider", "model"]))
    ]


def _steps(r: Report, dim: str) -> list[str]:
    """Every day (or hour) of the report's span in its time zone, as the cube labels them."""
    start, end = r.span()
    if start is None:
        return []
    tz = r.tz
    t = start.astimezone(tz)
    t = t.replace(minute=0, second=0, microsecond=0) if dim == "hour" else t.replace(hour=0, minute=0, second=0, microsecond=0)
    out: list[str] = []
    step = timedelta(hours=1) if dim == "hour" else timedelta(days=1)
    while t < end and len(out) < MAX_DAYS * 24:
        label = t.strftime("%Y-%m-%d %H:00") if dim == "hour" else t.strftime("%Y-%m-%d")
        if not out or out[-1] != label:  # a repeated hour when clocks go back
            out.append(label)
        # Wall-clock steps: the next day is the same hour tomorrow, whatever the offset.
        t = (t.replace(tzinfo=None) + step).replace(tzinfo=tz) if dim == "day" else (t + step).astimezone(tz)
    return out


def series(r: Report, dim: str, fields: Callable[[Totals], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per day or hour of the span, oldest first, zero-filled."""
    rows = {k[0]: t for k, t in r.res.rollup([dim]).items()}
    labels = _steps(r, dim)
    labels += sorted(set(rows) - set(labels))  # a record beyond the span still counts
    name = "date" if dim == "day" else "hour"
    out = []
    for label in sorted(labels):
        t = rows.get(label, Totals())
        out.append({name: label.replace(" ", "T") if dim == "hour" else label, **fields(t)})
    return out


def day_fields(t: Totals) -> dict[str, Any]:
    return {"requests": t.requests, "errors": t.errors, **token_counts(t), "total_cost": exact(t.total_cost)}


def _percentiles(values: tuple[int, int, int, float | None, float | None] | None) -> dict[str, float | None]:
    if values is None:
        return {"p50": None, "p95": None}
    return {"p50": values[3], "p95": values[4]}


# --- the endpoints ---------------------------------------------------------------------------


def _run(p: Prepared) -> Report:
    # One process: the proxy keeps the other core. The memo makes a repeated query shape
    # read only what changed (storage/memo.py).
    return aggregate(p, jobs=1, memo=_WORKER.get("memo"))


def _prepared(req: ReportRequest, now: datetime, config: Config) -> Prepared:
    # The proxy's log and its rotated parts; none yet (no call made) is an empty report.
    try:
        files = order_files(log_files(list(req.file), rotated=True))
    except FileNotFoundError:
        files = []
    return prepare(req, now, config=config, use_config=True, files=files, book=_WORKER.get("book"))


def _interval(asked: Asked, p: Prepared) -> str:
    interval = asked.extra.get("interval", "day")
    if interval not in ("day", "hour"):
        raise UsageError(f"interval: expected day or hour, got {interval[:20]!r}", "interval")
    if interval == "hour":
        start = p.window.start
        end = p.window.end or p.now
        if start is None or end - start > timedelta(days=MAX_HOURLY_DAYS):
            raise UsageError(f"interval: hour is for windows up to {MAX_HOURLY_DAYS} days", "interval")
    return interval


def usage(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    # The cube keeps time by the hour whatever the group: one scan serves days and hours.
    p = _prepared(replace(asked.request, group_by=("day",)), now, config)
    hourly = _interval(asked, p) == "hour"
    r = _run(p)
    body: dict[str, Any] = {"period": period_json(r), "filters": r.filters, **totals_fields(r.res.totals())}
    body["by_provider"] = by_provider(r.res)
    body["by_model"] = by_model(r.res)
    body["daily"] = series(r, "day", day_fields)
    if hourly:
        body["hourly"] = series(r, "hour", day_fields)
    return body


def _window_totals(req: ReportRequest, now: datetime, config: Config, start: datetime, end: datetime) -> tuple[Totals, Report]:
    shifted = replace(req, since=None, start_date=start.isoformat(), end_date=end.isoformat(), group_by=(), period=None)
    r = _run(_prepared(shifted, now, config))
    return r.res.totals(), r


def costs(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    req = replace(asked.request, group_by=("day",), savings=True, suggest=True, compare=True)
    r = _run(_prepared(req, now, config))
    t = r.res.totals()
    body: dict[str, Any] = {
        "period": period_json(r),
        "filters": r.filters,
        "total_cost": exact(t.total_cost),
        "requests": t.requests,
        "unpriced_requests": t.unpriced,
        "cost_is_lower_bound": t.incomplete,
        "daily": series(r, "day", lambda x: {"requests": x.requests, "total_cost": exact(x.total_cost)}),
    }
    # This month's projection whatever the window: the month so far plus the last 7 days'
    # rate for the time left (a 1-day window would otherwise project from one day alone).
    local = now.astimezone(r.tz)
    month_start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    week = (local - timedelta(days=7)).astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    since = min(month_start, week.astimezone(r.tz))  # from a whole hour, as project_month takes its rate
    if r.window.start is not None and r.window.start <= since and r.window.end is None:
        proj = projection(r)  # the window holds all that: its own cube is the same scan
    else:
        month_req = replace(asked.request, since=None, start_date=since.isoformat(), end_date=None, group_by=("day",), projection=True)
        proj = projection(_run(_prepared(month_req, now, config)))
    body["projected_monthly_cost"] = exact(units_to_usd(proj.projected_units)) if proj is not None else None
    body["projection"] = projection_json(proj)
    start, end = r.span()
    before: Totals | None = None
    if r.window.start is not None and start is not None and start - (end - start) >= EPOCH:
        length = end - start
        before, _ = _window_totals(asked.request, now, config, start - length, start)
        body["previous_period"] = {
            "start": (start - length).isoformat(),
            "end": start.isoformat(),
            "requests": before.requests,
            "total_cost": exact(before.total_cost),
        }
        body["previous_period_cost"] = exact(before.total_cost)
        delta = t.cost_units - before.cost_units
        body["change"] = {
            "amount": exact(units_to_usd(delta)),
            "percent": round(delta * 100 / before.cost_units, 2) if before.cost_units else None,
        }
    else:  # all time: nothing comes before it
        body["previous_period"] = None
        body["previous_period_cost"] = None
        body["change"] = None
    body["compare"] = {
        label.replace(" ", "_"): {"start": s.isoformat(), "end": e.isoformat(), "requests": x.requests, "total_cost": exact(x.total_cost)}
        for label, s, e, x in (r.extras.compare or [])
    }
    s = savings(r)
    body["savings"] = {"cache_read_tokens": s["tokens"], "saved": exact(s["saved"]), "unpriced_cache_read_tokens": s["unpriced_tokens"]}
    body["suggestions"] = suggestions(r)
    return body


def provider(asked: Asked, now: datetime, config: Config, name: str) -> dict[str, Any]:
    if asked.request.provider:
        raise UsageError("provider: the provider is in the path; leave the parameter out", "provider")
    p = _prepared(replace(asked.request, provider=(name,), latency=True), now, config)
    # The daily series from the same cube; not a --group-by day, which with --latency
    # would add per-day latency tables this answer has no use for.
    p = replace(p, query=replace(p.query, dims=(*p.query.dims, "day")))
    _interval(asked, p)
    r = _run(p)
    t = r.res.totals()
    if not t.requests and name not in config.providers:
        raise LookupError(f"no provider {name!r}: not in the config and no calls in this period")
    # The name as the records spell it: the filter ignores case (openai = OpenAI).
    name = next((str(k[0]) for k in r.res.rollup(["provider"])), name)
    lat = r.res.latency_for("provider")
    ttft = r.res.latency_for("provider", ttft=True)
    model_lat = r.res.latency_for("model")
    models = [
        {
            "model": k[0],
            "requests": x.requests,
            "errors": x.errors,
            "success_rate": rate(x),
            "total_tokens": x.tokens["total_tokens"],
            "total_cost": exact(x.total_cost),
            "latency_ms": _percentiles(model_lat.get(k[0])),
        }
        for k, x in _by_cost(r.res.rollup(["model"]))
    ]
    return {
        "provider": name,
        "period": period_json(r),
        "filters": r.filters,
        **totals_fields(t),
        "latency_ms": _percentiles(lat.get(name)),
        "ttft_ms": _percentiles(ttft.get(name)),
        "by_model": models,
        "daily": series(r, "day", day_fields),
    }


def latency(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    r = _run(_prepared(replace(asked.request, latency=True), now, config))
    lat = r.res.latency_for("provider")
    ttft = r.res.latency_for("provider", ttft=True)
    rows = []
    for (name,), t in sorted(r.res.rollup(["provider"]).items(), key=lambda kv: str(kv[0][0])):
        rows.append(
            {
                "provider": name,
                "requests": t.requests,
                "errors": t.errors,
                "success_rate": rate(t),
                "latency_ms": _percentiles(lat.get(name)),
                "ttft_ms": _percentiles(ttft.get(name)),
            }
        )
    return {"period": period_json(r), "filters": r.filters, "by_provider": rows}


def _limit(asked: Asked, default: int) -> int:
    text = asked.extra.get("limit")
    return default if text is None else whole_number(text, "limit", 1, MAX_LIMIT)


def expensive(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    r = _run(_prepared(replace(asked.request, top=_limit(asked, 10)), now, config))
    rows = [{**x, "total_cost": exact(record_decimal(x["total_cost"]))} for x in r.res.top_requests()]
    return {"period": period_json(r), "filters": r.filters, "requests": rows}


def users(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    limit = _limit(asked, 50)
    # One scan by user and session: users are its roll-up by user, sessions its cells.
    r = _run(_prepared(replace(asked.request, group_by=("user", "session")), now, config))
    per = r.res.rollup(["user"])
    missing = per.pop((NONE_LABEL,), Totals())
    counts: dict[Any, int] = {}
    for user, sid in r.res.rollup(["user", "session"]):
        if sid != NONE_LABEL:
            counts[user] = counts.get(user, 0) + 1
    total = Totals()
    for x in per.values():
        total.merge(x)
    rows = [
        {
            "user": k[0],
            "requests": x.requests,
            "errors": x.errors,
            "sessions": counts.get(k[0], 0),
            "total_tokens": x.tokens["total_tokens"],
            "total_cost": exact(x.total_cost),
        }
        for k, x in _by_cost(per)[:limit]
    ]
    return {
        "period": period_json(r),
        "filters": r.filters,
        "active_users": len(per),
        "requests_without_user": missing.requests,
        "total_cost": exact(total.total_cost),
        "users": rows,
    }


def user(asked: Asked, now: datetime, config: Config, name: str) -> dict[str, Any]:
    if asked.request.user and asked.request.user != (name,):
        raise UsageError("user: the user is in the path; leave the parameter out", "user")
    p = _prepared(replace(asked.request, user=(name,), group_by=("day",), sessions=True), now, config)
    _interval(asked, p)
    r = _run(p)
    t = r.res.totals()
    return {
        "user": name,
        "period": period_json(r),
        "filters": r.filters,
        **totals_fields(t),
        "sessions": r.extras.sessions_total if r.extras is not None else 0,
        "by_model": by_model(r.res),
        "daily": series(r, "day", day_fields),
    }


def sessions(asked: Asked, now: datetime, config: Config) -> dict[str, Any]:
    sort = asked.extra.get("sort", "recent")
    if sort not in SESSION_SORTS:
        raise UsageError(f"sort: expected one of {', '.join(SESSION_SORTS)}, got {sort[:20]!r}", "sort")
    lo, hi = usd_param(asked.extra.get("min_cost"), "min_cost"), usd_param(asked.extra.get("max_cost"), "max_cost")
    if lo is not None and hi is not None and usd_to_units(lo) > usd_to_units(hi):
        raise UsageError("min_cost: is more than max_cost, so no session could match", "min_cost")
    limit = _limit(asked, 50)
    req = replace(asked.request, sessions=True, sessions_sort=sort, min_cost=lo, max_cost=hi)
    r = _run(_prepared(req, now, config))
    ex = r.extras
    rows = [
        {
            "session": sid,
            "requests": x.requests,
            "total_tokens": x.tokens["total_tokens"],
            "total_cost": exact(x.total_cost),
            "last_active": hour.replace(" ", "T"),
        }
        for sid, x, hour in (ex.sessions or [])[:limit]
    ]
    return {
        "period": period_json(r),
        "filters": r.filters,
        "sort": sort,
        "total_sessions": ex.sessions_total,
        "requests_without_session": ex.sessions_without_id,
        "sessions": rows,
    }


_ANSWERS: dict[str, Callable[..., dict[str, Any]]] = {
    "usage": usage,
    "costs": costs,
    "provider": provider,
    "latency": latency,
    "expensive-requests": expensive,
    "users": users,
    "user": user,
    "sessions": sessions,
}

# Set in each worker process by ``init_worker``: the running proxy's config and log.
_WORKER: dict[str, Any] = {}


def init_worker(config: Config, log_path: str, parent: int) -> None:
    """A worker process's start: the proxy's config and log, its price book and the
    memo of segment results, once."""
    exit_with_parent(parent)
    _WORKER["config"], _WORKER["log"] = config, log_path
    _WORKER["book"] = pricebook_for(config)
    _WORKER["memo"] = SegmentMemo()


def answer(kind: str, params: Mapping[str, Sequence[str]], viewer: Viewer, now: float, path_arg: str | None = None) -> tuple[int, bytes]:
    """An endpoint's status and JSON body, in a worker process set up by ``init_worker``:
    200, 400 (a bad parameter, named) or 404 (no such provider)."""
    config: Config = _WORKER["config"]
    try:
        asked = parse_params(kind, params, _WORKER["log"], viewer)
        when = datetime.fromtimestamp(now).astimezone(get_tz(asked.request.tz))
        start = asked.request.start_date
        if start is not None and parse_when(start, when.tzinfo or timezone.utc, end=False) >= when:
            # Nothing was logged after now, and a window from the future has no "before".
            raise UsageError("start: is after now", "start")
        fn = _ANSWERS[kind]
        body = fn(asked, when, config, path_arg) if path_arg is not None else fn(asked, when, config)
    except UsageError as e:
        return 400, error_body(str(e), "invalid_request_error", e.param)
    except LookupError as e:
        return 404, error_body(str(e.args[0]), "not_found_error", None)
    return 200, orjson.dumps(body)


def error_body(message: str, kind: str, param: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param}})


def export(asked: Asked, now: datetime, config: Config, write: Callable[[str], None]) -> None:
    """The selected records, one CSV row or JSONL line each, handed to ``write`` in
    pieces as they are read (the web shell streams them)."""
    fmt = export_format(asked)
    p = _prepared(asked.request, now, config)
    records = iter_selected(p.files, p.query)
    out = _Chunks(write)
    if fmt == "csv":
        write_request_csv(out, records)
    else:
        for rec in records:
            out.write(orjson.dumps(rec, default=json_default, option=orjson.OPT_APPEND_NEWLINE).decode())
    out.flush()


def export_format(asked: Asked) -> str:
    fmt = asked.extra.get("format", "csv")
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"format: expected csv or jsonl, got {fmt[:20]!r}", "format")
    return fmt


EXPORT_FORMATS = ("csv", "jsonl")


class _Chunks(io.StringIO):
    """A text sink that hands on what it holds every 256 KiB."""

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__()
        self._write = write

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.tell() >= 256 << 10:
            self.flush()
        return n

    def flush(self) -> None:
        text = self.getvalue()
        if text:
            self._write(text)
            self.seek(0)
            self.truncate()
