#!/usr/bin/env python3
"""Every figure of "metering for free, both cores, reports never cold" in one run, each
as a ratio against the baseline measured in the same run:

    python bench/bench_scale.py                  # about 6 minutes (1,000,000-record log)
    python bench/bench_scale.py --quick          # about 2 minutes (200,000 records)

It runs, one after the other (never at once: they would measure each other):

* ``bench_proxy.py --quick``: the proxy's CPU per call against the bare aiohttp
  forwarder's, and the added time to a stream's first byte;
* ``bench_workers.py``: ``--workers 2`` against one worker at 32 callers;
* ``bench_analyze.py``: a foreign log's first report, a proxy-written log's report and
  the indexed report, each against DuckDB's ``read_json`` on the same aggregation.

and prints one table (also written as JSON to ``bench/results/scale.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"


def _run(script: str, args: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / script), *args, "--json-out", str(out)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=HERE.parent)
    if done.returncode != 0 or not out.exists():
        print(f"  {script} failed (status {done.returncode})", flush=True)
        return {}
    goals: dict[str, Any] = json.loads(out.read_text()).get("goals", {})
    return goals


def _fmt(v: Any, unit: str = "x") -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}{unit}" if unit == "x" else f"{v:+.3f} {unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs and a 200,000-record log")
    ap.add_argument("--records", type=int, help="records in the generated log (default 1,000,000; --quick 200,000)")
    args = ap.parse_args(argv)
    records = args.records or (200_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        tmp = Path(d)
        proxy = _run("bench_proxy.py", ["--quick"], tmp / "proxy.json")
        workers = _run("bench_workers.py", ["--quick"] if args.quick else [], tmp / "workers.json")
        reports = _run("bench_analyze.py", ["--records", str(records), "--no-jq"], tmp / "analyze.json")
    rows = [
        ("proxy CPU per call / bare forwarder's", _fmt(proxy.get("cpu_per_call_ratio")), "<= 1.10x"),
        ("stream first byte, proxy - bare forwarder", _fmt(proxy.get("stream_ttfb_added_ms"), "ms"), "<= +0.300 ms"),
        (
            "2 workers / 1 worker, calls/s at 32 callers",
            _fmt(workers.get("two_workers_throughput_ratio")),
            f">= {workers.get('goal', 1.4)}x" + ("" if workers.get("pinned") else " (CPUs shared, not pinned)"),
        ),
        (f"foreign log, first report / DuckDB ({records:,} records)", _fmt(reports.get("foreign_first_report_ratio")), "<= 2x"),
        ("proxy-written log, first report / DuckDB", _fmt(reports.get("proxy_written_report_ratio")), "fast from the first run"),
        ("indexed report / DuckDB", _fmt(reports.get("indexed_report_ratio")), "(info)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nllm-cost-proxy scale figures ({os.cpu_count()} CPUs), each against its baseline in this run:")
    print(f"  {'figure':<{width}}  {'measured':>12}  goal")
    for name, value, goal in rows:
        print(f"  {name:<{width}}  {value:>12}  {goal}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"proxy": proxy, "workers": workers, "reports": reports, "records": records}, indent=2))
    print(f"\n(JSON: {RESULTS.relative_to(HERE.parent)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
