#!/usr/bin/env python3
"""Performance benchmark for llm-cost-proxy.

One run starts three servers as separate processes on 127.0.0.1:

* mock   - an OpenAI-shaped upstream (``/v1/chat/completions``: JSON or SSE, honours
           ``stream_options.include_usage``; header ``x-mock-big-bytes`` asks for a
           large SSE reply sent in many writes, ``x-mock-gap-ms`` for a pause after
           the first SSE event);
* bare   - the minimal aiohttp reverse proxy (read body, forward with one shared
           ClientSession, stream the reply back chunk by chunk; no parsing, no log):
           the baseline for "what does metering cost";
* proxy  - the real thing: ``python -m proxy --config <tmp> --port P``.

and measures, against baselines taken in the same run: added latency per call,
added time to first byte of a stream, requests/second at 32 concurrent callers,
proxy RSS while 10 MB streams pass through, and that the proxy logged exactly
one JSONL line per call made through it.

    python bench/bench_proxy.py            # full run (about 1-2 minutes)
    python bench/bench_proxy.py --quick    # short run (about 20 s)

Only stdlib + aiohttp + orjson. Results: table on stdout, JSON in bench/results/latest.json.
The servers are in ``baseline_servers.py``; starting them and the proxy, the load
generator and the result facts in ``proxy_harness.py``; this file holds the measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import baseline_servers
from proxy_harness import (
    HOST,
    ROOT,
    LoadMeter,
    Server,
    Target,
    call_json,
    call_stream,
    check_log,
    concurrent,
    free_port,
    git_head,
    interleaved,
    proc_status,
    profile_top,
    proxy_dirty,
    rss_sampler,
    start_bare,
    start_mock,
    start_proxy,
    summary_ms,
    write_config,
    write_results,
)

RESULTS = ROOT / "bench" / "results" / "latest.json"


# Goals (see bench/README.md).
GOAL_RPS_RATIO = 0.8  # proxy rps >= 0.8 x bare rps
# Metering that costs (almost) nothing: the proxy process's CPU time per call within 10 %
# of the bare forwarder's (both at 32 concurrent JSON callers, all rounds of one run), and
# a stream's first byte within 0.3 ms of the bare forwarder's (medians, same run).
GOAL_CPU_RATIO = 1.10
GOAL_TTFB_ADDED_MS = 0.3
# Flat memory per stream (the issue: "a 10 MB streamed reply does not grow the process
# by 10 MB"): each stream after the first retains < 20 % of its size, and no stream,
# the first included (buffers and allocator arenas reach their working size), grows
# the process by as much as the reply.
GOAL_RSS_GROWTH_FRACTION = 0.2

FULL = dict(
    warmup=200,
    latency_calls=2000,
    ttfb_calls=400,
    gap_ms=10,
    rps_calls=1500,
    rps_rounds=10,
    rps_warmup=300,
    stream_rps_calls=600,
    stream_rps_rounds=3,
    big_mb=10,
    big_streams=5,
    phase_budget_s=60.0,
)
QUICK = dict(
    warmup=50,
    latency_calls=300,
    ttfb_calls=100,
    gap_ms=10,
    rps_calls=600,
    rps_rounds=3,
    rps_warmup=100,
    stream_rps_calls=300,
    stream_rps_rounds=1,
    big_mb=10,
    big_streams=3,
    phase_budget_s=15.0,
)
CONCURRENCY = 32
QUIET_CORES = 0.25  # a round is "quiet" if other processes used less than this many cores

# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace, P: dict[str, Any], tmp: Path) -> dict[str, Any]:
    mock_port, bare_port, proxy_port = free_port(), free_port(), free_port()
    cfg_path, log_path = tmp / "config.yml", tmp / "cost-tracking.jsonl"
    write_config(cfg_path, mock_port)
    python = [sys.executable]
    prof_path = tmp / "proxy.prof"
    if args.profile:
        python += ["-m", "cProfile", "-o", str(prof_path)]

    servers: dict[str, Server] = {}
    results: dict[str, Any] = {"params": P}
    t_start = time.perf_counter()
    try:
        servers["mock"] = start_mock(mock_port, tmp)
        servers["bare"] = start_bare(bare_port, mock_port, tmp)
        servers["proxy"] = start_proxy(
            "proxy", cfg_path, proxy_port, tmp, env={"COST_TRACKING_FILE": str(log_path), "PYTHONUNBUFFERED": "1"}, python=python
        )
        pids = {k: s.pid for k, s in servers.items()}

        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=60, sock_read=30)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            for s in servers.values():
                await s.wait_ready(session)
            direct = Target("direct", f"http://{HOST}:{mock_port}")
            bare = Target("bare", f"http://{HOST}:{bare_port}/openai")
            proxy = Target("proxy", f"http://{HOST}:{proxy_port}/openai")
            targets = [direct, bare, proxy]
            budget = P["phase_budget_s"]
            background: dict[str, float] = {}
            results["background_cores"] = background

            # Warm-up: connections, code paths, allocator.
            print(f"warm-up: {P['warmup']} JSON + {P['warmup'] // 4} stream calls per target", flush=True)
            await interleaved(session, targets, P["warmup"], budget, call_json)
            await interleaved(session, targets, P["warmup"] // 4, budget, lambda s, t: call_stream(s, t))

            # 1. Sequential latency, non-streaming.
            print(f"latency: {P['latency_calls']} sequential JSON calls per target (interleaved)", flush=True)
            with LoadMeter(pids) as m:
                lat = await interleaved(session, targets, P["latency_calls"], budget, call_json)
            results["latency"] = {k: summary_ms(v) for k, v in lat.items()}
            background["latency"] = m.other_cores

            # 2. Time to first byte of a stream (mock pauses gap_ms after its first event).
            print(f"ttfb: {P['ttfb_calls']} sequential streams per target, {P['gap_ms']} ms gap after first event", flush=True)
            with LoadMeter(pids) as m:
                tt = await interleaved(session, targets, P["ttfb_calls"], budget, lambda s, t: call_stream(s, t, gap_ms=P["gap_ms"]))
            background["ttfb"] = m.other_cores
            results["ttfb"] = {k: summary_ms([x[0] for x in v]) for k, v in tt.items()}
            results["stream_total"] = {k: summary_ms([x[1] for x in v]) for k, v in tt.items()}

            # 3. Throughput at 32 concurrent callers.
            print(
                f"throughput: {P['rps_rounds']} round(s) x {P['rps_calls']} JSON calls per target at {CONCURRENCY} concurrent callers",
                flush=True,
            )
            for t in targets:
                await concurrent(session, t, P["rps_warmup"], CONCURRENCY, budget, False, pids)
            rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
            for r in range(P["rps_rounds"]):
                for t in targets[r % 3 :] + targets[: r % 3]:
                    res = await concurrent(session, t, P["rps_calls"], CONCURRENCY, budget, False, pids)
                    rounds[t.name].append(res)
                    print(
                        f"    round {r + 1} {t.name:6s} {res['rps']:8.0f} req/s  (client CPU {res['client_cpu_pct']:.0f}%, "
                        f"other processes {res['other_cores']:.2f} cores)",
                        flush=True,
                    )
            results["rps"] = _rps_summary(rounds)
            # For the best rounds (the ones the headline uses).
            background["throughput"] = max(max(rs, key=lambda r: r["rps"])["other_cores"] for rs in rounds.values())

            print(
                f"stream throughput: {P['stream_rps_rounds']} round(s) x {P['stream_rps_calls']} streamed calls per target "
                f"at {CONCURRENCY} concurrent callers",
                flush=True,
            )
            srounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
            for r in range(P["stream_rps_rounds"]):
                for t in targets[r % 3 :] + targets[: r % 3]:
                    srounds[t.name].append(await concurrent(session, t, P["stream_rps_calls"], CONCURRENCY, budget, True, pids))
            results["stream_rps"] = _rps_summary(srounds)
            background["stream_throughput"] = max(max(rs, key=lambda r: r["rps"])["other_cores"] for rs in srounds.values())

            # 4. Memory while big streams pass through.
            big = P["big_mb"] * 1024 * 1024
            print(f"memory: {P['big_streams']} x {P['big_mb']} MB SSE streams through the proxy", flush=True)
            big_timing: dict[str, dict[str, float]] = {}
            rss_bare_before = proc_status(pids["bare"]).get("VmRSS", 0)
            for t in (direct, bare):
                got = await call_stream(session, t, big=big)
                if got:
                    big_timing[t.name] = {"seconds": got[1], "bytes": got[2], "MB_per_s": got[2] / got[1] / 1e6}
            for _ in range(P["big_streams"] - 1):
                await call_stream(session, bare, big=big)
            await asyncio.sleep(0.2)
            st0 = proc_status(pids["proxy"])
            before = st0.get("VmRSS", 0)
            peak = [before]
            stop = asyncio.Event()
            sampler = asyncio.create_task(rss_sampler(pids["proxy"], stop, peak))
            after_each: list[int] = []
            proxy_big: list[tuple[float, int]] = []
            for _ in range(P["big_streams"]):
                got = await call_stream(session, proxy, big=big)
                if got:
                    proxy_big.append((got[1], got[2]))
                await asyncio.sleep(0.1)
                after_each.append(proc_status(pids["proxy"]).get("VmRSS", 0))
            stop.set()
            await sampler
            await asyncio.sleep(0.3)
            st1 = proc_status(pids["proxy"])
            if proxy_big:
                secs = statistics.median(x[0] for x in proxy_big)
                nbytes = proxy_big[0][1]
                big_timing["proxy"] = {"seconds": secs, "bytes": nbytes, "MB_per_s": nbytes / secs / 1e6}
            results["memory"] = {
                "stream_mb": P["big_mb"],
                "streams": len(proxy_big),
                "rss_before_mb": before / 1024,
                "rss_after_mb": st1.get("VmRSS", 0) / 1024,
                "rss_after_each_mb": [x / 1024 for x in after_each],
                "peak_during_mb": peak[0] / 1024,
                "growth_mb": (st1.get("VmRSS", 0) - before) / 1024,
                "peak_growth_mb": (peak[0] - before) / 1024,
                "growth_after_first_mb": ((st1.get("VmRSS", 0) - after_each[0]) / 1024) if after_each else None,
                "hwm_before_mb": st0.get("VmHWM", 0) / 1024,
                "hwm_after_mb": st1.get("VmHWM", 0) / 1024,
                "bare_growth_mb": (proc_status(pids["bare"]).get("VmRSS", 0) - rss_bare_before) / 1024,
                "big_stream_timing": big_timing,
            }

        results["errors"] = {t.name: {"count": len(t.errors), "first": t.errors[:5]} for t in targets}
        results["proxy_calls"] = proxy.calls
        results["elapsed_measure_s"] = time.perf_counter() - t_start
    finally:
        codes = {k: s.stop() for k, s in reversed(list(servers.items()))}
        results["exit_codes"] = codes

    results["log_check"] = check_log(log_path, results.get("proxy_calls", -1))
    if args.profile and prof_path.exists():
        results["profile_top"] = profile_top(prof_path)
    results["proxy_stderr_tail"] = servers["proxy"].tail(5) if "proxy" in servers else ""
    return results


def _rps_summary(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Headline: the best round per target. Other load on the machine only ever slows a
    round down, so the best round is the closest to what the code itself can do
    (as timeit takes the minimum); medians and every round are kept too."""
    out: dict[str, Any] = {}
    for name, rs in rounds.items():
        calls = sum(r["calls"] for r in rs)
        best = max(rs, key=lambda r: r["rps"])
        out[name] = {
            "rps_best": best["rps"],
            "rps_median": statistics.median(r["rps"] for r in rs),
            "rps_rounds": [round(r["rps"], 1) for r in rs],
            "other_cores_rounds": [round(r["other_cores"], 2) for r in rs],
            "calls": calls,
            "client_cpu_pct": best["client_cpu_pct"],
            # CPU per call of each server process (user + system, all threads): its CPU time
            # over every round divided by the calls of every round.
            "server_cpu_us_per_call": {
                k: 1e6 * sum(r["server_cpu_s"][k] for r in rs) / calls if calls else 0.0 for k in rs[0]["server_cpu_s"]
            },
            # ... and in the least-contended round alone.
            "server_cpu_us_per_call_best_round": {
                k: min(1e6 * r["server_cpu_s"][k] / r["calls"] for r in rs if r["calls"]) for k in rs[0]["server_cpu_s"]
            },
        }
    for tag, key in (("", "rps_best"), ("_median", "rps_median")):
        d, b, p = (out[k][key] for k in ("direct", "bare", "proxy"))
        out[f"ratio_proxy_bare{tag}"] = p / b if b else None
        out[f"ratio_proxy_direct{tag}"] = p / d if d else None
        out[f"ratio_bare_direct{tag}"] = b / d if d else None
    # Paired: proxy vs bare within the same round (seconds apart, so under much the same
    # background load); median over rounds, quiet rounds only when there are 3 or more.
    pairs = [
        (pr["rps"] / br["rps"], max(pr["other_cores"], br["other_cores"])) for pr, br in zip(rounds["proxy"], rounds["bare"]) if br["rps"]
    ]
    quiet = [x for x, o in pairs if o < QUIET_CORES]
    use = quiet if len(quiet) >= 3 else [x for x, _ in pairs]
    out["paired_ratio_proxy_bare"] = statistics.median(use) if use else None
    out["paired_ratios"] = [round(x, 3) for x, _ in pairs]
    out["paired_quiet_rounds"] = len(quiet)
    out["paired_used"] = "quiet rounds" if len(quiet) >= 3 else "all rounds"
    cb = out["bare"]["server_cpu_us_per_call"]["bare"]
    cp = out["proxy"]["server_cpu_us_per_call"]["proxy"]
    out["cpu_ratio_proxy_bare"] = cp / cb if cb else None
    # Paired as the req/s are: proxy's CPU per call over bare's within each round.
    cpu_pairs = [
        (pr["server_cpu_s"]["proxy"] / pr["calls"]) / (br["server_cpu_s"]["bare"] / br["calls"])
        for pr, br in zip(rounds["proxy"], rounds["bare"])
        if pr["calls"] and br["calls"] and br["server_cpu_s"]["bare"]
    ]
    out["cpu_ratios_by_round"] = [round(x, 3) for x in cpu_pairs]
    return out


# --------------------------------------------------------------------------- report


def report(R: dict[str, Any], quick: bool) -> dict[str, Any]:
    L, T, RPS, SRPS, M = R["latency"], R["ttfb"], R["rps"], R["stream_rps"], R["memory"]
    w = print
    mode = "quick" if quick else "full"
    w("")
    w(
        f"llm-cost-proxy benchmark ({mode} run, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, event loop {baseline_servers.event_loop_name()})"
    )
    w(f"proxy code: commit {git_head()}{' + uncommitted changes under proxy/' if proxy_dirty() else ''}")
    w("=" * 92)
    w(f"{'Latency, non-streaming (sequential)':40s} {'direct':>10s} {'bare':>10s} {'proxy':>10s} {'bare-dir':>9s} {'proxy-dir':>9s}")
    for key, label in (("median_ms", "median ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms")):
        d, b, p = L["direct"][key], L["bare"][key], L["proxy"][key]
        w(f"  {label:38s} {d:10.3f} {b:10.3f} {p:10.3f} {b - d:+9.3f} {p - d:+9.3f}")
    w(f"{'Time to first byte of a stream':40s}")
    for key, label in (("median_ms", "median ms"), ("p95_ms", "p95 ms")):
        d, b, p = T["direct"][key], T["bare"][key], T["proxy"][key]
        w(f"  {label:38s} {d:10.3f} {b:10.3f} {p:10.3f} {b - d:+9.3f} {p - d:+9.3f}")
    w(f"{'Throughput, 32 concurrent callers':40s} {'direct':>10s} {'bare':>10s} {'proxy':>10s} {'p/bare':>9s} {'p/direct':>9s}")
    w(
        f"  {'JSON req/s (best round)':38s} {RPS['direct']['rps_best']:10.0f} {RPS['bare']['rps_best']:10.0f} "
        f"{RPS['proxy']['rps_best']:10.0f} {RPS['ratio_proxy_bare']:9.2f}x {RPS['ratio_proxy_direct']:8.2f}x"
    )
    w(
        f"  {'JSON req/s (median of rounds)':38s} {RPS['direct']['rps_median']:10.0f} {RPS['bare']['rps_median']:10.0f} "
        f"{RPS['proxy']['rps_median']:10.0f} {RPS['ratio_proxy_bare_median']:9.2f}x {RPS['ratio_proxy_direct_median']:8.2f}x"
    )
    w(
        f"  {'proxy/bare paired by round (median)':38s} {'':32s} {RPS['paired_ratio_proxy_bare']:9.2f}x   "
        f"({RPS['paired_used']}, {RPS['paired_quiet_rounds']}/{len(RPS['paired_ratios'])} quiet)"
    )
    w(
        f"  {'  forwarder CPU us/call (all rounds)':38s} {'':10s} {RPS['bare']['server_cpu_us_per_call']['bare']:10.0f} "
        f"{RPS['proxy']['server_cpu_us_per_call']['proxy']:10.0f} {RPS['cpu_ratio_proxy_bare']:9.2f}x"
    )
    w(f"  {'  mock CPU us/call':38s} " + " ".join(f"{RPS[k]['server_cpu_us_per_call']['mock']:10.0f}" for k in ("direct", "bare", "proxy")))
    w(f"  {'  client CPU % of one core':38s} " + " ".join(f"{RPS[k]['client_cpu_pct']:10.0f}" for k in ("direct", "bare", "proxy")))
    w(
        f"  {'SSE stream req/s (info, best round)':38s} {SRPS['direct']['rps_best']:10.0f} {SRPS['bare']['rps_best']:10.0f} "
        f"{SRPS['proxy']['rps_best']:10.0f} {SRPS['ratio_proxy_bare']:9.2f}x {SRPS['ratio_proxy_direct']:8.2f}x"
    )
    w(
        f"  {'  forwarder CPU us/stream':38s} {'':10s} {SRPS['bare']['server_cpu_us_per_call']['bare']:10.0f} "
        f"{SRPS['proxy']['server_cpu_us_per_call']['proxy']:10.0f} {SRPS['cpu_ratio_proxy_bare']:9.2f}x"
    )
    bt = M["big_stream_timing"]
    big_label = f"{M['stream_mb']} MB SSE stream, MB/s (info)"
    w(f"  {big_label:38s} " + " ".join(f"{bt[k]['MB_per_s']:10.0f}" if k in bt else f"{'-':>10s}" for k in ("direct", "bare", "proxy")))
    w(f"{'Proxy memory (VmRSS)':40s}")
    w(
        f"  {'before / after / peak MB':38s} {M['rss_before_mb']:.1f} / {M['rss_after_mb']:.1f} / {M['peak_during_mb']:.1f}"
        f"   ({M['streams']} x {M['stream_mb']} MB streamed)"
    )
    w(
        f"  {'growth: retained / peak / after 1st MB':38s} {M['growth_mb']:+.2f} / {M['peak_growth_mb']:+.2f} / "
        f"{M['growth_after_first_mb']:+.2f}   (bare forwarder: {M['bare_growth_mb']:+.2f})"
    )
    w(f"  {'RSS after each stream MB':38s} " + ", ".join(f"{x:.1f}" for x in M["rss_after_each_mb"]))
    lc = R["log_check"]
    w(f"{'Proxy log sanity':40s}")
    w(
        f"  lines {lc['lines']} / calls {lc['expected']}: {'OK' if lc['ok'] else 'MISMATCH'}; statuses {lc['statuses']}, "
        f"streaming {lc['streaming']}, with usage {lc['with_usage']}, priced {lc['priced']}, with error {lc['with_error']}"
    )
    errs = {k: v["count"] for k, v in R["errors"].items()}
    w(f"  client-side errors: {errs}")

    cpu_bare = RPS["bare"]["server_cpu_us_per_call"]["bare"]
    cpu_proxy = RPS["proxy"]["server_cpu_us_per_call"]["proxy"]
    cpu_ratio = RPS["cpu_ratio_proxy_bare"]
    ttfb_added = T["proxy"]["median_ms"] - T["bare"]["median_ms"]
    goals: dict[str, Any] = {
        # The two figures of issue 13, under stable keys (a combined bench driver reads them).
        "cpu_per_call_ratio": cpu_ratio,
        "stream_ttfb_added_ms": ttfb_added,
        "cpu_us_per_call": {"bare": cpu_bare, "proxy": cpu_proxy},
        "cpu_within_1.1x_bare": {
            "value": cpu_ratio,
            "target": GOAL_CPU_RATIO,
            "met": cpu_ratio is not None and cpu_ratio <= GOAL_CPU_RATIO,
        },
        "stream_ttfb_within_0.3ms": {"value_ms": ttfb_added, "target_ms": GOAL_TTFB_ADDED_MS, "met": ttfb_added <= GOAL_TTFB_ADDED_MS},
        "rps_proxy_ge_0.8x_bare": {
            "value": RPS["paired_ratio_proxy_bare"],
            "target": GOAL_RPS_RATIO,
            "best_rounds": RPS["ratio_proxy_bare"],
            "medians": RPS["ratio_proxy_bare_median"],
            "met": RPS["paired_ratio_proxy_bare"] >= GOAL_RPS_RATIO,
        },
        "rss_flat": {
            "value_mb": M["growth_after_first_mb"],
            "limit_mb": GOAL_RSS_GROWTH_FRACTION * M["stream_mb"],
            "growth_mb": M["growth_mb"],
            "peak_growth_mb": M["peak_growth_mb"],
            "met": M["growth_after_first_mb"] < GOAL_RSS_GROWTH_FRACTION * M["stream_mb"]
            and max(M["growth_mb"], M["peak_growth_mb"]) < M["stream_mb"],
        },
        "log_one_line_per_call": {"met": lc["ok"]},
        "no_client_errors": {"met": not any(errs.values())},
    }
    w("Goals")
    w(
        f"  proxy req/s >= {GOAL_RPS_RATIO}x bare (paired by round): {RPS['paired_ratio_proxy_bare']:.2f}x  -> "
        f"{'MET' if goals['rps_proxy_ge_0.8x_bare']['met'] else 'MISSED'}   "
        f"(best rounds {RPS['ratio_proxy_bare']:.2f}x, medians {RPS['ratio_proxy_bare_median']:.2f}x)"
    )
    w(
        f"  RSS flat per stream (after the 1st < {GOAL_RSS_GROWTH_FRACTION * M['stream_mb']:.0f} MB, any < {M['stream_mb']:.0f} MB): "
        f"{M['growth_after_first_mb']:+.2f} MB after the 1st; {M['growth_mb']:+.2f} retained / {M['peak_growth_mb']:+.2f} peak in all"
        f" -> {'MET' if goals['rss_flat']['met'] else 'MISSED'}"
    )
    w(
        f"  proxy CPU per call ÷ bare CPU per call: {cpu_ratio:.2f}x (bare {cpu_bare:.0f} µs, proxy {cpu_proxy:.0f} µs; "
        f"process user+sys over all JSON throughput rounds) -> {'MET' if goals['cpu_within_1.1x_bare']['met'] else 'MISSED'}"
        f" (<= {GOAL_CPU_RATIO:.2f}x)"
    )
    w(
        f"  stream TTFB proxy − bare (ms, median): {ttfb_added:+.3f} ms (bare {T['bare']['median_ms']:.3f}, proxy "
        f"{T['proxy']['median_ms']:.3f}) -> {'MET' if goals['stream_ttfb_within_0.3ms']['met'] else 'MISSED'} (<= {GOAL_TTFB_ADDED_MS} ms)"
    )
    w(f"  one log line per proxied call: {'MET' if lc['ok'] else 'MISSED'}")
    bg = R.get("background_cores", {})
    w("background load from other processes (cores, max per phase): " + ", ".join(f"{k} {v:.2f}" for k, v in bg.items()))
    if any(v > QUIET_CORES for v in bg.values()):
        w("  WARNING: other processes used the CPUs during the run; ratios are noisier than usual")
    w(f"measured in {R['elapsed_measure_s']:.1f} s")
    if R.get("profile_top"):
        w("\ncProfile of the proxy process (top by tottime; timings above are inflated by profiling):")
        w(R["profile_top"])
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~20 s)")
    ap.add_argument("--profile", action="store_true", help="run the proxy under cProfile and print its hottest functions")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, proxy log, server output)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a goal is missed")
    ap.add_argument("--out", "--json-out", dest="out", default=str(RESULTS), help=f"JSON summary (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--serve", choices=("mock", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return baseline_servers.serve(args.serve, args.port, args.upstream)

    P = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    try:
        R = asyncio.run(run(args, P, tmp))
        goals = report(R, args.quick)
    finally:
        if args.keep:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    R["goals"] = goals
    R["meta"] = {
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_head(),
        "proxy_tree_dirty": proxy_dirty(),
        "profiled": args.profile,
    }
    out = Path(args.out)
    write_results(out, R)
    print(f"JSON summary: {out}")
    if not R["log_check"]["ok"]:
        return 1
    if args.strict and not all(g["met"] for g in goals.values() if isinstance(g, dict) and "met" in g):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
