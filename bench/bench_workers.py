#!/usr/bin/env python3
"""Benchmark: ``serve --workers 2`` against one worker, in one run.

    python bench/bench_workers.py            # 8 rounds of 4 s per target (about 1.5 minutes)
    python bench/bench_workers.py --quick    # 4 rounds of 2 s

Starts the mock upstream (``baseline_servers.py``), the proxy with one worker and the
proxy with two, all on 127.0.0.1, and measures JSON calls per second at 32 concurrent
callers, the two proxies taking turns round by round (so both see much the same
background load); the figure is the median of the rounds' paired ratios. Each proxy's
CPU counts its whole process tree (supervisor and workers). Every call must be in the
proxy's log exactly once.

With at least four CPUs the mock and this load generator are pinned to CPUs of their
own and the proxies to the others; with fewer, all share the CPUs and the run says so
(the goal is then only that a second worker does not cost throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from proxy_harness import (
    HOST,
    Server,
    Target,
    check_log,
    concurrent,
    free_port,
    git_head,
    proc_cpu,
    proxy_command,
    start_mock,
    write_config,
)


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += _tree(int(k))
    return out


def tree_cpu(pid: int) -> float:
    return sum(proc_cpu(p) for p in _tree(pid))


def pin(pid: int, cpus: set[int]) -> None:
    for p in _tree(pid):
        try:
            os.sched_setaffinity(p, cpus)
        except OSError:
            pass


def plan_cpus() -> tuple[set[int] | None, set[int] | None, str]:
    """(CPUs for the mock and the load generator, CPUs for the proxies, what was done)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 4:
        side = set(cpus[: max(1, len(cpus) // 2 - 1)])
        return side, set(cpus) - side, f"mock and load generator pinned to CPUs {sorted(side)}, proxies to {sorted(set(cpus) - side)}"
    return None, None, f"only {len(cpus)} CPUs: mock, load generator and proxies share them (not pinned)"


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    side, proxy_cpus, pinning = plan_cpus()
    if side is not None:
        os.sched_setaffinity(0, side)
    mock_port = free_port()
    mock = start_mock(mock_port, tmp)
    config = tmp / "config.yml"
    write_config(config, mock_port)
    servers: dict[str, Server] = {}
    logs: dict[str, Path] = {}
    for name, workers in (("1 worker", 1), ("2 workers", 2)):
        port = free_port()
        logs[name] = tmp / f"cost-{workers}.jsonl"
        argv = [*proxy_command(config, port, host=HOST, log_file=logs[name]), "--workers", str(workers)]
        servers[name] = Server(name.replace(" ", "-"), argv, port, "/health", tmp)
    targets = {name: Target(name, f"http://{HOST}:{s.port}/openai") for name, s in servers.items()}
    rounds: list[dict[str, float]] = []
    cpu: dict[str, float] = {n: 0.0 for n in servers}
    calls: dict[str, int] = {n: 0 for n in servers}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await mock.wait_ready(session)
        for s in servers.values():
            await s.wait_ready(session, timeout=90)
        await asyncio.sleep(3)  # the second worker's start-up done (the banner comes after both)
        if side is not None:
            pin(mock.pid, side)
            for s in servers.values():
                pin(s.pid, proxy_cpus or set())
        for name, t in targets.items():  # warm-up, untimed
            await concurrent(session, t, 10**9, 32, 1.0, False, {})
        for i in range(args.rounds):
            order = list(targets) if i % 2 == 0 else list(reversed(list(targets)))
            row: dict[str, float] = {}
            for name in order:
                c0 = tree_cpu(servers[name].pid)
                r = await concurrent(session, targets[name], 10**9, 32, args.seconds, False, {})
                cpu[name] += tree_cpu(servers[name].pid) - c0
                calls[name] += r["calls"]
                row[name] = r["rps"]
            rounds.append(row)
            print(f"  round {i + 1}: " + "  ".join(f"{n} {row[n]:7.0f}/s" for n in targets), flush=True)
    made = {n: targets[n].calls for n in targets}
    for s in servers.values():
        s.stop()
    mock.stop()
    logs_ok = {n: check_log(logs[n], made[n]) for n in servers}
    ratios = [r["2 workers"] / r["1 worker"] for r in rounds if r["1 worker"]]
    return {
        "pinning": pinning,
        "cpus": len(os.sched_getaffinity(0)) if side is None else os.cpu_count(),
        "rounds": rounds,
        "rps_median": {n: statistics.median(r[n] for r in rounds) for n in targets},
        "cpu_us_per_call": {n: 1e6 * cpu[n] / calls[n] if calls[n] else None for n in targets},
        "logs": logs_ok,
        "errors": {n: targets[n].errors[:5] for n in targets},
        "goals": {
            "two_workers_throughput_ratio": statistics.median(ratios) if ratios else None,
            "goal": 1.4 if side is not None else 1.0,
            "pinned": side is not None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 rounds of 2 s")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--json-out", help="write the result JSON here")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 8)
    args.seconds = args.seconds or (2.0 if args.quick else 4.0)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as d:
        res = asyncio.run(run(args, Path(d)))
    res["commit"], res["python"] = git_head(), platform.python_version()
    g = res["goals"]
    print(f"\nllm-cost-proxy --workers 2 vs 1 ({res['pinning']})")
    print("  JSON calls/s at 32 callers, median round: " + ", ".join(f"{n} {v:.0f}" for n, v in res["rps_median"].items()))
    print("  proxy CPU per call (all processes): " + ", ".join(f"{n} {v:.0f} us" for n, v in res["cpu_us_per_call"].items() if v))
    print(f"  2 workers / 1 worker, median of paired rounds: {g['two_workers_throughput_ratio']:.2f}x (goal >= {g['goal']}x)")
    bad = {n: v for n, v in res["logs"].items() if not v.get("ok", True)}
    print("  log: one line per call for both" if not bad else f"  LOG MISMATCH: {bad}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
