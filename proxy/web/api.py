"""The analytics API under ``/api/`` (docs/api.md): who may see what, the engine run in
a worker process so a long scan never holds up proxied calls, a short-lived cache of
answers, the export stream, budgets, ``POST /api/usage`` and the event stream."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from proxy.budgets import Subject
from proxy.core.money import cost_units
from proxy.errors import UsageError
from proxy.manual import JSON_NAMES, MAX_TOKENS, manual_record, parse_metadata, record_line, record_tags
from proxy.reports import analytics
from proxy.reports.analytics import error_body
from proxy.reports.api_query import ENDPOINTS, Viewer, parse_params
from proxy.reports.numbers import exact
from proxy.storage.lookup import RECORD_ID, RecentRecords, find_record
from proxy.web.access import read_budgets
from proxy.web.calls import dumps_json
from proxy.web.events import stream_events
from proxy.web.openapi import openapi_document
from proxy.web.state import APP_STATE, ProxyState

log = logging.getLogger("proxy")

_CACHE_SIZE = 64
_CACHE_SECONDS = 30  # a rolling window moves: an answer is reused at most this long


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, kind, param), content_type="application/json")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps_json(body), content_type="application/json", headers={"Cache-Control": "no-store"})


class Analytics:
    """The API's engine runner: one worker process (started on first use), answers cached
    until a record is written or ``_CACHE_SECONDS`` pass, identical requests shared."""

    def __init__(self, state: ProxyState, log_path: Path) -> None:
        self.state, self.log_path, self.changes = state, log_path, state.changes
        self._pool: ProcessPoolExecutor | None = None
        self._exports: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[Any, tuple[int, bytes]] = OrderedDict()
        self._running: dict[Any, asyncio.Future[tuple[int, bytes]]] = {}

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork of a process with threads (the log writer) is not safe.
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=analytics.init_worker,
                initargs=(self.state.config, str(self.log_path), os.getpid()),
            )
        return self._pool

    def _log_mark(self) -> tuple[int, int]:
        try:
            st = self.log_path.stat()
        except OSError:
            return (0, 0)
        return (st.st_size, st.st_mtime_ns)  # a record appended by `python -m proxy log`, too

    async def run(self, kind: str, params: dict[str, list[str]], viewer: Viewer, path_arg: str | None) -> tuple[int, bytes]:
        now = time.time()
        key = (kind, path_arg, tuple(sorted((k, tuple(v)) for k, v in params.items())), viewer)
        mark = (self.changes.seq, self._log_mark(), int(now // _CACHE_SECONDS))
        hit = self._cache.get((key, mark))
        if hit is not None:
            self._cache.move_to_end((key, mark))
            return hit
        running = self._running.get((key, mark))
        if running is not None:
            return await asyncio.shield(running)
        fut = asyncio.ensure_future(self._answer(kind, params, viewer, now, path_arg))
        self._running[(key, mark)] = fut
        try:
            result = await asyncio.shield(fut)
        finally:
            self._running.pop((key, mark), None)
        self._cache[(key, mark)] = result
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    async def _answer(self, kind: str, params: dict[str, list[str]], viewer: Viewer, now: float, path_arg: str | None) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        for _ in (1, 2):
            pool = self.pool()
            try:
                return await loop.run_in_executor(pool, analytics.answer, kind, params, viewer, now, path_arg)
            except BrokenProcessPool:
                # The worker died (killed, out of memory): start a new one, once, however
                # many requests were waiting on it (the first to see it replaces it).
                if self._pool is pool:
                    log.warning("analytics worker stopped; starting a new one")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
        return 503, error_body("the analytics worker keeps stopping; see the proxy's log", "api_error", None)

    def export_pool(self) -> ThreadPoolExecutor:
        """Threads of their own for exports (reading a whole log), so a long export never
        holds one of the threads request bodies are read with."""
        if self._exports is None:
            self._exports = ThreadPoolExecutor(2, thread_name_prefix="lcp-export")
        return self._exports

    def close(self) -> None:
        if self._exports is not None:
            self._exports.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


ANALYTICS = web.AppKey("lcp_analytics", Analytics)


def _token(request: web.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def viewer_for(state: ProxyState, request: web.Request) -> Viewer | web.Response:
    """Admin keys see everything, a user's proxy key only its own user's numbers; no key
    (or a revoked or unknown one) is a 401. Without auth: the local operator."""
    keys = state.keys
    if keys is None:
        # No keys: only this machine may ask. A page of another site that resolves its
        # name to 127.0.0.1 (DNS rebinding) sends its own Host and Origin: refused.
        if not addressed_to_this_machine(request):
            return _error(
                403,
                "without auth: the API answers only requests addressed to this machine (127.0.0.1, [::1], localhost)",
                "permission_error",
            )
        return Viewer("local")
    token = _token(request)
    keys.refresh()
    if token and keys.is_admin(token):
        return Viewer("admin")
    entry = keys.lookup(token)
    if entry is None or entry.revoked:
        why = "a proxy key is needed" if not token else "unknown or revoked proxy key"
        return _error(
            401, f"{why}: send Authorization: Bearer <key> (an admin key, or a user's key for its own numbers)", "authentication_error"
        )
    if not entry.user:
        return _error(403, "this proxy key has no user: use an admin key, or a key created with --user", "permission_error")
    return Viewer("user", entry.user)


def addressed_to_this_machine(request: web.Request) -> bool:
    """Host and Origin (if any) name this machine: what an unauthenticated reader of
    call data must send (a page of another site resolving its name to 127.0.0.1, DNS
    rebinding, sends its own). The API and /metrics ask it without auth."""
    return _local_name(request.host) and _local_name(request.headers.get("Origin"), origin=True)


def _local_name(value: str | None, origin: bool = False) -> bool:
    """A Host (or Origin) naming a loopback address or localhost, with any port; no
    Origin at all (curl, scripts) is fine."""
    if value is None:
        return origin
    if origin:
        host = URL(value).host or ""
    elif value.startswith("["):
        host = value[1 : value.find("]")] if "]" in value else ""
    else:
        host = value.split(":", 1)[0]
    host = host.lower()
    return host in ("localhost", "::1") or (host.startswith("127.") and host.replace(".", "").isdigit())


def _params(request: web.Request) -> dict[str, list[str]]:
    return {k: request.query.getall(k) for k in request.query.keys()}


async def handle_analytics(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    kind = request.match_info.get("kind", "")
    path_arg = request.match_info.get("name")
    if path_arg is not None:
        kind = {"provider": "provider", "users": "user"}[kind]
        if kind == "user" and viewer.user is not None and path_arg != viewer.user:
            return _error(403, "this key sees only its own user's numbers", "permission_error", "user")
    if kind not in ENDPOINTS or kind in ("export", "provider", "user") and path_arg is None:
        return _error(404, f"no analytics endpoint {kind!r}: see /api/openapi.json", "not_found_error")
    status, body = await request.app[ANALYTICS].run(kind, _params(request), viewer, path_arg)
    return web.Response(status=status, body=body, content_type="application/json", headers={"Cache-Control": "no-store"})


async def handle_export(request: web.Request) -> web.StreamResponse:
    """One row per request, streamed as it is read (a thread reads; the event loop sends)."""
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    api = request.app[ANALYTICS]
    try:
        asked = parse_params("export", _params(request), str(api.log_path), viewer)
        fmt = analytics.export_format(asked)
    except UsageError as e:
        return _error(400, str(e), "invalid_request_error", e.param)
    now = datetime.now(timezone.utc)
    name = f"cost-export-{now.strftime('%Y%m%d-%H%M%S')}.{fmt}"
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        }
    )
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[str | None] = asyncio.Queue()
    room = threading.Semaphore(8)  # chunks in flight: the reader waits for a slow client
    stop = threading.Event()  # the client left: the reader ends at its next chunk

    def put(chunk: str) -> None:
        while not room.acquire(timeout=0.5):
            if stop.is_set():
                raise _ExportStopped
        if stop.is_set():
            raise _ExportStopped
        loop.call_soon_threadsafe(chunks.put_nowait, chunk)

    def produce() -> None:
        try:
            analytics.export(asked, now, state.config, put)
        except _ExportStopped:
            pass
        finally:  # the end, or a failure (raised again by ``await reader``)
            if not stop.is_set():
                loop.call_soon_threadsafe(chunks.put_nowait, None)

    reader = loop.run_in_executor(api.export_pool(), produce)
    try:
        while (chunk := await chunks.get()) is not None:
            room.release()
            await resp.write(chunk.encode())
    finally:
        stop.set()
        room.release()  # a reader waiting for room sees the flag at once
    await reader
    await resp.write_eof()
    return resp


class _ExportStopped(Exception):
    """The export's client left: the reader thread stops reading."""


def _budget_row(d: dict[str, Any], fraction: float, warn_at: float) -> dict[str, Any]:
    status = "exceeded" if fraction >= 1 else ("warning" if fraction >= warn_at else "ok")
    return {
        "name": d["budget"],
        "scope": d["scope"],
        "value": d["value"],
        "period": d["period"],
        "limit": exact(d["limit_usd"]),
        "spent": exact(d["spent_usd"]),
        "reserved": exact(d["reserved_usd"]),
        "remaining": exact(d["remaining_usd"]),
        "used_fraction": None if fraction == float("inf") else round(fraction, 6),
        "status": status,
        "period_start": d["period_start"],
        "resets_at": d["resets_at"],
    }


async def handle_budgets(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    ledger = state.budgets
    warn_at = ledger.warn_at if ledger is not None else 0.8
    rows = []
    backend = await read_budgets(state)  # a shared ledger: "redis", or "unreachable" (last read)
    if ledger is not None:
        extra = state.keys.budget_limits() if state.keys is not None else []
        own_keys = {e.key_id for e in state.keys.entries if e.user == viewer.user} if state.keys is not None and viewer.user else set()
        for s in ledger.states(extra):
            d = s.as_dict()
            if viewer.user is not None and not (
                (d["scope"] == "user" and d["value"] == viewer.user) or (d["scope"] == "key" and d["value"] in own_keys)
            ):
                continue  # a user sees the budgets that are theirs, not the team's or everyone's
            rows.append(_budget_row(d, s.fraction, warn_at))
    return _json({"warn_at": warn_at, "budgets": rows, **({"backend": backend} if backend else {})})


async def handle_whoami(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    return _json({"role": viewer.role, "user": viewer.user, "auth": state.keys is not None})


async def handle_events(request: web.Request) -> web.StreamResponse:
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    return await stream_events(request, request.app[ANALYTICS].changes)


_USAGE_FIELDS = {
    "model": str,
    "input_tokens": int,
    "output_tokens": int,
    "cached_tokens": int,
    "provider": str,
    "category": str,
    "description": str,
    "user": str,
    "metadata": dict,
}


def _usage_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UsageError(
            'the body is not JSON: send an object like {"model": "gpt-4o", "input_tokens": 100, "output_tokens": 20}'
        ) from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object")
    for name, value in body.items():
        want = _USAGE_FIELDS.get(name)
        if want is None:
            raise UsageError(f"unknown field {name!r}; the fields are {', '.join(_USAGE_FIELDS)}", name)
        if value is None and name not in ("model", "input_tokens", "output_tokens"):
            continue
        if want is int and (type(value) is not int or not 0 <= value <= MAX_TOKENS):
            raise UsageError(f"{name}: expected a whole number of tokens from 0 to {MAX_TOKENS}", name)
        if want is not int and not isinstance(value, want):
            raise UsageError(f"{name}: expected a {'JSON object' if want is dict else 'string'}", name)
    for name in ("model", "input_tokens", "output_tokens"):
        if name not in body:
            raise UsageError(f"{name}: required", name)
    return body


async def handle_post_usage(request: web.Request) -> web.Response:
    """A call made elsewhere, recorded as ``python -m proxy log`` records it, through the
    proxy's own writer: counted at once by /health, budgets and the API."""
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    if viewer.role == "user":
        return _error(403, "recording usage needs an admin key", "permission_error")
    if state.writer is None:
        return _error(409, "cost tracking is off: no log is written", "invalid_request_error")
    raw = await request.read()
    if raw.strip() and request.content_type != "application/json":
        return _error(415, f"send the body as application/json, not {request.content_type or 'no content type'}", "invalid_request_error")
    try:
        body = _usage_body(raw)
        meta = body.get("metadata")
        tags = record_tags(
            body.get("category"),
            body.get("description"),
            parse_metadata(orjson.dumps(meta).decode() if meta else None, JSON_NAMES),
            JSON_NAMES,
        )
        rec, _ = manual_record(
            state.config,
            model=body["model"],
            input_tokens=body["input_tokens"],
            output_tokens=body["output_tokens"],
            cached_tokens=body.get("cached_tokens") or 0,
            provider=body.get("provider"),
            tags=tags,
            user=body.get("user"),
            book=state.prices,
            names=JSON_NAMES,
        )
        line = record_line(rec)
    except UsageError as e:
        return _error(400, str(e), "invalid_request_error", e.param)
    pending = state.writer.write(line)
    state.window.add(rec, rec_time(rec))
    state.publish(rec, line)
    if state.budgets is not None and rec["total_cost"] is not None:
        state.budgets.count(Subject(rec["user_id"], None, None, None, rec.get("tags") or {}), cost_units(rec["total_cost"]))
    state.changes.notify()
    if pending is not None:
        await asyncio.shield(pending)
    # The line as written: its numbers are the record's, digit for digit.
    return _json({"record": orjson.Fragment(line.rstrip(b"\n"))}, status=201)


def rec_time(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00")).timestamp()


RECENT = web.AppKey("lcp_recent_records", RecentRecords)
SEARCHES = web.AppKey("lcp_record_searches", asyncio.Semaphore)


async def handle_call(request: web.Request) -> web.Response:
    """One call's record by the id its reply's ``x-llm-cost-record-id`` header gave: from
    memory for recent calls, else searched in the log (off the event loop). A user's key
    sees only its own user's calls; another's is a 404, as if it did not exist."""
    state = request.app[APP_STATE]
    viewer = viewer_for(state, request)
    if isinstance(viewer, web.Response):
        return viewer
    record_id = request.match_info["record_id"]
    if not RECORD_ID.fullmatch(record_id):
        return _error(400, "a record id is 1-64 characters of A-Z a-z 0-9 _ -", "invalid_request_error", "record_id")
    if state.follow is not None:
        state.follow()  # a call another worker answered is in the recent records too
    line = request.app[RECENT].get(record_id)
    if line is not None:
        rec = orjson.loads(line)
    else:
        async with request.app[SEARCHES]:  # one search of the log at a time, however many ask
            rec = await asyncio.get_running_loop().run_in_executor(None, find_record, request.app[ANALYTICS].log_path, record_id)
    if rec is None or (viewer.user is not None and rec.get("user_id") != viewer.user):
        return _error(404, f"no record with id {record_id!r} (a call's record exists once its reply has ended)", "not_found_error")
    body = orjson.Fragment(line.rstrip(b"\n")) if line is not None else rec
    return _json({"record": body})


async def handle_openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


async def handle_api_not_found(request: web.Request) -> web.Response:
    """A path under /api/ that no route takes: 405 with Allow for a known path and another
    method, else 404 (rather than fall through to the providers' route)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical.startswith("/api/") and "{tail" not in resource.canonical:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        return web.Response(
            status=405,
            body=error_body(
                f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(allowed))}", "invalid_request_error", None
            ),
            content_type="application/json",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    return _error(404, f"no API endpoint {request.method} {request.path}: see /api/openapi.json", "not_found_error")


def add_api_routes(app: web.Application, state: ProxyState, log_path: Path) -> None:
    api = Analytics(state, log_path)
    app[ANALYTICS] = api
    recent = app[RECENT] = RecentRecords()
    app[SEARCHES] = asyncio.Semaphore(1)
    state.record_sinks.append(recent.add)

    async def close(app: web.Application) -> None:
        api.close()

    app.on_cleanup.append(close)
    r = app.router
    r.add_get("/api/openapi.json", handle_openapi, allow_head=False)
    r.add_get("/api/whoami", handle_whoami, allow_head=False)
    r.add_get("/api/events", handle_events, allow_head=False)
    r.add_get("/api/budgets", handle_budgets, allow_head=False)
    r.add_get("/api/calls/{record_id}", handle_call, allow_head=False)
    r.add_post("/api/usage", handle_post_usage)
    r.add_get("/api/analytics/export", handle_export, allow_head=False)
    r.add_get("/api/analytics/{kind:provider|users}/{name}", handle_analytics, allow_head=False)
    r.add_get("/api/analytics/{kind}", handle_analytics, allow_head=False)
    r.add_route("*", "/api/{tail:.*}", handle_api_not_found)
