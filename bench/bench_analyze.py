"""Benchmark: ``scripts/analyze_costs.py`` summary against jq and DuckDB.

    python bench/bench_analyze.py                 # 1,000,000 records
    python bench/bench_analyze.py --records 200000 --keep /tmp/bench.jsonl

Generates a realistic log (three providers, snapshot model names, cache reads,
errors with zero usage, aborted streams with unknown usage, unpriced models,
tags, provider-shaped ``raw_usage``) in a temporary directory, then times the
same aggregation three ways: the CLI's default summary (``--since 100000`` so
every record is in the window), jq computing total cost and cost by provider,
and DuckDB's ``read_json`` computing the same. Each is run after one untimed
warm-up so all three read from the page cache. DuckDB is optional: without it
that row is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

# (provider, family, requested model, response model, input $/M, cached $/M, output $/M, weight)
_MODELS = [
    ("openai", "openai", "gpt-4o", "gpt-4o-2024-08-06", "2.50", "1.25", "10.00", 14),
    ("openai", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "0.15", "0.075", "0.60", 18),
    ("openai", "openai", "gpt-4.1", "gpt-4.1-2025-04-14", "2.00", "0.50", "8.00", 6),
    ("openai", "openai", "gpt-5", "gpt-5-2025-08-07", "1.25", "0.125", "10.00", 7),
    ("openai", "openai", "gpt-5-mini", "gpt-5-mini-2025-08-07", "0.25", "0.025", "2.00", 6),
    ("openai", "openai", "text-embedding-3-small", "text-embedding-3-small", "0.02", "0.02", "0", 4),
    ("anthropic", "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "3.00", "0.30", "15.00", 16),
    ("anthropic", "anthropic", "claude-haiku-4-5", "claude-haiku-4-5-20251001", "1.00", "0.10", "5.00", 9),
    ("anthropic", "anthropic", "claude-opus-4-1", "claude-opus-4-1-20250805", "15.00", "1.50", "75.00", 2),
    ("gemini", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", "0.30", "0.03", "2.50", 10),
    ("gemini", "gemini", "gemini-2.5-pro", "gemini-2.5-pro", "1.25", "0.125", "10.00", 4),
    ("local", "openai", "llama-3.3-70b", "llama-3.3-70b", None, None, None, 2),  # unpriced
]
_FEATURES = ["chat", "search", "summarize", "extract", "agent"]
_TEAMS = ["research", "support", "growth", "platform"]


def _units(rate: str | None) -> int:
    # USD per 1M tokens -> 1e-10 USD per token: exact for rates with <= 4 decimals.
    return int(Decimal(rate) * 10_000) if rate is not None else 0


def _usd(units: int) -> orjson.Fragment:
    return orjson.Fragment(format((Decimal(units) / 10**10).normalize(), "f") if units else "0")


def _raw_usage(family: str, inp: int, out: int, cached: int, reasoning: int) -> dict:
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


def generate_log(path: Path, n: int, seed: int = 7, end: float | None = None, days: float = 45.0) -> None:
    """Write ``n`` records in time order, ending at ``end`` (default: now)."""
    rng = random.Random(seed)
    end = time.time() if end is None else end
    start = end - days * 86400
    step = (end - start) / max(n, 1)
    weights = [m[-1] for m in _MODELS]
    models = [(*m[:4], _units(m[4]), _units(m[5]), _units(m[6]), m[4] is None) for m in _MODELS]
    dumps = orjson.dumps
    t = start
    with open(path, "wb", buffering=1 << 20) as f:
        batch = []
        for i in range(n):
            t += rng.random() * 2 * step
            provider, family, model, response_model, rin, rcached, rout, unpriced = rng.choices(models, weights)[0]
            embedding = model.startswith("text-embedding")
            roll = rng.random()
            streaming = not embedding and rng.random() < 0.4
            status, error, usage = 200, None, True
            if roll < 0.02:
                status, error = 429, "upstream 429: Rate limit reached for requests"
            elif roll < 0.025:
                status, error = 500, "upstream 500: The server had an error while processing your request"
            elif roll < 0.028 and streaming:
                error, usage = "client disconnected mid-stream", False
            inp = int(rng.lognormvariate(7.0, 1.1)) + 20
            out = 0 if embedding else int(rng.lognormvariate(5.2, 1.0)) + 1
            cached = (inp // 128) * 128 if (inp > 1024 and rng.random() < 0.35) else 0
            cached = min(cached, inp)
            reasoning = out // 2 if model.startswith(("gpt-5", "o")) else 0
            tokens: dict[str, int | None]
            costs: tuple[orjson.Fragment | None, orjson.Fragment | None, orjson.Fragment | None]
            if status >= 400:
                tokens = dict(
                    input_tokens=0,
                    output_tokens=0,
                    total_tokens=0,
                    cache_read_tokens=0,
                    cache_write_tokens=0,
                    cache_write_1h_tokens=0,
                    reasoning_tokens=0,
                    web_search_requests=0,
                )
                costs = (_usd(0), _usd(0), _usd(0))
                raw = None
            elif not usage:
                tokens = dict.fromkeys(
                    (
                        "input_tokens",
                        "output_tokens",
                        "total_tokens",
                        "cache_read_tokens",
                        "cache_write_tokens",
                        "cache_write_1h_tokens",
                        "reasoning_tokens",
                        "web_search_requests",
                    )
                )
                costs = (None, None, None)
                raw = None
            else:
                tokens = dict(
                    input_tokens=inp,
                    output_tokens=out,
                    total_tokens=inp + out,
                    cache_read_tokens=cached,
                    cache_write_tokens=0,
                    cache_write_1h_tokens=0,
                    reasoning_tokens=reasoning,
                    web_search_requests=0,
                )
                raw = _raw_usage(family, inp, out, cached, reasoning)
                if unpriced:
                    costs = (None, None, None)
                else:
                    ic = (inp - cached) * rin + cached * rcached
                    oc = out * rout
                    costs = (_usd(ic), _usd(oc), _usd(ic + oc))
            latency = round(rng.lognormvariate(6.8, 0.7), 2)
            ms = int(t * 1000)
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
            rec = {
                "schema_version": 1,
                "timestamp": ts,
                "request_id": f"req_{rng.getrandbits(64):016x}",
                "user_id": f"user-{int(rng.paretovariate(1.2)) % 200:03d}",
                "key_id": f"{rng.getrandbits(48) % 12:012x}",
                "ip_address": f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}",
                "provider": provider,
                "provider_type": family,
                "model": model,
                "response_model": response_model if status < 400 else None,
                "endpoint": "/v1/embeddings"
                if embedding
                else (
                    "/v1/messages"
                    if family == "anthropic"
                    else (f"/v1beta/models/{model}:generateContent" if family == "gemini" else "/v1/chat/completions")
                ),
                "is_streaming": streaming,
                **tokens,
                "input_cost": costs[0],
                "output_cost": costs[1],
                "total_cost": costs[2],
                "currency": "USD",
                "pricing_source": None if costs[2] is None else "config",
                "price_id": None if costs[2] is None else "a1b2c3d4e5",
                "service_tier": "default" if family == "openai" and status < 400 else None,
                "finish_reason": None if status >= 400 or not usage else ("stop" if family != "anthropic" else "end_turn"),
                "status": status,
                "error": error,
                "latency_ms": latency,
                "ttft_ms": round(latency * 0.3, 2) if streaming else None,
                "usage_source": "provider" if (usage and status < 400) else None,
                "raw_usage": raw,
                "tags": {"feature": rng.choice(_FEATURES), "team": rng.choice(_TEAMS)},
            }
            batch.append(dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
            if len(batch) >= 10000:
                f.write(b"".join(batch))
                batch.clear()
        f.write(b"".join(batch))


JQ_PROGRAM = "reduce inputs as $r ({total: 0, by: {}}; .total += ($r.total_cost // 0) | .by[$r.provider] += ($r.total_cost // 0))"
DUCKDB_SQL = (
    "SELECT provider, sum(total_cost) AS cost, count(*) AS n FROM read_json('{path}', format='newline_delimited', "
    "columns={{provider: 'VARCHAR', total_cost: 'DECIMAL(18,10)', timestamp: 'VARCHAR'}}) GROUP BY ALL"
)


def _timed(fn, runs: int) -> float:
    fn()  # warm-up: every contender reads from the page cache
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3, help="timed runs each; the best is reported (default 3)")
    p.add_argument("--keep", help="write the generated log here and keep it")
    p.add_argument("--log", help="use this existing log instead of generating one (it is not modified)")
    p.add_argument("--no-jq", action="store_true", help="skip jq (slow on large logs)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    try:
        if args.log:
            path = Path(args.log)
        else:
            path = Path(args.keep) if args.keep else tmp / "cost-tracking.jsonl"
            t0 = time.perf_counter()
            generate_log(path, args.records)
            print(f"generated {args.records:,} records, {path.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t0:.1f}s")
        n = sum(1 for _ in open(path, "rb"))
        cli = [sys.executable, str(ROOT / "scripts" / "analyze_costs.py"), "--file", str(path), "--since", "100000"]
        index = path.with_name(f".{path.name}.rollup")
        results: dict[str, float] = {}

        def run_cli(*extra: str) -> None:
            subprocess.run(cli + list(extra), check=True, stdout=subprocess.DEVNULL)

        def once(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)  # page cache, for everyone
        index.unlink(missing_ok=True)
        results["summary, first run (builds index)"] = once(run_cli)
        results["summary (index up to date)"] = _timed(run_cli, args.runs)
        if not args.log:  # never append to a log we were given
            with open(path, "ab") as f:  # the live case: the proxy appended since the last report
                tail = Path(tmp) / "tail.jsonl"
                generate_log(tail, 1000, seed=99)
                f.write(tail.read_bytes())
            results["summary after +1,000 lines (re-verified)"] = once(run_cli)
        results["summary --no-index (parse every line)"] = once(lambda: run_cli("--no-index"))
        out = subprocess.run(cli, check=True, capture_output=True, text=True).stdout
        print(out)

        jq = shutil.which("jq")
        if args.no_jq:
            print("jq: skipped (--no-jq)")
        elif jq is None:
            print("jq: not installed, skipped (apt-get install -y jq)")
        else:

            def run_jq() -> None:
                subprocess.run([jq, "-n", "-c", JQ_PROGRAM, str(path)], check=True, stdout=subprocess.DEVNULL)

            results["jq (total + by provider)"] = once(run_jq)
            print("jq:", subprocess.run([jq, "-n", "-c", JQ_PROGRAM, str(path)], check=True, capture_output=True, text=True).stdout.strip())
        try:
            import duckdb  # optional benchmark dependency, never a runtime one
        except ImportError:
            print("duckdb: not installed, skipped (pip install duckdb)")
        else:
            sql = DUCKDB_SQL.format(path=str(path).replace("'", "''"))

            def run_duckdb() -> None:
                con = duckdb.connect()
                con.execute(sql).fetchall()
                con.close()

            results["duckdb read_json (same)"] = _timed(run_duckdb, args.runs)
            rows = duckdb.connect().execute(sql).fetchall()
            print("duckdb:", sorted((r[0], str(r[1]), r[2]) for r in rows))

        base = results["summary (index up to date)"]
        print(
            f"\n{n:,} records, {path.stat().st_size / 1e6:,.0f} MB, {os.cpu_count()} CPUs; "
            f"'best of {args.runs}' rows are the fastest of {args.runs} runs, others a single run"
        )
        print(f"{'what':<42} {'seconds':>8} {'÷ analyze_costs summary':>24}")
        for name, secs in results.items():
            print(f"{name:<42} {secs:>8.2f} {secs / base:>23.2f}x")
        if "duckdb read_json (same)" in results:
            d = results["duckdb read_json (same)"]
            print(
                f"\nsummary vs DuckDB: {base / d:.2f}x DuckDB's time (goal: <= 2x); "
                f"first run {results['summary, first run (builds index)'] / d:.2f}x, "
                f"no index {results['summary --no-index (parse every line)'] / d:.2f}x"
            )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
