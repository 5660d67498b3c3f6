"""Benchmark: reports over a large log, each against DuckDB's ``read_json`` on the same
aggregation in the same run.

    python bench/bench_analyze.py                          # 1,000,000 records (~1 GB)
    python bench/bench_analyze.py --records 200000 --no-jq --json-out /tmp/analyze.json
    python bench/bench_analyze.py --log /tmp/big.jsonl     # an existing log (left unchanged)

Generates a realistic log (tests/support/synthlog.py: three providers, snapshot model
names, cache reads, errors with zero usage, aborted streams with unknown usage, unpriced
models, tags, provider-shaped ``raw_usage``) in a temporary directory, then times the
CLI summary (``analyze_costs.py --since 100000``: every record in the window) three ways:

* **foreign log, first report**: a log no proxy indexed (no ``.rollup`` beside it): the
  report reads every line and writes the index. Each timed run starts without an index.
* **proxy-written log**: the index kept as the proxy keeps it, by the function its
  upkeep runs (``storage.index.update_index``, called here directly, in this process,
  with the upkeep's memo), then 1,000 more lines appended and indexed the same way, as
  the proxy appends; the report then checks every segment's CRC (the log changed since
  the index was last checked in full) and reads nothing raw.
* **indexed**: the same report again, the log untouched since.

and DuckDB computing total cost and cost by provider (``read_json`` with a DECIMAL cost
column). Every timed row is the best of ``--runs`` runs after one untimed warm-up, all
from the page cache. The ratios go to ``--json-out`` for bench/bench_scale.py. DuckDB is
optional (``pip install duckdb``): without it there are no ratios. jq is timed only with
``--jq`` (about 40 s per GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as ``python bench/bench_analyze.py``: tests.support from the repository
    sys.path.insert(0, str(ROOT))

from proxy.engine.rollup import fast_path  # noqa: E402
from proxy.storage.index import index_path, lock_path, update_index  # noqa: E402
from proxy.storage.memo import SegmentMemo  # noqa: E402
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


def best_of(runs: int, fn: Callable[[], None], before: Callable[[], None] = lambda: None) -> float:
    """The fastest of ``runs`` timed calls after one untimed warm-up (``before`` runs
    untimed ahead of each)."""
    before()
    fn()
    best = float("inf")
    for _ in range(runs):
        before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def drop_index(path: Path) -> None:
    index_path(path).unlink(missing_ok=True)
    lock_path(path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3, help="timed runs each; the best is reported (default 3)")
    p.add_argument("--keep", help="write the generated log here and keep it")
    p.add_argument("--log", help="use this existing log instead of generating one (copied: it is not modified)")
    p.add_argument("--jq", action="store_true", help="time jq too (slow: about 40 s per GB)")
    p.add_argument("--no-jq", action="store_true", help="(the default) skip jq")
    p.add_argument("--json-out", help="write the ratios here as JSON")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    try:
        path = Path(args.keep) if args.keep else tmp / "cost-tracking.jsonl"
        if args.log:
            shutil.copyfile(args.log, path)  # a copy: the proxy-written case appends to it
        else:
            t0 = time.perf_counter()
            generate_log(path, args.records)
            print(f"generated {args.records:,} records, {path.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t0:.1f}s")
        drop_index(path)
        n = sum(1 for _ in open(path, "rb"))
        cli = [sys.executable, str(ROOT / "scripts" / "analyze_costs.py"), "--file", str(path), "--since", "100000"]
        results: dict[str, float] = {}

        def run_cli(*extra: str) -> None:
            subprocess.run(cli + list(extra), check=True, stdout=subprocess.DEVNULL)

        subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)  # page cache, for everyone
        print(f"roll-up fast path (msgspec): {'on' if fast_path() else 'off (pip install msgspec)'}")
        results["foreign log, first report (reads every line, writes the index)"] = best_of(
            args.runs, run_cli, before=lambda: drop_index(path)
        )
        results["--no-index (parses every line, no index)"] = best_of(1, lambda: run_cli("--no-index"))
        if not _agree(cli, "the first report"):
            return 1

        # The proxy's upkeep: its function, its memo, kept across its passes.
        drop_index(path)
        memo = SegmentMemo(max_shapes=0)
        t0 = time.perf_counter()
        update_index(path, memo)
        upkeep_build = time.perf_counter() - t0
        with open(path, "ab") as f:  # the proxy appends; its upkeep catches up after a quiet second
            f.write(b"".join(synthlog.dumps(r) for r in synthlog.records(1000, mix=synthlog.REALISTIC, seed=99)))
        t0 = time.perf_counter()
        update_index(path, memo)
        upkeep_pass = time.perf_counter() - t0
        results["proxy-written log, report (index kept by the upkeep)"] = best_of(args.runs, run_cli)
        results["indexed report (log untouched since)"] = best_of(args.runs, run_cli)
        if not _agree(cli, "the proxy-written log's report"):
            return 1
        print(subprocess.run(cli, check=True, capture_output=True, text=True).stdout)

        jq = shutil.which("jq")
        if not args.jq:
            print("jq: skipped (--jq to time it)")
        elif jq is None:
            print("jq: not installed, skipped (apt-get install -y jq)")
        else:

            def run_jq() -> None:
                subprocess.run([jq, "-n", "-c", JQ_PROGRAM, str(path)], check=True, stdout=subprocess.DEVNULL)

            results["jq (total + by provider)"] = best_of(1, run_jq)
        duck = None
        try:
            import duckdb  # optional benchmark dependency, never a runtime one
        except ImportError:
            print("duckdb: not installed, no ratios (pip install duckdb)")
        else:
            sql = DUCKDB_SQL.format(path=str(path).replace("'", "''"))

            def run_duckdb() -> None:
                con = duckdb.connect()
                con.execute(sql).fetchall()
                con.close()

            duck = results["DuckDB read_json (total + by provider)"] = best_of(args.runs, run_duckdb)
            rows = duckdb.connect().execute(sql).fetchall()
            print("duckdb:", sorted((r[0], str(r[1]), r[2]) for r in rows))

        lines = sum(1 for _ in open(path, "rb"))
        print(
            f"\n{lines:,} records ({n:,} for the first report), {path.stat().st_size / 1e6:,.0f} MB, {os.cpu_count()} CPUs; "
            f"each row the best of {args.runs} runs (--no-index and jq: one run)"
        )
        print(f"the upkeep's own work (in the proxy's background): {upkeep_build:.2f}s to index the log, {upkeep_pass:.2f}s a pass after")
        print(f"{'what':<64} {'seconds':>8} {'÷ DuckDB':>9}")
        for name, secs in results.items():
            ratio = f"{secs / duck:>8.2f}x" if duck else "      n/a"
            print(f"{name:<64} {secs:>8.2f} {ratio}")
        goals: dict[str, Any] = {
            "foreign_first_report_ratio": None,
            "proxy_written_report_ratio": None,
            "indexed_report_ratio": None,
            "duckdb_seconds": duck,
        }
        if duck:
            goals["foreign_first_report_ratio"] = results["foreign log, first report (reads every line, writes the index)"] / duck
            goals["proxy_written_report_ratio"] = results["proxy-written log, report (index kept by the upkeep)"] / duck
            goals["indexed_report_ratio"] = results["indexed report (log untouched since)"] / duck
            print(
                f"\nforeign log, first report: {goals['foreign_first_report_ratio']:.2f}x DuckDB's time (goal <= 2x); "
                f"proxy-written log: {goals['proxy_written_report_ratio']:.2f}x; indexed: {goals['indexed_report_ratio']:.2f}x"
            )
        if args.json_out:
            Path(args.json_out).write_text(
                json.dumps({"goals": goals, "seconds": results, "records": lines, "bytes": path.stat().st_size}, indent=2)
            )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _agree(cli: list[str], what: str) -> bool:
    """Whether the report (from the index) says what ``--no-index`` (every line read) says."""
    indexed, raw = (subprocess.run(cli + extra, check=True, capture_output=True, text=True).stdout for extra in ([], ["--no-index"]))
    # (The period shown ends at the report's own time: the one line allowed to differ.)
    same = [x for x in indexed.splitlines() if not x.startswith("Time Period")] == [
        x for x in raw.splitlines() if not x.startswith("Time Period")
    ]
    if not same:
        print(f"MISMATCH: {what} and --no-index disagree", file=sys.stderr)
    return same


if __name__ == "__main__":
    raise SystemExit(main())
