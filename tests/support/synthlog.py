"""The synthetic cost log: records shaped like the proxy's JSONL lines, made from a seed.

One generator for the report tests and for ``bench/bench_analyze.py``. A *mix* says
which calls are drawn; the record layout (every field, in the proxy's order), the
pricing arithmetic and the bytes written are the same for every mix:

* ``CLI``: the report tests' small log. Seven models (a snapshot name, an alias and an
  unpriced local model among them), users alice, bob, carol and a spreadsheet formula,
  5 % rate-limited and 2 % failed calls at zero cost, 2 % cut before usage was known,
  two tags; the fields the reports do not read left at their plainest.
* ``REALISTIC``: the benchmark's log. Twelve weighted models over three providers and a
  local one, log-normal sizes, cache reads and reasoning tokens, endpoints per family,
  provider-shaped ``raw_usage``, time to first token, a Pareto spread of 200 users over
  12 keys; every field as the proxy fills it.

Both mixes draw exactly what they drew before they shared this module, so a seed gives
the same records (the tests' expectations and the figures in docs/ came from them).

Costs are exact: a rate in USD per 1M tokens with at most four decimals is a whole number
of 1e-10 USD per token, so every cost is an integer count of 1e-10 USD, a ``Decimal``
with exponent -10 in the records (``Decimal(0)`` for a failed call) and written as the
shortest plain decimal.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson

from tests.support.records import TOKEN_FIELDS

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


@dataclass(frozen=True)
class Model:
    provider: str
    family: str
    name: str  # as the client asked for it
    response_model: str
    input: str | None  # USD per 1M tokens, as a config writes it; None: unpriced
    cached: str | None
    output: str | None
    weight: int = 1

    @property
    def priced(self) -> bool:
        return self.input is not None and self.cached is not None and self.output is not None


@dataclass(slots=True)
class Call:
    """What one draw decided about a call; ``record`` turns it into the logged record."""

    ms: int  # when it started, ms since the epoch
    model: Model
    request_id: str
    user_id: str
    key_id: str
    ip_address: str
    endpoint: str
    streaming: bool
    status: int
    error: str | None
    usage_known: bool
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    latency_ms: float
    tags: dict[str, str]


@dataclass(frozen=True)
class Mix:
    name: str
    models: tuple[Model, ...]
    # (rng, n, end, days) -> n calls in time order, the last before ``end``.
    draw: Callable[[random.Random, int, datetime | float, float], Iterator[Call]]
    # Fill every field as the proxy does (price id, service tier, finish reason and usage
    # source of failed calls, ttft, raw_usage), or leave them at their plainest.
    full: bool


# --------------------------------------------------------------------------- the records


@functools.lru_cache(maxsize=None)
def units(rate: str | None) -> int:
    """USD per 1M tokens -> 1e-10 USD per token: exact for rates with <= 4 decimals."""
    return int(Decimal(rate) * 10_000) if rate is not None else 0


def usd(n: int) -> Decimal:
    """``n`` units of 1e-10 USD."""
    return Decimal(n).scaleb(-10) if n else Decimal(0)


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def raw_usage(family: str, inp: int, out: int, cached: int, reasoning: int) -> dict[str, Any]:
    """The usage object the provider's reply held, in its own shape."""
    if family == "anthropic":
        return {
            "input_tokens": inp - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": out,
            "service_tier": "standard",
        }
    if family == "gemini":
        return {
            "promptTokenCount": inp,
            "candidatesTokenCount": out - reasoning,
            "totalTokenCount": inp + out,
            "cachedContentTokenCount": cached,
            "thoughtsTokenCount": reasoning,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": inp}],
        }
    return {
        "prompt_tokens": inp,
        "completion_tokens": out,
        "total_tokens": inp + out,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def record(c: Call, full: bool) -> dict[str, Any]:
    """The record the proxy would have logged for ``c``."""
    m = c.model
    failed = c.status >= 400
    ok = c.usage_known and not failed
    tokens: dict[str, int | None]
    cost: tuple[Decimal, Decimal, Decimal] | None
    if failed:  # an HTTP error: nothing used, nothing billed
        tokens = dict.fromkeys(TOKEN_FIELDS, 0)
        cost = (usd(0), usd(0), usd(0))
    elif not c.usage_known:
        tokens = dict.fromkeys(TOKEN_FIELDS)
        if not full:
            tokens["web_search_requests"] = 0
        cost = None
    else:
        inp, out, cached = c.input_tokens, c.output_tokens, c.cached_tokens
        tokens = dict(
            input_tokens=inp,
            output_tokens=out,
            total_tokens=inp + out,
            cache_read_tokens=cached,
            cache_write_tokens=0,
            cache_write_1h_tokens=0,
            reasoning_tokens=c.reasoning_tokens,
            web_search_requests=0,
        )
        if m.priced:
            ic = (inp - cached) * units(m.input) + cached * units(m.cached)
            oc = out * units(m.output)
            cost = (usd(ic), usd(oc), usd(ic + oc))
        else:
            cost = None
    if full:
        finish = ("end_turn" if m.family == "anthropic" else "stop") if ok else None
        source = "provider" if ok else None
    else:
        finish, source = "stop", "provider"
    return {
        "schema_version": 2,
        "timestamp": iso(c.ms),
        "request_id": c.request_id,
        "user_id": c.user_id,
        "key_id": c.key_id,
        "ip_address": c.ip_address,
        "provider": m.provider,
        "provider_type": m.family,
        "model": m.name,
        "response_model": None if failed else m.response_model,
        "endpoint": f"/{m.provider}{c.endpoint}",  # as the client called it (schema 2)
        "is_streaming": c.streaming,
        **tokens,
        "input_cost": None if cost is None else cost[0],
        "output_cost": None if cost is None else cost[1],
        "total_cost": None if cost is None else cost[2],
        "currency": "USD",
        "pricing_source": None if cost is None else "config",
        "price_id": "a1b2c3d4e5" if full and cost is not None else None,
        "service_tier": "default" if full and m.family == "openai" and not failed else None,
        "finish_reason": finish,
        "status": c.status,
        "error": c.error,
        "latency_ms": c.latency_ms,
        "ttft_ms": round(c.latency_ms * 0.3, 2) if full and c.streaming else None,
        "usage_source": source,
        "raw_usage": raw_usage(m.family, c.input_tokens, c.output_tokens, c.cached_tokens, c.reasoning_tokens) if full and ok else None,
        "tags": c.tags,
    }


def records(n: int, *, mix: Mix, seed: int, end: datetime | float | None = None, days: float = 40.0) -> Iterator[dict[str, Any]]:
    """``n`` records in time order over the ``days`` before ``end`` (default: now)."""
    full = mix.full
    for c in mix.draw(random.Random(seed), n, time.time() if end is None else end, days):
        yield record(c, full)


def _decimal(o: Any) -> Any:
    if isinstance(o, Decimal):
        return orjson.Fragment(format(o.normalize(), "f"))
    raise TypeError


def dumps(rec: dict[str, Any]) -> bytes:
    """One log line: exact decimals as the shortest plain number, then a newline."""
    return orjson.dumps(rec, default=_decimal, option=orjson.OPT_APPEND_NEWLINE)


def write_log(path: Path, recs: Iterable[dict[str, Any]]) -> Path:
    """Write the records as a JSONL log (streamed: a million records fit)."""
    with open(path, "wb", buffering=1 << 20) as f:
        batch: list[bytes] = []
        for rec in recs:
            batch.append(dumps(rec))
            if len(batch) >= 10000:
                f.write(b"".join(batch))
                batch.clear()
        f.write(b"".join(batch))
    return path


# --------------------------------------------------------------------------- the CLI tests' mix


def _cli_calls(rng: random.Random, n: int, end: datetime | float, days: float) -> Iterator[Call]:
    if not isinstance(end, datetime):
        end = datetime.fromtimestamp(end, UTC)
    start = end - timedelta(days=days)
    step = (end - start) / n
    for i in range(n):
        t = start + step * i + timedelta(milliseconds=rng.randrange(1000))
        m = rng.choice(CLI.models)
        roll = rng.random()
        status, error = 200, None
        usage_known = True
        if roll < 0.05:
            status, error = 429, "upstream 429: rate limited"
        elif roll < 0.07:
            status, error = 500, "upstream 500: boom"
        elif roll < 0.09:
            usage_known = False
            error = "client disconnected mid-stream"
        inp = rng.randrange(10, 4000)
        # Every fourth call is a short reply; some long prompts read from cache.
        outp = rng.randrange(1, 60) if i % 4 == 0 else rng.randrange(100, 2000)
        cached = (inp // 2) if (inp > 1024 and rng.random() < 0.3) else 0
        user = rng.choice(["alice", "bob", "carol", "=cmd()"])
        streaming = rng.random() < 0.5
        latency = round(rng.uniform(50, 3000), 2)
        tags = {"feature": rng.choice(["search", "chat"]), "team": rng.choice(["research", "support"])}
        yield Call(
            ms=(t - EPOCH) // MS,
            model=m,
            request_id=f"req-{i}",
            user_id=user,
            key_id="k1",
            ip_address="10.0.0.1",
            endpoint="/v1/messages" if m.family == "anthropic" else "/v1/chat/completions",
            streaming=streaming,
            status=status,
            error=error,
            usage_known=usage_known,
            input_tokens=inp,
            output_tokens=outp,
            cached_tokens=cached,
            reasoning_tokens=0,
            latency_ms=latency,
            tags=tags,
        )


CLI = Mix(
    "cli",
    (
        Model("openai", "openai", "gpt-4o", "gpt-4o-2024-08-06", "2.50", "1.25", "10.00"),
        Model("openai", "openai", "gpt-4o-2024-08-06", "gpt-4o-2024-08-06", "2.50", "1.25", "10.00"),
        Model("openai", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "0.15", "0.075", "0.60"),
        Model("anthropic", "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "3.00", "0.30", "15.00"),
        Model("anthropic", "anthropic", "sonnet", "claude-sonnet-4-5-20250929", "3.00", "0.30", "15.00"),
        Model("gemini", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", "0.30", "0.03", "2.50"),
        Model("local", "openai", "llama-3.3-70b", "llama-3.3-70b", None, None, None),
    ),
    _cli_calls,
    full=False,
)


# --------------------------------------------------------------------------- the benchmark's mix

_FEATURES = ["chat", "search", "summarize", "extract", "agent"]
_TEAMS = ["research", "support", "growth", "platform"]


def _realistic_calls(rng: random.Random, n: int, end: datetime | float, days: float) -> Iterator[Call]:
    stop = end.timestamp() if isinstance(end, datetime) else end
    start = stop - days * 86400
    step = (stop - start) / max(n, 1)
    models = REALISTIC.models
    weights = [m.weight for m in models]
    t = start
    for _ in range(n):
        t += rng.random() * 2 * step
        m = rng.choices(models, weights)[0]
        embedding = m.name.startswith("text-embedding")
        roll = rng.random()
        streaming = not embedding and rng.random() < 0.4
        status, error, usage_known = 200, None, True
        if roll < 0.02:
            status, error = 429, "upstream 429: Rate limit reached for requests"
        elif roll < 0.025:
            status, error = 500, "upstream 500: The server had an error while processing your request"
        elif roll < 0.028 and streaming:
            error, usage_known = "client disconnected mid-stream", False
        inp = int(rng.lognormvariate(7.0, 1.1)) + 20
        out = 0 if embedding else int(rng.lognormvariate(5.2, 1.0)) + 1
        cached = (inp // 128) * 128 if (inp > 1024 and rng.random() < 0.35) else 0
        cached = min(cached, inp)
        reasoning = out // 2 if m.name.startswith(("gpt-5", "o")) else 0
        latency = round(rng.lognormvariate(6.8, 0.7), 2)
        if embedding:
            endpoint = "/v1/embeddings"
        elif m.family == "anthropic":
            endpoint = "/v1/messages"
        elif m.family == "gemini":
            endpoint = f"/v1beta/models/{m.name}:generateContent"
        else:
            endpoint = "/v1/chat/completions"
        yield Call(
            ms=int(t * 1000),
            model=m,
            request_id=f"req_{rng.getrandbits(64):016x}",
            user_id=f"user-{int(rng.paretovariate(1.2)) % 200:03d}",
            key_id=f"{rng.getrandbits(48) % 12:012x}",
            ip_address=f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}",
            endpoint=endpoint,
            streaming=streaming,
            status=status,
            error=error,
            usage_known=usage_known,
            input_tokens=inp,
            output_tokens=out,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            latency_ms=latency,
            tags={"feature": rng.choice(_FEATURES), "team": rng.choice(_TEAMS)},
        )


REALISTIC = Mix(
    "realistic",
    (
        Model("openai", "openai", "gpt-4o", "gpt-4o-2024-08-06", "2.50", "1.25", "10.00", 14),
        Model("openai", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "0.15", "0.075", "0.60", 18),
        Model("openai", "openai", "gpt-4.1", "gpt-4.1-2025-04-14", "2.00", "0.50", "8.00", 6),
        Model("openai", "openai", "gpt-5", "gpt-5-2025-08-07", "1.25", "0.125", "10.00", 7),
        Model("openai", "openai", "gpt-5-mini", "gpt-5-mini-2025-08-07", "0.25", "0.025", "2.00", 6),
        Model("openai", "openai", "text-embedding-3-small", "text-embedding-3-small", "0.02", "0.02", "0", 4),
        Model("anthropic", "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "3.00", "0.30", "15.00", 16),
        Model("anthropic", "anthropic", "claude-haiku-4-5", "claude-haiku-4-5-20251001", "1.00", "0.10", "5.00", 9),
        Model("anthropic", "anthropic", "claude-opus-4-1", "claude-opus-4-1-20250805", "15.00", "1.50", "75.00", 2),
        Model("gemini", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", "0.30", "0.03", "2.50", 10),
        Model("gemini", "gemini", "gemini-2.5-pro", "gemini-2.5-pro", "1.25", "0.125", "10.00", 4),
        Model("local", "openai", "llama-3.3-70b", "llama-3.3-70b", None, None, None, 2),  # unpriced
    ),
    _realistic_calls,
    full=True,
)
