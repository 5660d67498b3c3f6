"""Helpers shared by the analytics API's end-to-end tests (test_analytics_api.py,
test_api_access.py): a mock upstream whose every reply's usage and status are what the
call asked for, the calls made with the official SDKs (OpenAI, Anthropic) and raw HTTP
(Gemini), the API read with exact decimals, the sums a test computes itself from the
records in the log to hold the API's numbers against, hand-made schema-2 records, and
the proxy and report command the tests run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import aiohttp
import anthropic
import openai
from aiohttp import web

from proxy.config import parse_config
from proxy.web.app import create_app
from tests.support import ROOT
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY
from tests.support.mock_upstream import MockUpstream, Received, sse
from tests.support.provider_replies import anthropic_message, chat_chunks, chat_completion, gemini_response
from tests.support.records import RECORD_FIELDS, TOKEN_FIELDS, check_record, gpt4o_call
from tests.support.synthlog import dumps

UTC = timezone.utc
SPEC = "spec:"  # the prompt text a call sends: the reply it wants, as JSON after this


@dataclass(frozen=True)
class Call:
    """One call through the proxy and the reply the mock gives it: ``inp`` is ALL input
    (cache reads ``cached`` and Anthropic 5-minute cache writes ``write`` included)."""

    family: str  # openai, anthropic, gemini
    model: str
    stream: bool = False
    inp: int = 100
    out: int = 10
    cached: int = 0
    write: int = 0
    status: int = 200
    user: str | None = None
    feature: str | None = None
    team: str | None = None  # as x-tag-team
    session: str | None = None
    category: str | None = None
    provider: str | None = None  # default: the family's name


# Upstream snapshots the replies name (a dated snapshot is priced as its family).
SNAPSHOT = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}


def _spec(text: str) -> dict[str, Any]:
    return json.loads(text[len(SPEC) :]) if text.startswith(SPEC) else {}


def _error(status: int, family: str) -> web.Response:
    if family == "gemini":
        body: dict[str, Any] = {"error": {"code": status, "message": "mock upstream error", "status": "RESOURCE_EXHAUSTED"}}
    elif family == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error" if status == 429 else "api_error", "message": "mock upstream error"}}
    else:
        body = {"error": {"message": "mock upstream error", "type": "server_error", "code": None}}
    return web.json_response(body, status=status)


def install_upstream(mock: MockUpstream, gemini_models: Iterable[str] = ("gemini-2.5-flash", "gemini-2.5-pro")) -> None:
    """Routes for chat completions, messages and generateContent (and their streams), each
    answering with the usage and status its prompt's spec asks for, and a unique id."""

    async def chat(request: web.Request, rec: Received) -> web.StreamResponse:
        body = rec.json or {}
        s = _spec(body["messages"][0]["content"])
        if s["status"] >= 400:
            return _error(s["status"], "openai")
        usage = {
            "prompt_tokens": s["inp"],
            "completion_tokens": s["out"],
            "total_tokens": s["inp"] + s["out"],
            "prompt_tokens_details": {"cached_tokens": s["cached"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        model, rid = SNAPSHOT.get(body["model"], body["model"]), f"chatcmpl-{mock.next_id()}"
        if not body.get("stream"):
            return web.json_response(chat_completion(model, usage, rid, "ok"))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        events = sse([(None, c) for c in chat_chunks(model, ["o", "k"], usage, include, rid)] + [(None, "[DONE]")])
        return await mock.write_pieces(request, [events[0], 0.005, *events[1:]])

    async def messages(request: web.Request, rec: Received) -> web.StreamResponse:
        body = rec.json or {}
        s = _spec(body["messages"][0]["content"])
        if s["status"] >= 400:
            return _error(s["status"], "anthropic")
        usage = {
            "input_tokens": s["inp"] - s["cached"] - s["write"],
            "cache_creation_input_tokens": s["write"],
            "cache_read_input_tokens": s["cached"],
            "cache_creation": {"ephemeral_5m_input_tokens": s["write"], "ephemeral_1h_input_tokens": 0},
            "output_tokens": s["out"],
            "service_tier": "standard",
        }
        model, rid = SNAPSHOT.get(body["model"], body["model"]), f"msg_{mock.next_id()}"
        if not body.get("stream"):
            return web.json_response(anthropic_message(model, usage, rid))
        message = {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": s["out"]},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        pieces = sse(events)
        return await mock.write_pieces(request, [pieces[0], 0.005, *pieces[1:]])

    def gemini(model: str, streaming: bool) -> Callable[[web.Request, Received], Any]:
        async def handler(request: web.Request, rec: Received) -> web.StreamResponse:
            body = rec.json or {}
            s = _spec(body["contents"][0]["parts"][0]["text"])
            if s["status"] >= 400:
                return _error(s["status"], "gemini")
            usage = {
                "promptTokenCount": s["inp"],
                "cachedContentTokenCount": s["cached"],
                "candidatesTokenCount": s["out"],
                "totalTokenCount": s["inp"] + s["out"],
            }
            reply = {**gemini_response(model, usage, "ok"), "responseId": f"gem-{mock.next_id()}"}
            if not streaming:
                return web.json_response(reply)
            first = {**gemini_response(model, None, "o", None), "responseId": reply["responseId"]}
            return await mock.write_pieces(request, [*sse([(None, first)], sep="\r\n\r\n"), 0.005, *sse([(None, reply)], sep="\r\n\r\n")])

        return handler

    mock.on("/v1/chat/completions", chat)
    mock.on("/v1/messages", messages)
    for m in gemini_models:
        mock.on(f"/v1beta/models/{m}:generateContent", gemini(m, False))
        mock.on(f"/v1beta/models/{m}:streamGenerateContent", gemini(m, True))


def call_headers(c: Call) -> dict[str, str]:
    h = {}
    for name, value in (
        ("x-user-id", c.user),
        ("x-feature", c.feature),
        ("x-tag-team", c.team),
        ("x-session-id", c.session),
        ("x-category", c.category),
    ):
        if value is not None:
            h[name] = value
    return h


async def make_call(url: str, c: Call, key: str | None = None) -> int:
    """The call through the proxy at ``url``; ``key``: the key the client sends (a proxy key
    under auth), else the family's test client key. The HTTP status the client got."""
    spec = SPEC + json.dumps(asdict(c))
    headers = call_headers(c)
    provider = c.provider or c.family
    if c.family == "openai":
        async with openai.AsyncOpenAI(base_url=f"{url}/{provider}/v1", api_key=key or CLIENT_OPENAI_KEY, max_retries=0) as oc:
            msgs: Any = [{"role": "user", "content": spec}]
            try:
                if c.stream:
                    async for _ in await oc.chat.completions.create(model=c.model, messages=msgs, stream=True, extra_headers=headers):
                        pass
                else:
                    await oc.chat.completions.create(model=c.model, messages=msgs, extra_headers=headers)
            except openai.APIStatusError as e:
                return e.status_code
        return 200
    if c.family == "anthropic":
        async with anthropic.AsyncAnthropic(base_url=f"{url}/{provider}", api_key=key or CLIENT_ANTHROPIC_KEY, max_retries=0) as ac:
            amsgs: Any = [{"role": "user", "content": spec}]
            try:
                if c.stream:
                    async for _ in await ac.messages.create(
                        model=c.model, max_tokens=1000, messages=amsgs, stream=True, extra_headers=headers
                    ):
                        pass
                else:
                    await ac.messages.create(model=c.model, max_tokens=1000, messages=amsgs, extra_headers=headers)
            except anthropic.APIStatusError as e:
                return e.status_code
        return 200
    verb = "streamGenerateContent?alt=sse" if c.stream else "generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": spec}]}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{url}/{provider}/v1beta/models/{c.model}:{verb}", json=body, headers={"x-goog-api-key": key or CLIENT_GEMINI_KEY, **headers}
        ) as r:
            await r.read()
            return r.status


async def make_calls(url: str, calls: Sequence[Call], key: str | None = None) -> list[int]:
    return [await make_call(url, c, key) for c in calls]


# --- reading the API ----------------------------------------------------------------------------


class Answer:
    """An API reply: status, raw text and the JSON with every non-integer number a Decimal."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str]) -> None:
        self.status, self.text, self.headers = status, text, headers
        self.numbers: list[str] = []  # every non-integer number as the text wrote it

        def number(s: str) -> Decimal:
            self.numbers.append(s)
            return Decimal(s)

        try:
            self.json: Any = json.loads(text, parse_float=number)
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<{self.status} {self.text[:300]}>"


async def api_get(
    http: aiohttp.ClientSession, url: str, path: str, params: Sequence[tuple[str, str]] | Mapping[str, str] = (), key: str | None = None
) -> Answer:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url + path, params=list(params.items()) if isinstance(params, Mapping) else list(params), headers=headers) as r:
        return Answer(r.status, await r.text(), r.headers)


def get_ok(a: Answer) -> Any:
    assert a.status == 200, a
    return a.json


# --- the numbers, from the records ----------------------------------------------------------------

TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "total_tokens")


def is_error(r: Mapping[str, Any]) -> bool:
    return bool(r.get("error")) or r["status"] >= 400


def cost(r: Mapping[str, Any]) -> Decimal:
    return Decimal(str(r["total_cost"])) if r.get("total_cost") is not None else Decimal(0)


def sums(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """requests, errors, tokens (as the API names them) and total_cost, from the records."""
    recs = list(records)
    out: dict[str, Any] = {
        "requests": len(recs),
        "errors": sum(1 for r in recs if is_error(r)),
        "total_cost": sum((cost(r) for r in recs), Decimal(0)),
    }
    for f in (*TOKENS, "reasoning_tokens"):
        out[f] = sum(r.get(f) or 0 for r in recs)
    out["unpriced_requests"] = sum(1 for r in recs if r.get("total_cost") is None and r.get("total_tokens"))
    return out


def when(r: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(r["timestamp"]).replace("Z", "+00:00"))


def in_window(records: Iterable[dict[str, Any]], start: datetime | None, end: datetime) -> list[dict[str, Any]]:
    return [r for r in records if (start is None or when(r) >= start) and when(r) < end]


def period_bounds(doc: Mapping[str, Any]) -> tuple[datetime | None, datetime]:
    p = doc["period"]
    return (datetime.fromisoformat(p["start"]) if p["start"] else None, datetime.fromisoformat(p["end"]))


def whole_ms(v: Any) -> int:
    return int(Decimal(str(v)).quantize(Decimal(1), ROUND_HALF_UP))


def nearest_rank(values: Sequence[Any], p: int) -> float | None:
    """The ``p``th percentile by nearest rank of the values rounded to whole milliseconds."""
    ms = sorted(whole_ms(v) for v in values if v is not None)
    if not ms:
        return None
    rank = max(1, -(-p * len(ms) // 100))
    return float(ms[rank - 1])


def day_of(r: Mapping[str, Any], tz: tzinfo) -> str:
    return when(r).astimezone(tz).strftime("%Y-%m-%d")


def hour_of(r: Mapping[str, Any], tz: tzinfo) -> str:
    return when(r).astimezone(tz).strftime("%Y-%m-%dT%H:00")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records, numbers exact (Decimal), each checked as every record must be."""
    recs = [json.loads(line, parse_float=Decimal) for line in path.read_text().splitlines()]
    for r in recs:
        check_record(r)
    return recs


def model_of(r: Mapping[str, Any]) -> str:
    return r.get("model") or r.get("response_model") or "(none)"


def groups(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return out


def rate(recs: Sequence[Mapping[str, Any]]) -> Decimal | None:
    """The success rate as the API writes it (6 decimals), read back as the tests read JSON."""
    return Decimal(str(round((len(recs) - sum(map(is_error, recs))) / len(recs), 6))) if recs else None


def percentiles(recs: Iterable[Mapping[str, Any]], field: str = "latency_ms") -> dict[str, float | None]:
    values = [r.get(field) for r in recs]
    return {"p50": nearest_rank(values, 50), "p95": nearest_rank(values, 95)}


def labels(start: datetime, end: datetime, tz: tzinfo, hours: bool) -> list[str]:
    """Every day (or hour) the window [start, end) touches in ``tz``, oldest first."""
    if not hours:
        d, last = start.astimezone(tz).date(), (end - timedelta(microseconds=1)).astimezone(tz).date()
        return [(d + timedelta(days=i)).isoformat() for i in range((last - d).days + 1)]
    t, out = start.astimezone(tz).replace(minute=0, second=0, microsecond=0), []
    while t < end:
        out.append(t.strftime("%Y-%m-%dT%H:00"))
        t = (t + timedelta(hours=1)).astimezone(tz)
    return sorted(set(out))


TOTALS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "total_tokens", "total_cost")


def some(doc: Mapping[str, Any], keys: Iterable[str] = TOTALS) -> dict[str, Any]:
    return {k: doc[k] for k in keys}


def check_usage(body: dict[str, Any], recs: list[dict[str, Any]], tz: tzinfo = UTC) -> None:
    """Every number of a usage answer (totals, by provider, by model, daily, hourly)
    against the records it covers."""
    exp = sums(recs)
    assert some(body, (*TOTALS, "reasoning_tokens", "unpriced_requests")) == some(exp, (*TOTALS, "reasoning_tokens", "unpriced_requests"))
    assert body["success_rate"] == rate(recs)
    avg = (exp["total_cost"] / len(recs)).quantize(Decimal("1e-10"), ROUND_HALF_UP) if recs else Decimal(0)
    assert body["avg_cost_per_request"] == avg
    by_p = groups(recs, lambda r: r["provider"])
    assert [row["provider"] for row in body["by_provider"]] == sorted(by_p, key=lambda p: (-sums(by_p[p])["total_cost"], p))
    for row in body["by_provider"]:
        rs = by_p[row["provider"]]
        assert row == {
            "provider": row["provider"],
            **some(sums(rs), ("requests", "errors")),
            "success_rate": rate(rs),
            **some(sums(rs), TOTALS[-2:]),
        }
    by_m = groups(recs, lambda r: (r["provider"], model_of(r)))
    assert {(row["provider"], row["model"]): some(row) for row in body["by_model"]} == {k: some(sums(v)) for k, v in by_m.items()}
    start, end = period_bounds(body)
    assert start is not None
    for name, hours, label in (("daily", False, day_of), ("hourly", True, hour_of)):
        if name not in body:
            continue
        per = groups(recs, lambda r: label(r, tz))
        assert [d["hour" if hours else "date"] for d in body[name]] == labels(start, end, tz, hours)
        for d in body[name]:
            assert some(d) == some(sums(per.get(d["hour" if hours else "date"], []))), d


# --- money as exact decimals --------------------------------------------------------------------

MONEY = frozenset(
    {
        "total_cost",
        "avg_cost_per_request",
        "previous_period_cost",
        "projected_monthly_cost",
        "month_to_date",
        "daily_rate",
        "projected",
        "amount",
        "saved",
        "limit",
        "spent",
        "reserved",
        "remaining",
    }
)
_PLAIN = re.compile(r"-?\d+(?:\.\d{1,10})?")  # no exponent, at most 10 decimals


def money_fields(doc: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in MONEY and not isinstance(v, (dict, list)):
                yield f"{path}.{k}", v
            yield from money_fields(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from money_fields(v, f"{path}[{i}]")


def assert_exact_money(a: Answer) -> int:
    """Every money field a JSON number read as an exact decimal (never a string, never
    through a float), and no number in the raw text with more than 10 decimals or an
    exponent. The count of money fields seen."""
    assert a.json is not None, a
    bad = [t for t in a.numbers if not _PLAIN.fullmatch(t)]
    assert not bad, bad
    n = 0
    for where, v in money_fields(a.json):
        if v is None:
            continue
        assert isinstance(v, (int, Decimal)) and not isinstance(v, bool), (where, v)
        n += 1
    return n


# --- hand-made records, for times no real call can have -------------------------------------------


def hand_record(ts: float, rid: str, **fields: Any) -> dict[str, Any]:
    """A full schema-2 record (every field a real one has) of a plain gpt-4o call stamped
    at ``ts``: tests.support.records.gpt4o_call's, with ``fields`` over it. A
    ``total_cost`` given alone is all input cost."""
    rec: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    rec.update(dict.fromkeys(TOKEN_FIELDS, 0))
    rec.update(
        schema_version=2,
        record_id=rid,
        request_id=rid,
        currency="USD",
        is_streaming=False,
        endpoint="/openai/v1/chat/completions",
        latency_ms=100.0,
        pricing_source="config",
        usage_source="provider",
        tags={},
        **gpt4o_call(ts),
    )
    rec.update(total_cost=Decimal("0.0035"), input_cost=Decimal("0.0025"), output_cost=Decimal("0.001"))
    if "total_cost" in fields:
        rec.update(input_cost=fields["total_cost"], output_cost=Decimal(0))
    rec.update(fields)
    return rec


# --- the proxy whose log a test reads -----------------------------------------------------------------


@dataclass
class Live:
    """A running proxy, the log it writes and the config.yml it was started from."""

    url: str
    log: Path
    config_path: Path

    def records(self) -> list[dict[str, Any]]:
        return read_log(self.log)


async def serve_calls(log: Path, cfg: dict[str, Any], calls: Sequence[Call], before: Iterable[dict[str, Any]] = ()) -> None:
    """``before`` (hand-made records) written to ``log``, then ``calls`` made through a proxy
    (run here on 127.0.0.1) appending to it; returns once every record is on disk."""
    old = list(before)
    log.write_bytes(b"".join(dumps(r) for r in old))
    runner = web.AppRunner(create_app(parse_config(cfg, str(log.parent / "config.yml")), log, console=False), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        assert await make_calls(f"http://127.0.0.1:{port}", calls) == [c.status for c in calls]
    finally:
        await runner.cleanup()  # flushes the writer
    assert len(log.read_text().splitlines()) == len(old) + len(calls)


async def wait_lines(log: Path, n: int, timeout: float = 5.0) -> None:
    """Until the log holds ``n`` whole lines (records reach it from a writer thread)."""
    deadline = time.monotonic() + timeout
    while log.read_text().count("\n") < n:
        assert time.monotonic() < deadline, f"the log never held {n} records"
        await asyncio.sleep(0.01)


def report_json(log: Path, config_path: Path, *args: str) -> dict[str, Any]:
    """``python -m proxy report --format json ARGS --log-file LOG --config CONFIG``, run as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "COST_TRACKING_FILE"}
    argv = [sys.executable, "-m", "proxy", "report", "--format", "json", *args, "--log-file", str(log), "--config", str(config_path)]
    p = subprocess.run(argv, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=log.parent, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout, parse_float=Decimal)


async def next_event(content: aiohttp.StreamReader) -> tuple[str, dict[str, Any]]:
    """The next server-sent event's name and JSON data (comments and retry: skipped)."""
    lines: list[str] = []
    while True:
        line = (await content.readline()).decode().rstrip("\n")
        if not line and lines:
            break
        if line and not line.startswith((":", "retry:")):
            lines.append(line)
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["event"], json.loads(fields["data"])
