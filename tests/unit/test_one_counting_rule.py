"""One counting rule: /health's 24-hour window, the reports and the budget replay read
one log and add it up the same way, to the last 1e-10 USD.

The log is made here the way the proxy makes it: each call priced by ``price_call`` from
a config's prices, turned into a record by ``build_record`` and a line by
``dumps_record``, stamped when the call began and written when it ended (so long calls
land after later ones). It holds what real logs hold: six providers (one unpriced, one
invented by a client), priced and unpriced calls, HTTP errors at zero cost, calls whose
usage is unknown, costs down to the tenth decimal, records without ``record_id`` from
the writer before the upgrade (whose retried batches left byte-identical repeats and a
merged, unparseable line), records with a ``record_id`` written twice in other bytes,
torn lines and a run of NUL bytes from a power cut, a week of history before the window.

Each sum is taken the way its owner takes it:

* /health: ``load_window`` (the server's start-up fill) into a ``RollingWindow``,
  then ``window.totals()``, which is what ``handle_health`` prints;
* reports: ``storage.scan.scan`` with the ``Query`` ``proxy/reports/build.py`` builds for the
  default summary (the last 24 hours), raw and from the roll-up index, and the real
  command ``python -m proxy report --format json`` run in-process;
* budgets: ``ledger_for`` with a ``budgets:`` section parsed from config, then
  ``replay_log`` as the server runs it at start-up, then ``ledger.spent``.

Every expected number is computed in this file with Decimal from the calls it
generated, each call once, never read back from the code under test. ``NOW`` is fixed:
23:30 UTC on a Wednesday, every call of the day (midnight onwards) is in the last 24
hours and in the current day, week and month, and nothing was logged between the
window's start (23:30 the day before) and midnight, so the three windows hold the same
records and the readers must agree exactly.
"""

from __future__ import annotations

import gzip
import importlib
import itertools
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
import pytest

from proxy.budgets import BudgetLedger, ledger_for
from proxy.cli import main as cli_main
from proxy.config import parse_budgets, parse_config, pricebook_for
from proxy.core.money import cost_units, units_to_usd
from proxy.core.records import CallContext, build_record, dumps_record, json_default
from proxy.core.usage import CallInfo, Usage
from proxy.engine.query import NONE_LABEL, Query
from proxy.engine.totals import RollingWindow, Totals
from proxy.pricing import PriceBook, price_call
from proxy.storage.logfiles import log_files, order_files
from proxy.storage.replay import replay_log
from proxy.storage.scan import scan

UTC = timezone.utc
NOW = datetime(2026, 11, 25, 23, 30, tzinfo=UTC)  # a Wednesday
NOW_TS = NOW.timestamp()
DAY_START = datetime(2026, 11, 25, tzinfo=UTC)
WEEK_START = datetime(2026, 11, 23, tzinfo=UTC)
MONTH_START = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW_START = NOW - timedelta(hours=24)  # /health's and the default report's
HISTORY_START = datetime(2026, 11, 18, tzinfo=UTC)
HISTORY_END = WINDOW_START - timedelta(milliseconds=1)  # the last call before the window
# The writer with record ids took over at 08:00; before, retried batches left repeats.
UPGRADE = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
# Rotations (rotated layout only): history compressed, and a size-based rotation at
# 05:00 that fell in the middle of a retried batch.
GZ_ROTATE = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
ROTATE = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)
POWER_CUT = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)

UNITS = 10**10  # core.money.COST_UNITS_PER_USD, restated: 1e-10 USD
LOG_NAME = "cost-tracking.jsonl"

CONFIG: dict[str, Any] = {
    "catalog": {"enabled": False},  # only the prices below: "unpriced" is deterministic
    "providers": {
        "openai": {
            "base_url": "https://api.openai.com",
            "models": {
                "gpt-4o-mini": {"pricing": {"input": 0.15, "output": 0.60, "cached_input": 0.075}},
                "gpt-5": {
                    "pricing": {
                        "input": 1.25,
                        "output": 10.00,
                        "cached_input": 0.125,
                        "service_tiers": {"flex": {"input": 0.625, "output": 5.00, "cached_input": 0.0625}},
                    }
                },
                "o4-mini": {"pricing": {"input": 1.10, "output": 4.40, "cached_input": 0.275}},
                "text-embedding-3-small": {"pricing": {"input": 0.02, "output": 0}},
            },
        },
        "anthropic": {
            "base_url": "https://api.anthropic.com",
            "models": {
                "claude-sonnet-4-5": {
                    "pricing": {
                        "input": 3.00,
                        "output": 15.00,
                        "cached_input": 0.30,
                        "cache_write": 3.75,
                        "cache_write_1h": 6.00,
                        "web_search": 10,
                    }
                },
                "claude-opus-4-1": {
                    "pricing": {
                        "input": 15.00,
                        "output": 75.00,
                        "cached_input": 1.50,
                        "cache_write": 18.75,
                        "cache_write_1h": 30.00,
                        "web_search": 10,
                    }
                },
            },
        },
        "gemini": {
            "base_url": "https://generativelanguage.googleapis.com",
            "models": {
                "gemini-2.5-flash": {"pricing": {"input": 0.30, "output": 2.50, "cached_input": 0.03}},
                "gemini-2.5-pro": {
                    "pricing": {
                        "input": 1.25,
                        "output": 10.00,
                        "cached_input": 0.125,
                        "tiers": [{"above": 200000, "input": 2.50, "output": 15.00, "cached_input": 0.25}],
                    }
                },
            },
        },
        # An OpenAI-compatible host with odd rates: costs that use all ten decimals.
        "compat": {
            "type": "openai",
            "base_url": "https://llm.internal.example",
            "models": {
                "tiny-1b": {"pricing": {"input": 0.012345, "output": 0.0678901}},
            },
        },
        "local": {"type": "openai", "base_url": "http://127.0.0.1:8000"},  # no prices: unpriced
    },
}

BUDGETS: dict[str, Any] = {
    "timezone": "UTC",
    "allow_unpriced": True,
    "limits": [
        {"scope": "global", "period": "daily", "usd": 500},
        {"scope": "global", "period": "weekly", "usd": 2000},
        {"scope": "global", "period": "monthly", "usd": 5000},
        {"scope": "user", "period": "daily", "usd": 25},
        {"scope": "user", "period": "daily", "match": "alice", "usd": 5},  # same counter as the line above
        {"scope": "key", "period": "daily", "usd": 100},
        {"scope": "team", "period": "daily", "usd": 100},
        {"scope": "tag", "tag": "feature", "period": "daily", "usd": 50},
    ],
}
GLOBAL_DAILY = ("global", None, "daily")
GLOBAL_WEEKLY = ("global", None, "weekly")
GLOBAL_MONTHLY = ("global", None, "monthly")
USER_DAILY = ("user", None, "daily")
KEY_DAILY = ("key", None, "daily")
TEAM_DAILY = ("team", None, "daily")
FEATURE_DAILY = ("tag", "feature", "daily")

# (provider, family, model asked for, model the reply names, endpoint, weight)
MODELS = [
    ("openai", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "/v1/chat/completions", 8),
    ("openai", "openai", "gpt-5", "gpt-5-2025-08-07", "/v1/responses", 3),
    ("openai", "openai", "o4-mini", "o4-mini-2025-04-16", "/v1/chat/completions", 2),
    ("openai", "openai", "text-embedding-3-small", "text-embedding-3-small", "/v1/embeddings", 2),
    ("openai", "openai", "gpt-4.1-nano", "gpt-4.1-nano-2025-04-14", "/v1/chat/completions", 1),  # no price
    ("anthropic", "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "/v1/messages", 5),
    ("anthropic", "anthropic", "claude-opus-4-1", "claude-opus-4-1-20250805", "/v1/messages", 1),
    ("gemini", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:generateContent", 3),
    ("gemini", "gemini", "gemini-2.5-pro", "gemini-2.5-pro", "/v1beta/models/gemini-2.5-pro:streamGenerateContent", 1),
    ("compat", "openai", "tiny-1b", "tiny-1b", "/v1/chat/completions", 3),
    ("local", "openai", "llama-3.3-70b", "llama-3.3-70b", "/v1/chat/completions", 2),  # no price
]
# Proxy keys: (key id, owner, team). A service key (no owner) lets the client name its
# end user with x-user-id; a provider key passed through names nobody ("key:<id>").
KEYS = [
    ("3f1c9a0b7d2e", "alice", "research"),
    ("9b8e7d6c5a41", "bob", "research"),
    ("0c4d2b9f1e37", "carol", "support"),
    ("a17e5c3d9b02", None, "platform"),
    ("5e2f8a6b4c10", None, None),
]
END_USERS = ["cust-001", "cust-002", "cust-003", "'=HYPERLINK(evil)"]  # cleaned: a formula gets a leading '
FEATURES = ["search", "chat", "agent", "summarize"]
UNKNOWN_PROVIDERS = ["opneai", "claude", "v1"]  # typos in a client's base URL


@dataclass
class Call:
    rec: dict[str, Any]  # the record as build_record returned it (costs as Decimal)
    start_ms: int
    end_ms: int
    line: bytes  # as the writer of its time wrote it
    reencoded: bytes  # the same record in other bytes (another key order)

    @property
    def ts(self) -> str:
        return str(self.rec["timestamp"])

    @property
    def family(self) -> str:
        return str(self.rec["provider_type"])


def _usage(rng: random.Random, provider: str, model: str) -> Usage:
    u = Usage()
    if rng.random() < 0.03:
        u.input_tokens = rng.randrange(150_000, 260_000)  # long context (gemini-2.5-pro's upper tier)
    else:
        u.input_tokens = rng.randrange(7, 9000)
    u.output_tokens = 0 if "embedding" in model else rng.choice([rng.randrange(1, 80), rng.randrange(80, 4000)])
    if u.input_tokens > 1024 and rng.random() < 0.35:
        u.cache_read_tokens = rng.randrange(1024, u.input_tokens)
    if provider == "anthropic":
        if rng.random() < 0.2:
            u.cache_write_tokens = rng.randrange(0, u.input_tokens - u.cache_read_tokens + 1)
            if rng.random() < 0.5:
                u.cache_write_1h_tokens = rng.randrange(0, u.cache_write_tokens + 1)
        if rng.random() < 0.1:
            u.web_search_requests = rng.randrange(1, 4)
    if model in ("gpt-5", "o4-mini") and u.output_tokens:
        u.reasoning_tokens = rng.randrange(0, u.output_tokens + 1)
    return u


def make_call(rng: random.Random, book: PriceBook, start_ms: int, seq: int) -> Call:
    kind = rng.choices(
        ["ok", "http_error", "stream_error", "estimated", "usage_error", "unknown_provider", "not_metered", "billable"],
        [80, 8, 2, 3, 2, 2, 2, 1],
    )[0]
    provider, family, model, rmodel, endpoint, _ = rng.choices(MODELS, [m[5] for m in MODELS])[0]
    key_id, owner, team = rng.choice(KEYS)
    if owner is not None:
        user: str | None = owner
    elif team is not None:
        user = rng.choice(END_USERS)
    else:
        user = rng.choice([f"key:{key_id}", None, "cust-002"])
    tags: dict[str, str] = {}
    if rng.random() < 0.85:
        tags["feature"] = rng.choice(FEATURES)
    if rng.random() < 0.1:
        tags["project"] = rng.choice(["apollo", "gemini-migration"])
    if rng.random() < 0.05:
        tags["team"] = "growth"  # a client's own x-tag-team header, whatever its key's team
    ctx = CallContext(
        timestamp=(start_ms + 0.5) / 1000,
        provider=provider,
        family=family,
        endpoint=endpoint,
        model=model,
        is_streaming=rng.random() < 0.4,
        user_id=user,
        key_id=key_id,
        ip_address="10.0.%d.%d" % (rng.randrange(4), rng.randrange(1, 250)),
        metered=True,
        tags=tags,
        team=team,
        session_id=rng.choice([None, None, f"sess-{rng.randrange(40)}"]),
    )
    info = CallInfo(response_model=rmodel, request_id=f"req_{seq:08x}", finish_reason="stop")
    usage: Usage | None = _usage(rng, provider, model)
    status = 200
    error: str | None = None
    source: str | None = "provider"
    latency = rng.uniform(120, 9000) if rng.random() > 0.02 else rng.uniform(300_000, 900_000)  # long streams
    if kind == "http_error":
        status = rng.choice([400, 401, 429, 429, 500, 502, 529])
        error, usage, info.response_model, info.finish_reason = f"upstream {status}", None, None, None
    elif kind == "stream_error":
        error = "stream error event: overloaded_error"  # usage so far was reported and is billed
    elif kind == "estimated":
        error, source = "client disconnected mid-stream", "estimate"
    elif kind == "usage_error":
        usage, info.usage_error, source = None, "implausible usage: prompt_tokens=-5", None
    elif kind == "unknown_provider":
        provider = rng.choice(UNKNOWN_PROVIDERS)
        ctx = CallContext(
            timestamp=ctx.timestamp, provider=provider, family="unknown", endpoint="/chat/completions", ip_address=ctx.ip_address
        )
        info, usage, status, error, source = CallInfo(), None, 404, "unknown provider", None
    elif kind == "not_metered":
        ctx.endpoint, ctx.model, ctx.metered, info.response_model = "/v1/models", None, False, None
        usage, source = None, None
    elif kind == "billable":  # images: billed, but the reply says nothing about usage
        ctx.endpoint, ctx.model, ctx.metered, ctx.billable = "/v1/images/generations", "gpt-image-1", False, True
        usage, source, info.response_model = None, None, None
    price = cost = variant = None
    if usage is not None:
        if provider == "openai" and model == "gpt-5" and rng.random() < 0.3:
            info.service_tier = "flex"
        priced = price_call(
            book,
            provider=ctx.provider,
            family=ctx.family,
            model=ctx.model,
            response_model=info.response_model,
            usage=usage,
            when=ctx.timestamp_dt,
            service_tier=info.service_tier,
        )
        price, cost, variant = priced.price, priced.cost, priced.variant
    rec = build_record(
        ctx,
        info,
        usage=usage,
        status=status,
        error=error,
        latency_ms=latency,
        ttft_ms=None,
        usage_source=source,
        price=price,
        cost=cost,
        price_variant=variant,
        record_id=f"6d1f0c2a9b3e{seq:x}",
    )
    end_ms = min(start_ms + int(latency), int(NOW_TS * 1000))
    return written(Call(rec, start_ms, end_ms, b"", b""))


def written(c: Call, *, old_writer: bool = False) -> Call:
    """The record's bytes, as the writer of its time wrote them."""
    if old_writer:  # before record ids (and overrides) were written
        c.rec.pop("record_id", None)
        c.rec.pop("budget_override", None)
    c.line = dumps_record(c.rec)
    c.reencoded = orjson.dumps({k: c.rec[k] for k in reversed(c.rec)}, default=json_default, option=orjson.OPT_APPEND_NEWLINE)
    return c


def make_calls() -> list[Call]:
    """Each call once, in the order their records were written (by end time)."""
    rng = random.Random(20261125)
    book = pricebook_for(parse_config(CONFIG))

    def ms(dt: datetime) -> int:
        return int(dt.timestamp() * 1000)

    starts = sorted(rng.randrange(ms(HISTORY_START), ms(HISTORY_END)) for _ in range(1100))
    starts.append(ms(HISTORY_END))  # the last instant before the window
    starts.append(ms(DAY_START))  # the first instant of the day (and of the budgets' day)
    starts += sorted(rng.randrange(ms(DAY_START), ms(NOW - timedelta(seconds=1))) for _ in range(2700))
    calls = [make_call(rng, book, s, i) for i, s in enumerate(starts)]
    # Which writer wrote a record goes by when it was written (when the call ended).
    calls = [written(c, old_writer=True) if c.end_ms < ms(UPGRADE) else c for c in calls]
    calls.sort(key=lambda c: (c.end_ms, c.start_ms))
    return calls


# --- the log, as written -----------------------------------------------------------------


def in_24h(c: Call) -> bool:
    return c.ts >= iso(WINDOW_START)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass
class Layout:
    files: list[tuple[str, bytes, float]]  # (name, bytes, mtime), oldest first; the last is the live log
    bad_24h: int = 0  # unparseable lines a report over the last 24 hours meets
    dup_24h: int = 0  # repeated lines or record ids it meets (each call counted once)
    retried_across_rotation: list[Call] = field(default_factory=list)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data, mtime in self.files:
            path = directory / name
            path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
            os.utime(path, (mtime, mtime))
        return directory / LOG_NAME


def render(calls: list[Call], *, rotated: bool) -> Layout:
    """The bytes the writers left. The old writer wrote batches (what one pass of the
    event loop logged) and retried a batch whose write failed part-way by writing it
    again whole: the lines that made it appear twice and the cut line runs into the
    retry's first line. The new writer terminates a torn line and writes the record
    whole; a retry that re-encoded a record left its id twice, in other bytes."""
    rng = random.Random(7)
    layout = Layout(files=[])
    parts: list[bytearray] = [bytearray()]
    last_end: list[int] = [0]
    gz_done, rotation_done, power_cut_done = (not rotated), False, False

    def new_file() -> bytearray:
        parts.append(bytearray())
        last_end.append(0)
        return parts[-1]

    i = batch_no = 0
    while i < len(calls):
        out = parts[-1]
        c = calls[i]
        if "record_id" not in c.rec:  # the old writer
            if not gz_done and c.end_ms >= GZ_ROTATE.timestamp() * 1000:
                out, gz_done = new_file(), True
            k = rng.randrange(3, 12)
            batch = list(itertools.takewhile(lambda x: "record_id" not in x.rec, calls[i : i + k]))
            batch_no += 1
            if batch_no % 5 == 0 and len(batch) >= 3:
                j = rng.randrange(2, len(batch))  # b0..b(j-1) made it, then part of b_j
                cut = rng.randrange(60, len(batch[j].line) - 1)  # past the timestamp: a reader places it in time
                for x in batch[:j]:
                    out += x.line
                out += batch[j].line[:cut]
                layout.bad_24h += in_24h(batch[j])
                across = not rotation_done and batch[0].end_ms >= ROTATE.timestamp() * 1000
                if across and rotated:
                    # Rotated just then: the cut line ends the old file, the retry starts the new one.
                    last_end[-1] = batch[j - 1].end_ms
                    out = new_file()
                    out += batch[0].line
                    layout.dup_24h += in_24h(batch[0])
                    layout.retried_across_rotation = batch[:j]
                else:
                    out += batch[0].line  # the merged line; this copy of b0 is lost in it
                rotation_done = rotation_done or across
                for x in batch[1:j]:
                    out += x.line
                    layout.dup_24h += in_24h(x)
                for x in batch[j:]:
                    out += x.line
            else:
                for x in batch:
                    out += x.line
            if not power_cut_done and batch[-1].end_ms >= POWER_CUT.timestamp() * 1000:
                # Power cut: the file system kept the size but not the data; the writer
                # then terminated the line before appending.
                out += b"\x00" * 37 + b"\n"
                layout.bad_24h += 1  # no timestamp to skip it by: every report meets it
                power_cut_done = True
            last_end[-1] = batch[-1].end_ms
            i += len(batch)
        else:  # the writer with record ids
            r = rng.random()
            if r < 0.015:
                out += c.line[: rng.randrange(60, len(c.line) - 1)] + b"\n"
                layout.bad_24h += in_24h(c)
            out += c.line
            if 0.015 <= r < 0.03:
                out += c.reencoded
                layout.dup_24h += in_24h(c)
            last_end[-1] = c.end_ms
            i += 1
    assert power_cut_done and (rotation_done or not rotated) and (gz_done or not rotated)
    if rotated:
        assert len(parts) == 3 and layout.retried_across_rotation
        names = [LOG_NAME + ".2.gz", LOG_NAME + ".1", LOG_NAME]
    else:
        names = [LOG_NAME]
    mtimes = [e / 1000 for e in last_end[:-1]] + [NOW_TS]
    layout.files = [(n, bytes(p), m) for n, p, m in zip(names, parts, mtimes)]
    return layout


@dataclass
class Generated:
    calls: list[Call]
    single: Path
    single_layout: Layout
    rotated: Path
    rotated_layout: Layout


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    calls = make_calls()
    single, rotated = render(calls, rotated=False), render(calls, rotated=True)
    base = tmp_path_factory.mktemp("one-rule")
    return Generated(calls, single.write(base / "single"), single, rotated.write(base / "rotated"), rotated)


# --- the expected sums, from the calls themselves ------------------------------------------


TOKEN_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


@dataclass
class Sum:
    """What a set of records adds up to, by the documented rule: every record is one
    request; an error is an error text or a status >= 400; a record with a cost is
    priced (its cost added, to the last decimal); without one it is unpriced if it has
    tokens, of unknown usage if its tokens are unknown (null)."""

    requests: int = 0
    errors: int = 0
    priced: int = 0
    unpriced: int = 0
    unknown: int = 0
    cost: Decimal = Decimal(0)
    input_cost: Decimal = Decimal(0)
    output_cost: Decimal = Decimal(0)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_FIELDS, 0))

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        self.errors += bool(rec["error"]) or rec["status"] >= 400
        if rec["total_cost"] is None:
            self.unpriced += rec["total_tokens"] is not None and rec["total_tokens"] > 0
            self.unknown += rec["total_tokens"] is None
        else:
            self.priced += 1
            self.cost += rec["total_cost"]
            self.input_cost += rec["input_cost"]
            self.output_cost += rec["output_cost"]
        for name in TOKEN_FIELDS:
            self.tokens[name] += rec[name] or 0

    @property
    def units(self) -> int:
        return exact_units(self.cost)

    def counts(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "priced": self.priced,
            "unpriced": self.unpriced,
            "unknown": self.unknown,
            "cost_units": self.units,
            "input_cost_units": exact_units(self.input_cost),
            "output_cost_units": exact_units(self.output_cost),
            "tokens": dict(self.tokens),
        }


def exact_units(d: Decimal) -> int:
    scaled = d * UNITS
    assert scaled == scaled.to_integral_value(), f"{d} has more than ten decimals"
    return int(scaled)


def expect(calls: Iterable[Call], pred: Callable[[Call], bool] = lambda c: True) -> Sum:
    s = Sum()
    for c in calls:
        if pred(c):
            s.add(c.rec)
    return s


def expect_by(calls: Iterable[Call], key: Callable[[Call], Any], pred: Callable[[Call], bool] = lambda c: True) -> dict[Any, Sum]:
    out: dict[Any, Sum] = defaultdict(Sum)
    for c in calls:
        if pred(c):
            out[key(c)].add(c.rec)
    return dict(out)


def today(c: Call) -> bool:
    return c.ts >= iso(DAY_START)


def of_totals(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "errors": t.errors,
        "priced": t.priced,
        "unpriced": t.unpriced,
        "unknown": t.unknown,
        "cost_units": t.cost_units,
        "input_cost_units": t.input_cost_units,
        "output_cost_units": t.output_cost_units,
        "tokens": {k: t.tokens[k] for k in TOKEN_FIELDS},
    }


def of_json(row: dict[str, Any]) -> dict[str, Any]:
    """A report's JSON totals, its money read as exact decimals."""
    return {
        "requests": row["requests"],
        "errors": row["errors"],
        "priced": row["priced_requests"],
        "unpriced": row["unpriced_requests"],
        "unknown": row["unknown_usage_requests"],
        "cost_units": exact_units(Decimal(row["total_cost"])),
        "input_cost_units": exact_units(Decimal(row["input_cost"])),
        "output_cost_units": exact_units(Decimal(row["output_cost"])),
        "tokens": {k: row["tokens"][k] for k in TOKEN_FIELDS},
    }


# --- the three readers ------------------------------------------------------------------


def server_load_window() -> Callable[[Path, RollingWindow, float], int]:
    """The server's start-up fill of the /health window, wherever the server lives now
    (``proxy.web.app`` after the move, ``proxy.server`` before it)."""
    errors = []
    for name in ("proxy.web.app", "proxy.server"):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        fn = getattr(module, "load_window", None)
        if fn is not None:
            return fn
        errors.append(f"{name}: no load_window")
    raise AssertionError("cannot find the server's load_window: " + "; ".join(errors))


def health_window(log: Path) -> tuple[int, Totals, dict[str, Totals]]:
    """As at start-up: the window rebuilt from the log, read at NOW."""
    window = RollingWindow(clock=lambda: NOW_TS)  # the server's: 24 h in one-minute buckets
    loaded = server_load_window()(log, window, NOW_TS)
    overall, by_provider = window.totals()
    return loaded, overall, by_provider


def report_files(log: Path) -> list[Path]:
    # As `report --file LOG` resolves them: the file and its rotated siblings, oldest first.
    return order_files(log_files([str(log)]))


def summary_query(dims: tuple[str, ...] = ("provider", "model")) -> Query:
    # What proxy/reports/build.py builds for the default summary (--since 24, UTC); more dims for --group-by.
    return Query(start=(NOW - timedelta(hours=24)).timestamp(), end=None, dims=dims, tz=UTC)


def budget_ledger(log: Path) -> tuple[BudgetLedger, tuple[int, int]]:
    budgets = parse_budgets(BUDGETS, "config.yml")
    ledger = ledger_for(budgets, per_key=False, clock=lambda: NOW_TS)
    return ledger, replay_log(ledger, log)  # as the server calls it: now from the ledger's clock


def report_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log: Path, *args: str) -> dict[str, Any]:
    """`python -m proxy report --format json`, in-process, at NOW."""
    monkeypatch.setenv("ANALYZE_COSTS_NOW", NOW.isoformat())
    monkeypatch.chdir(log.parent)  # no config.yml there: the report needs none
    capsys.readouterr()
    assert cli_main(["report", "--file", str(log), "--format", "json", *args]) == 0
    body: dict[str, Any] = json.loads(capsys.readouterr().out, parse_float=Decimal)
    return body


def health_label(c: Call) -> str:
    return "(unknown)" if c.family == "unknown" else str(c.rec["provider"])  # server.UNKNOWN_PROVIDER


# --- the log really is what it claims --------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "rotated"])
def test_the_generated_log_holds_what_real_logs_hold(gen: Generated, layout: str) -> None:
    calls = gen.calls
    lay = gen.single_layout if layout == "single" else gen.rotated_layout
    lines = [ln for _, data, _ in lay.files for ln in data.splitlines()]
    parsed, bad = [], 0
    for ln in lines:
        try:
            parsed.append(orjson.loads(ln))
        except orjson.JSONDecodeError:
            bad += 1
    ids = [r.get("record_id") for r in parsed if r.get("record_id")]
    with_id = sum(1 for c in calls if "record_id" in c.rec)
    assert 1500 < with_id < len(calls) - 1500 and len(ids) > len(set(ids))  # both eras; ids written twice
    assert len(parsed) > len(calls) and bad >= 10 and lay.bad_24h >= 10 and lay.dup_24h >= 30
    assert sum(1 for ln in lines if ln.startswith(b"\x00")) == 1
    day = [c for c in calls if today(c)]
    assert day == [c for c in calls if in_24h(c)]  # nothing between the window's start and midnight
    assert any(c.ts == iso(DAY_START) for c in day) and any(c.ts == iso(HISTORY_END) for c in calls)
    s = expect(day)
    assert s.unpriced > 50 and s.unknown > 50 and s.errors > 150 and s.priced > 2000
    assert {c.family for c in day} >= {"openai", "anthropic", "gemini", "unknown"}
    assert any(c.end_ms - c.start_ms > 300_000 for c in day)  # long calls, written after later ones
    assert any(c.rec["total_cost"] is not None and c.rec["total_cost"].as_tuple().exponent == -10 for c in day)
    assert any(c.rec["total_cost"] is not None and c.rec["total_cost"] > 1 for c in day)
    assert any(c.rec["total_cost"] == 0 and c.rec["status"] >= 400 for c in day)


# --- one log, three sums ------------------------------------------------------------------------


def test_health_reports_and_budgets_agree_to_the_last_unit(
    gen: Generated, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = gen.single
    want = expect(gen.calls, today)
    want_counts = want.counts()

    # (1) /health
    loaded, health, health_by_provider = health_window(log)
    assert loaded == want.requests
    # (2) the report engine (raw, index build, index reuse) and the CLI
    files = report_files(log)
    scans = {
        name: scan(files, summary_query(), jobs=1, use_index=use)
        for name, use in (("raw", False), ("index build", True), ("index reuse", True))
    }
    cli = report_cli(capsys, monkeypatch, log)
    cli_no_index = report_cli(capsys, monkeypatch, log, "--no-index")
    # (3) the budget replay
    ledger, (read, counted) = budget_ledger(log)
    spent_today = ledger.spent(GLOBAL_DAILY, "*")

    sums = {
        "expected": want.units,
        "/health": health.cost_units,
        "budget replay": spent_today,
        **{f"report scan ({k})": r.totals().cost_units for k, r in scans.items()},
        "report CLI": cost_units(cli["totals"]["total_cost"]),
        "report CLI --no-index": cost_units(cli_no_index["totals"]["total_cost"]),
    }
    assert set(sums.values()) == {want.units}, sums
    assert cost_units(want.cost) == want.units  # the test's own Decimal sum, in the code's units
    # As Decimal too: what /health prints, what the report prints, what the budget says.
    assert health.total_cost == cli["totals"]["total_cost"] == units_to_usd(spent_today) == want.cost
    assert units_to_usd(want.units) == want.cost

    # Every count both sides expose.
    assert of_totals(health) == want_counts
    for name, res in scans.items():
        assert of_totals(res.totals()) == want_counts, name
        assert (res.bad_lines, res.duplicate_lines) == (gen.single_layout.bad_24h, gen.single_layout.dup_24h), name
    for body in (cli, cli_no_index):
        assert of_json(body["totals"]) == want_counts
        assert (body["corrupt_lines"], body["duplicate_lines"]) == (gen.single_layout.bad_24h, gen.single_layout.dup_24h)
    month = expect(gen.calls, lambda c: c.ts >= iso(MONTH_START))
    assert (read, counted) == (month.requests, month.requests)  # each record of the month read once

    # Per provider: /health's provider_costs and the report's by_provider rows.
    by_health = expect_by(gen.calls, health_label, today)
    assert {p: of_totals(t) for p, t in health_by_provider.items()} == {p: s.counts() for p, s in by_health.items()}
    by_provider = expect_by(gen.calls, lambda c: c.rec["provider"], today)
    assert {row["provider"]: of_json(row) for row in cli["by_provider"]} == {p: s.counts() for p, s in by_provider.items()}
    assert {k[0]: of_totals(t) for k, t in scans["raw"].rollup(["provider"]).items()} == {p: s.counts() for p, s in by_provider.items()}
    # The two label a client-invented provider differently ("(unknown)" against its
    # name), and otherwise hold the same rows, which add up the same.
    unknown_names = {c.rec["provider"] for c in gen.calls if c.family == "unknown" and today(c)}
    assert unknown_names and "(unknown)" in health_by_provider
    assert (
        sum(row["requests"] for row in cli["by_provider"] if row["provider"] in unknown_names) == health_by_provider["(unknown)"].requests
    )
    for p, t in health_by_provider.items():
        if p != "(unknown)":
            assert t.cost_units == exact_units(Decimal(next(r["total_cost"] for r in cli["by_provider"] if r["provider"] == p)))

    # Per user, key and feature: the report's groups and the budgets' counters.
    cube = scan(files, summary_query(dims=("provider", "model", "user", "key", "tag:feature")), jobs=1)
    assert of_totals(cube.totals()) == want_counts
    cli_users = report_cli(capsys, monkeypatch, log, "--group-by", "user")
    assert of_json(cli_users["totals"]) == want_counts
    for dim, budget_dim, field_of in (
        ("user", USER_DAILY, lambda c: c.rec["user_id"]),
        ("key", KEY_DAILY, lambda c: c.rec["key_id"]),
        ("tag:feature", FEATURE_DAILY, lambda c: c.rec["tags"].get("feature")),
    ):
        want_by = expect_by(gen.calls, field_of, today)
        assert None in want_by or dim == "key"  # records without the field: a report row "(none)", no budget
        report_rows = {k[0]: of_totals(t) for k, t in cube.rollup([dim]).items()}
        assert report_rows == {NONE_LABEL if v is None else v: s.counts() for v, s in want_by.items()}, dim
        budget_rows = {v: ledger.spent(budget_dim, v) for v in want_by if v is not None}
        assert budget_rows == {v: s.units for v, s in want_by.items() if v is not None}, dim
        limit = next(lim for lim in ledger.limits if lim.dim == budget_dim and lim.match is None)
        listed = {s.value: s.spent for s in ledger.states() if s.limit == limit}
        assert listed == budget_rows, dim  # every value of the day has its budget, and none from nowhere
        if dim == "user":
            assert {g["user"]: of_json(g) for g in cli_users["groups"]} == {
                NONE_LABEL if v is None else v: s.counts() for v, s in want_by.items()
            }
    alice = next(s for s in ledger.states() if s.limit.match == "alice")
    assert alice.spent == ledger.spent(USER_DAILY, "alice") == expect(gen.calls, lambda c: today(c) and c.rec["user_id"] == "alice").units

    # The budgets' team counter is the key's team (docs/budgets.md: `team` is the proxy key's team).
    for team, s in expect_by(gen.calls, lambda c: c.rec["team"], today).items():
        if team is not None:
            assert ledger.spent(TEAM_DAILY, team) == s.units, team


def test_the_week_and_the_month_agree_too(gen: Generated) -> None:
    """Budget periods longer than the window against a report over the same period."""
    ledger, _ = budget_ledger(gen.single)
    files = report_files(gen.single)
    for dim, start in ((GLOBAL_WEEKLY, WEEK_START), (GLOBAL_MONTHLY, MONTH_START)):
        want = expect(gen.calls, lambda c: c.ts >= iso(start))
        res = scan(files, Query(start=start.timestamp(), dims=("provider", "model")), jobs=1, use_index=False)
        assert (ledger.spent(dim, "*"), res.totals().cost_units, res.totals().requests) == (want.units, want.units, want.requests), dim
        assert res.totals().total_cost == units_to_usd(ledger.spent(dim, "*")) == want.cost


def test_the_report_and_the_budgets_split_spend_by_team_the_same_way(
    gen: Generated, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--group-by team` is the record's team (its proxy key's), as budgets count it; a
    client's x-tag-team stays a tag (`--group-by tag:team`). Before, the tag won: 134 of
    the day's records put $1.99 under a team no key has."""
    ledger, _ = budget_ledger(gen.single)
    budget_teams = {s.value: s.spent for s in ledger.states() if s.limit.dim == TEAM_DAILY}
    # The budgets follow the record's team (checked against the calls in the test above).
    assert budget_teams == {t: s.units for t, s in expect_by(gen.calls, lambda c: c.rec["team"], today).items() if t}
    cube = scan(report_files(gen.single), summary_query(("provider", "model", "team")), jobs=1)
    cli = report_cli(capsys, monkeypatch, gen.single, "--group-by", "team")
    report_teams = {k[0]: t.cost_units for k, t in cube.rollup(["team"]).items() if k[0] != NONE_LABEL}
    cli_teams = {g["team"]: exact_units(Decimal(g["total_cost"])) for g in cli["groups"] if g["team"] != NONE_LABEL}
    assert report_teams == cli_teams
    assert report_teams == budget_teams


def test_a_rotated_log_health_and_budgets_count_each_call_once(gen: Generated) -> None:
    """History gzipped, then a rotation in the middle of a retried batch: the repeats
    start the new file."""
    log = gen.rotated
    assert [p.name for p in report_files(log)] == [LOG_NAME + ".2.gz", LOG_NAME + ".1", LOG_NAME]
    assert any(today(c) for c in gen.rotated_layout.retried_across_rotation)
    want = expect(gen.calls, today)
    loaded, health, _ = health_window(log)
    ledger, (read, _) = budget_ledger(log)
    assert (loaded, health.requests, health.cost_units) == (want.requests, want.requests, want.units)
    assert of_totals(health) == want.counts()
    assert ledger.spent(GLOBAL_DAILY, "*") == want.units
    month = expect(gen.calls, lambda c: c.ts >= iso(MONTH_START))
    assert (read, ledger.spent(GLOBAL_MONTHLY, "*")) == (month.requests, month.units)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "scan() dedupes each file on its own (storage/tasks.py: 'copies in two files (a cut batch retried after a "
        "rotation) are both counted'), records_since (/health, budgets) carries one Dedupe across the rotated "
        "files. The batch retried across the 05:00 rotation repeats 5 records (stamped 2026-11-25T05:00:14.509Z "
        "to 05:08:59.454Z, $0.0326534538) at the start of the new file: /health and the budget replay count 2701 "
        "requests and $41.4016990264, storage.scan.scan and `report --format json` 2706 requests and $41.4343524802 "
        "(+5 requests, +326534538 units) with duplicate_lines 103 instead of 108"
    ),
)
def test_a_rotated_log_report_counts_each_call_once(
    gen: Generated, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = gen.rotated
    want = expect(gen.calls, today)
    _, health, _ = health_window(log)
    ledger, _ = budget_ledger(log)
    res = scan(report_files(log), summary_query(), jobs=1, use_index=False)
    cli = report_cli(capsys, monkeypatch, log)
    got = {
        "/health": (health.requests, health.cost_units),
        "budget replay": (want.requests, ledger.spent(GLOBAL_DAILY, "*")),  # (it counts no requests)
        "report scan": (res.totals().requests, res.totals().cost_units),
        "report CLI": (cli["totals"]["requests"], exact_units(Decimal(cli["totals"]["total_cost"]))),
    }
    assert got == {k: (want.requests, want.units) for k in got}
    assert res.duplicate_lines == cli["duplicate_lines"] == gen.rotated_layout.dup_24h
