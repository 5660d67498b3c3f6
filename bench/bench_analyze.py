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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as ``python bench/bench_analyze.py``: tests.support from the repository
    sys.path.insert(0, str(ROOT))

from tests.support import synthlog  # noqa: E402


def generate_log(path: Path, n: int, seed: int = 7, end: float | None = None, days: float = 45.0) -> None:
    """Write ``n`` records in time order, ending at ``end`` (default: now): the realistic
    mix of tests/support/synthlog.py (the generator the report tests use too)."""
    synthlog.write_log(path, synthlog.records(n, mix=synthlog.REALISTIC, seed=seed, end=end, days=days))


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
    raise SystemExit(main())
