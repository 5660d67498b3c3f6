#!/usr/bin/env python3
"""Benchmark: the analytics API on a large log, and proxied latency with a dashboard open.

One run, everything on 127.0.0.1: the baseline mock upstream (``baseline_servers.py``)
and the real proxy (``python -m proxy serve --config <tmp> --port P --log-file LOG``,
every provider of the log pointed at the mock), over a copy of a realistic log
(tests/support/synthlog.py, ``REALISTIC`` mix, spread over the 60 days before it was
generated; cached under ``--cache-dir`` and regenerated when older than 12 hours, so
"the last 7 days" always holds a week of records).

1. **Endpoint times.** For each endpoint, a proxy just started (its API worker up,
   nothing asked yet) and no roll-up index beside the log: the first request (*cold*:
   the index is built where the endpoint uses it); then, in the same process, a request
   after one more call through the proxy (*new record*: the index exists but the log
   changed, so the answer cache cannot serve it) and its repeat at once (*cached*),
   ``--runs`` times. Each as a ratio to the baseline measured in the same run:
   ``python -m proxy report --format json --since 7d --log-file LOG --config CFG`` with
   the index up to date (the CLI path of the same engine). p50 of the runs (cold: of
   ``--cold-runs``, default 1: on a million records a cold request takes seconds).
2. **Proxied latency beside a dashboard.** Sequential chat completions through the
   proxy in alternating segments: A, nothing else; B, a second client polls the
   dashboard's set of API calls (as proxy/web/static/dashboard.js loads them: usage,
   costs, latency, expensive-requests, sessions, users, budgets; days=7) every 2 s,
   never overlapping, and holds /api/events open (after one untimed poll set: the page
   was already open). The proxied calls keep writing records, so every poll misses the
   answer cache. p50 and p95 of B as ratios to A.

    python bench/bench_dashboard.py            # 1,000,000 records (about 7 minutes; +1 to generate the log once)
    python bench/bench_dashboard.py --quick    # 100,000 records, shorter segments (about 1.5 minutes)

Only stdlib + aiohttp + orjson. Table on stdout, JSON in bench/results/dashboard-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as ``python bench/bench_dashboard.py``: tests.support from the repository
    sys.path.insert(0, str(ROOT))

from proxy_harness import (  # noqa: E402
    HOST,
    MODEL,
    LoadMeter,
    Server,
    Target,
    call_json,
    free_port,
    git_head,
    pct,
    proc_status,
    proxy_dirty,
    start_mock,
    wait_serving,
    write_results,
)

from tests.support import synthlog  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dashboard-latest.json"
CACHE_DIR = Path(tempfile.gettempdir()) / "llm-cost-proxy-bench"
CACHE_MAX_AGE_H = 12.0  # an older log's "last 7 days" would be short of records
LOG_DAYS = 60.0
SEED = 7

# cold_runs: a cold request on a million records builds the roll-up index and the API
# worker's memory of the query (10-25 s each here), so the full run takes it once.
FULL = dict(records=1_000_000, cold_runs=1, runs=3, warmup_calls=300, segments=4, segment_s=20.0, poll_s=2.0)
QUICK = dict(records=100_000, cold_runs=1, runs=3, warmup_calls=100, segments=4, segment_s=6.0, poll_s=2.0)

# Part 1: (label, path and query). "{user}" is the most expensive user of the users answer.
ENDPOINTS = [
    ("usage?days=7", "/api/analytics/usage?days=7"),
    ("usage?days=30", "/api/analytics/usage?days=30"),
    ("costs?days=30", "/api/analytics/costs?days=30"),
    ("provider/openai?days=7", "/api/analytics/provider/openai?days=7"),
    ("latency", "/api/analytics/latency"),
    ("expensive-requests?limit=10", "/api/analytics/expensive-requests?limit=10"),
    ("users", "/api/analytics/users"),
    ("users/{user}", "/api/analytics/users/{user}"),
    ("sessions?sort=cost", "/api/analytics/sessions?sort=cost"),
    ("budgets", "/api/budgets"),
    ("export?format=csv&days=1", "/api/analytics/export?format=csv&days=1"),
]
# Not served through the answer cache: every request is computed afresh.
UNCACHED = {"budgets", "export?format=csv&days=1"}
# Part 2: what dashboard.js loadAll() asks for with its default range (7 days).
DASHBOARD_POLL = [
    ("usage", "/api/analytics/usage?days=7"),
    ("costs", "/api/analytics/costs?days=7"),
    ("latency", "/api/analytics/latency?days=7"),
    ("expensive", "/api/analytics/expensive-requests?days=7&limit=10"),
    ("sessions", "/api/analytics/sessions?days=7&sort=recent&limit=15"),
    ("budgets", "/api/budgets"),
    ("users", "/api/analytics/users?days=7&limit=20"),
]
QUIET_CORES = 0.25  # as bench_proxy.py: above this, other processes make the ratios noisy
CACHE_SECONDS = 30  # proxy/web/api.py _CACHE_SECONDS: answers are keyed by this time bucket too


# --------------------------------------------------------------------------- the log and the config


def cached_log(n: int, cache_dir: Path, regenerate: bool) -> Path:
    """The generated log for ``n`` records, made again when missing, asked for, or older
    than CACHE_MAX_AGE_H (its records end when it was generated)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"realistic-{n}-seed{SEED}-{LOG_DAYS:g}d.jsonl"
    age_h = (time.time() - path.stat().st_mtime) / 3600 if path.exists() else None
    if not regenerate and age_h is not None and age_h < CACHE_MAX_AGE_H:
        print(f"log: {path} ({n:,} records, generated {age_h:.1f} h ago)", flush=True)
        return path
    t0 = time.perf_counter()
    part = path.with_suffix(".part")
    synthlog.write_log(part, synthlog.records(n, mix=synthlog.REALISTIC, seed=SEED, days=LOG_DAYS))
    os.replace(part, path)
    print(f"log: generated {n:,} records, {path.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    return path


def _rate(x: str | None) -> float | None:
    return None if x is None else float(x)


def write_config(path: Path, mock_port: int) -> None:
    """Every provider of the log pointed at the mock, with the log's prices; a global and
    a per-user budget so the budgets panel has rows. JSON is YAML."""
    providers: dict[str, Any] = {}
    for m in synthlog.REALISTIC.models:
        p = providers.setdefault(m.provider, {"base_url": f"http://{HOST}:{mock_port}", "models": {}})
        if m.provider != m.family:
            p["type"] = m.family
        if m.priced:
            p["models"][m.name] = {"pricing": {"input": _rate(m.input), "output": _rate(m.output), "cached_input": _rate(m.cached)}}
    providers["openai"]["models"].setdefault(MODEL, {"pricing": {"input": 0.15, "output": 0.60, "cached_input": 0.075}})
    cfg = {
        "features": {"cost_tracking": {"enabled": True}},
        "catalog": {"enabled": False},
        "server": {"shutdown_timeout": 5},
        "dashboard": {"enabled": True},
        "budgets": {
            "limits": [
                {"scope": "global", "period": "monthly", "usd": 1_000_000},
                {"scope": "user", "period": "daily", "usd": 10_000},
            ]
        },
        "providers": providers,
    }
    path.write_bytes(orjson.dumps(cfg, option=orjson.OPT_INDENT_2))


def index_file(log: Path) -> Path:
    return log.with_name(f".{log.name}.rollup")  # proxy/storage/index.py index_path


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            n += block.count(b"\n")
    return n


def tree_digest() -> str:
    """A short digest of proxy/'s sources: which code a result file describes (the tree may be dirty)."""
    h = hashlib.sha1(usedforsecurity=False)
    for f in sorted((ROOT / "proxy").rglob("*")):
        if f.is_file() and f.suffix in (".py", ".js", ".html", ".css"):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def children(pid: int) -> list[int]:
    """The processes a process started, and theirs (the API's engine worker)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


# --------------------------------------------------------------------------- HTTP helpers


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    async with session.get(url) as r:
        body = await r.read()
        status = r.status
    return time.perf_counter() - t0, status, body


async def one_call(session: aiohttp.ClientSession, t: Target) -> None:
    """One call through the proxy: a new record (the answer cache's key changes)."""
    if await call_json(session, t) is None:
        raise RuntimeError(f"proxied call failed: {t.errors[-1:]}")


def cli_report(cfg: Path, log: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "report", "--format", "json", "--log-file", str(log), "--config", str(cfg), *extra]


def time_cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def times(r: float) -> str:
    """A ratio, with the digits a small one needs."""
    return f"{r:6.4f}x" if r < 0.1 else f"{r:6.2f}x"


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- the proxy, restartable


class ProxyProcess:
    """``python -m proxy serve`` on a fixed port, started again for each cold request: a
    new process has a new API worker, which remembers nothing of earlier answers."""

    def __init__(self, cfg: Path, log: Path, port: int, logdir: Path) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(cfg),
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-file",
            str(log),
        ]
        self.port, self.logdir = port, logdir
        self.url = f"http://{HOST}:{port}"
        self.server: Server | None = None
        self.start_s: list[float] = []
        self.worker_start_s: list[float] = []

    async def start(self) -> None:
        t0 = time.perf_counter()
        server = self.server = Server(
            f"proxy-{len(self.start_s) + 1}", self.argv, self.port, "/health", self.logdir, env={"PYTHONUNBUFFERED": "1"}
        )
        async with aiohttp.ClientSession() as s:
            if not await wait_serving(s, self.url + "/health", exited=lambda: server.proc.poll() is not None, timeout=120):
                raise RuntimeError(f"proxy did not start; log:\n{server.tail()}")
            self.start_s.append(time.perf_counter() - t0)
            # The API's worker process starts on the first API call; a bad parameter is answered there too.
            dt, status, _ = await timed_get(s, self.url + "/api/analytics/usage?days=0")
        if status != 400:
            raise RuntimeError(f"the API worker's first answer: HTTP {status}, expected 400")
        self.worker_start_s.append(dt)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    async def restart(self) -> None:
        self.stop()
        await self.start()

    def rss_mb(self) -> dict[str, float]:
        """VmRSS of the proxy and of its API worker (the largest child), MB."""
        assert self.server is not None
        pid = self.server.pid
        kids = [proc_status(k).get("VmRSS", 0) for k in children(pid)]
        return {"proxy": proc_status(pid).get("VmRSS", 0) / 1024, "worker": max(kids, default=0) / 1024}

    def pids(self, mock: Server) -> dict[str, int]:
        """For LoadMeter: the mock, the proxy and its children (the API worker)."""
        assert self.server is not None
        pid = self.server.pid
        return {"mock": mock.pid, "proxy": pid, **{f"proxy-child-{k}": k for k in children(pid)}}


# --------------------------------------------------------------------------- part 1: endpoint times


async def endpoint_times(
    session: aiohttp.ClientSession, proxy: ProxyProcess, mock: Server, calls: Target, log: Path, cfg: Path, P: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs, cold_runs = P["runs"], P["cold_runs"]
    base = proxy.url
    cli7 = cli_report(cfg, log, "--since", "7d")

    def baseline(tag: str) -> list[float]:
        time_cli(cli7)  # untimed: brings the index up to date with the log as it is now
        xs = [time_cli(cli7) for _ in range(runs)]
        print(f"  baseline ({tag}): CLI report --since 7d, index up to date: " + ", ".join(f"{x:.2f}" for x in xs) + " s", flush=True)
        return xs

    index_file(log).unlink(missing_ok=True)
    out["cli_first_run_s"] = time_cli(cli7)
    print(f"  CLI report --since 7d, first run (writes the index): {out['cli_first_run_s']:.2f} s", flush=True)
    base_before = baseline("before")

    user = "user-001"
    rows: dict[str, dict[str, list[float]]] = {name: {"cold": [], "new_record": [], "cached": []} for name, _ in ENDPOINTS}
    sizes: dict[str, int] = {}

    def url_of(name: str, path: str) -> str:
        return base + path.replace("{user}", user)

    def check(name: str, status: int, body: bytes) -> None:
        nonlocal user
        if status != 200:
            raise RuntimeError(f"{name}: HTTP {status}: {body[:300]!r}")
        sizes[name] = len(body)
        if name == "users":
            top = orjson.loads(body)["users"]
            user = top[0]["user"] if top else user

    # Per endpoint, a proxy just started (its API worker up, nothing asked yet) and no
    # roll-up index beside the log: the first request (cold), then in the same process
    # ``runs`` times a request after one more proxied call (the answer cache cannot serve
    # it) and its repeat at once (cached).
    other: list[float] = []
    index_used: dict[str, bool] = {}
    worker_rss: dict[str, float] = {}  # the API worker's VmRSS after an endpoint's runs, MB
    for run in range(cold_runs):
        print(f"  run {run + 1}/{cold_runs}: per endpoint, a new proxy and no index", flush=True)
        for name, path in ENDPOINTS:
            await proxy.restart()
            index_file(log).unlink(missing_ok=True)
            async with aiohttp.ClientSession(timeout=session.timeout) as fresh:  # no connection to the last proxy
                await one_call(fresh, calls)
                with LoadMeter(proxy.pids(mock)) as m:
                    cold, status, body = await timed_get(fresh, url_of(name, path))
                check(name, status, body)
                rows[name]["cold"].append(cold)
                if m.wall >= 0.5:  # /proc/stat counts in 10 ms ticks: a shorter window says nothing
                    other.append(m.other_cores)
                index_used[name] = index_file(log).exists()
                for _ in range(runs):
                    for attempt in range(3):  # the repeat in the same answer-cache time bucket
                        if name not in UNCACHED:
                            # Start where the pair fits in what is left of the bucket (by the last time taken).
                            guess = (rows[name]["new_record"] or rows[name]["cold"])[-1] * 1.2 + 0.5
                            left = CACHE_SECONDS - time.time() % CACHE_SECONDS
                            if guess < CACHE_SECONDS and left < guess:
                                await asyncio.sleep(left + 0.05)
                        bucket = int(time.time() // CACHE_SECONDS)
                        await one_call(fresh, calls)
                        with LoadMeter(proxy.pids(mock)) as m:
                            warm, status, body = await timed_get(fresh, url_of(name, path))
                            check(name, status, body)
                            cached, status, body = await timed_get(fresh, url_of(name, path))
                            check(name, status, body)
                        if name in UNCACHED or int(time.time() // CACHE_SECONDS) == bucket:
                            break
                        print(
                            f"    {name}: crossed a {CACHE_SECONDS} s cache bucket" + (", measuring again" if attempt < 2 else ""),
                            flush=True,
                        )
                    rows[name]["new_record"].append(warm)
                    rows[name]["cached"].append(cached)
                    if m.wall >= 0.5:
                        other.append(m.other_cores)
                worker_rss[name] = proxy.rss_mb()["worker"]
            r = rows[name]
            print(
                f"    {name:<28} cold {cold:7.3f}  new record {' '.join(f'{x:.3f}' for x in r['new_record'][-runs:])}  "
                f"cached {' '.join(f'{x:.4f}' for x in r['cached'][-runs:])} s  (index {'built' if index_used[name] else 'not used'})",
                flush=True,
            )
    out["proxy_start_s"] = p50(proxy.start_s)
    out["worker_start_s"] = p50(proxy.worker_start_s)
    out["index_used"] = index_used
    out["worker_rss_mb"] = worker_rss
    base_after = baseline("after")
    out["baseline_runs_s"] = base_before + base_after
    out["baseline_s"] = p50(base_before + base_after)
    out["other_cores"] = {"max": max(other, default=0.0), "median": p50(other) if other else 0.0}
    out["user"] = user
    out["endpoints"] = {name: {**{k: p50(v) for k, v in r.items()}, "runs": r, "bytes": sizes.get(name)} for name, r in rows.items()}

    # The API and the CLI are one engine: the same fixed window gives the same numbers.
    end = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=1)
    start = end - timedelta(days=7)
    s_iso, e_iso = start.isoformat(), end.isoformat()
    cli = orjson.loads(
        subprocess.run(cli_report(cfg, log, "--start-date", s_iso, "--end-date", e_iso), cwd=ROOT, check=True, capture_output=True).stdout
    )
    q = f"start={s_iso.replace('+', '%2B')}&end={e_iso.replace('+', '%2B')}"
    _, status, body = await timed_get(session, f"{base}/api/analytics/usage?{q}")
    api = orjson.loads(body)
    pair = [(cli["totals"]["requests"], api.get("requests")), (cli["totals"]["total_cost"], api.get("total_cost"))]
    out["cli_api_agree"] = status == 200 and all(a == b for a, b in pair)
    out["cli_api_compared"] = {"window": [s_iso, e_iso], "cli": [a for a, _ in pair], "api": [b for _, b in pair]}
    return out


# --------------------------------------------------------------------------- part 2: latency beside a dashboard


class Dashboard:
    """A second client: the dashboard's poll set every ``every`` seconds, never two at
    once (as dashboard.js runLoad: a set slower than that is followed by the next at
    once), and /api/events held open."""

    def __init__(self, session: aiohttp.ClientSession, base: str, every: float, proxy: Target) -> None:
        self.session, self.base, self.every, self.proxy = session, base, every, proxy
        self.stop = asyncio.Event()
        self.polls: list[float] = []  # seconds per poll set
        self.after_new_record = 0  # poll sets begun after a proxied call since the last one began
        self.per_call: dict[str, list[float]] = {name: [] for name, _ in DASHBOARD_POLL}
        self.errors: list[str] = []
        self.events = 0
        self.started = asyncio.Event()

    async def poll_once(self) -> float:
        """One poll set, as dashboard.js loadAll: every call at once, until all have answered."""
        t0 = time.perf_counter()

        async def one(name: str, path: str) -> None:
            dt, status, body = await timed_get(self.session, self.base + path)
            self.per_call[name].append(dt)
            if status != 200:
                self.errors.append(f"{name}: HTTP {status} {body[:120]!r}")

        await asyncio.gather(*(one(n, p) for n, p in DASHBOARD_POLL))
        return time.perf_counter() - t0

    async def poll_loop(self) -> None:
        seen = -1
        while not self.stop.is_set():
            self.after_new_record += self.proxy.calls > seen
            seen = self.proxy.calls
            self.started.set()
            took = await self.poll_once()
            self.polls.append(took)
            try:
                await asyncio.wait_for(self.stop.wait(), max(0.0, self.every - took))
            except asyncio.TimeoutError:
                pass

    async def events_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self.session.get(self.base + "/api/events", timeout=timeout, headers={"Accept": "text/event-stream"}) as r:
                if r.status != 200:
                    self.errors.append(f"events: HTTP {r.status}")
                    return
                async for line in r.content:
                    if line.startswith(b"event: record"):
                        self.events += 1
        except asyncio.CancelledError:
            pass


async def latency_ab(
    session: aiohttp.ClientSession, api_session: aiohttp.ClientSession, base: str, proxy: Target, pids: dict[str, int], P: dict[str, Any]
) -> dict[str, Any]:
    for _ in range(P["warmup_calls"]):
        await one_call(session, proxy)
    # The dashboard was open before: one poll set (untimed) fills the worker's memory of
    # these queries, as the page's first load does.
    first = Dashboard(api_session, base, P["poll_s"], proxy)
    first_poll_s = await first.poll_once()
    if first.errors:
        raise RuntimeError(f"the dashboard's first poll set: {first.errors}")
    print(f"  the dashboard's first poll set (untimed warm-up): {first_poll_s:.2f} s", flush=True)
    segments: list[dict[str, Any]] = []
    for i in range(P["segments"]):
        mode = "AB"[i % 2]
        dash: Dashboard | None = None
        events: asyncio.Task[None] | None = None
        polls: asyncio.Task[None] | None = None
        if mode == "B":
            dash = Dashboard(api_session, base, P["poll_s"], proxy)
            events = asyncio.create_task(dash.events_loop())
            await asyncio.sleep(0.2)  # the stream is open before the first poll
            polls = asyncio.create_task(dash.poll_loop())
            await dash.started.wait()
        lat: list[float] = []
        with LoadMeter(pids) as m:
            # A: segment_s seconds. B: at least that, and on until the poll set in flight
            # ends, so every call of B has the dashboard's load beside it.
            deadline = time.monotonic() + P["segment_s"]

            def more() -> bool:
                if polls is None or dash is None:
                    return time.monotonic() < deadline
                if time.monotonic() >= deadline:
                    dash.stop.set()  # the poll loop ends after the set in flight
                return not polls.done()

            while more():
                dt = await call_json(session, proxy)
                if dt is not None:
                    lat.append(dt)
        seg: dict[str, Any] = {
            "mode": mode,
            "seconds": m.wall,
            "calls": len(lat),
            "p50_ms": pct(lat, 50) * 1000,
            "p95_ms": pct(lat, 95) * 1000,
            "p99_ms": pct(lat, 99) * 1000,
            "other_cores": m.other_cores,
            "proxy_cpu_cores": m.cpu.get("proxy", 0.0) / m.wall,
            "api_worker_cores": sum(v for k, v in m.cpu.items() if k.startswith("proxy-child")) / m.wall,
            "latencies": lat,
        }
        if dash is not None and events is not None:
            events.cancel()
            await asyncio.gather(events, return_exceptions=True)
            seg.update(
                polls=len(dash.polls),
                polls_after_new_record=dash.after_new_record,
                poll_s=dash.polls,
                per_call=dash.per_call,
                events=dash.events,
                errors=dash.errors,
            )
        segments.append(seg)
        extra = f", {seg['polls']} poll set(s) (p50 {p50(seg['poll_s']):.2f} s), {seg['events']} events" if dash else ""
        print(
            f"  segment {i + 1} {mode}: {seg['calls']} calls in {m.wall:.1f} s, p50 {seg['p50_ms']:.3f} ms, p95 {seg['p95_ms']:.3f} ms, "
            f"API worker {seg['api_worker_cores']:.2f} cores, other processes {seg['other_cores']:.2f} cores{extra}",
            flush=True,
        )
    pooled = {mode: [x for s in segments if s["mode"] == mode for x in s["latencies"]] for mode in "AB"}
    pairs = [(segments[i], segments[i + 1]) for i in range(0, len(segments) - 1, 2)]
    out: dict[str, Any] = {
        "segments": [{k: v for k, v in s.items() if k != "latencies"} for s in segments],
        "A": {"calls": len(pooled["A"]), "p50_ms": pct(pooled["A"], 50) * 1000, "p95_ms": pct(pooled["A"], 95) * 1000},
        "B": {"calls": len(pooled["B"]), "p50_ms": pct(pooled["B"], 50) * 1000, "p95_ms": pct(pooled["B"], 95) * 1000},
        "paired_p50_ratio": p50([b["p50_ms"] / a["p50_ms"] for a, b in pairs]),
        "paired_p95_ratio": p50([b["p95_ms"] / a["p95_ms"] for a, b in pairs]),
    }
    out["p50_ratio"] = out["B"]["p50_ms"] / out["A"]["p50_ms"]
    out["p95_ratio"] = out["B"]["p95_ms"] / out["A"]["p95_ms"]
    polls_s = [x for s in segments if s["mode"] == "B" for x in s["poll_s"]]
    per_call: dict[str, list[float]] = {}
    for s in segments:
        for name, xs in s.get("per_call", {}).items():
            per_call.setdefault(name, []).extend(xs)
    out["first_poll_set_s"] = first_poll_s
    out["poll_sets"] = len(polls_s)
    out["poll_sets_after_new_record"] = sum(s.get("polls_after_new_record", 0) for s in segments)
    out["poll_set_p50_s"] = p50(polls_s)
    out["poll_set_max_s"] = max(polls_s) if polls_s else float("nan")
    out["poll_call_p50_s"] = {k: p50(v) for k, v in per_call.items()}
    out["events"] = sum(s.get("events", 0) for s in segments)
    out["errors"] = [e for s in segments for e in s.get("errors", [])]
    out["other_cores_max"] = max(s["other_cores"] for s in segments)
    return out


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace, P: dict[str, Any], tmp: Path) -> dict[str, Any]:
    src = cached_log(P["records"], Path(args.cache_dir), args.regenerate)
    log, cfg = tmp / "cost-tracking.jsonl", tmp / "config.yml"
    shutil.copyfile(src, log)
    base_lines = count_lines(log)  # also reads it into the page cache, for every contender
    mock_port = free_port()
    write_config(cfg, mock_port)
    R: dict[str, Any] = {"params": P, "records": base_lines, "log_mb": log.stat().st_size / 1e6, "proxy_tree": tree_digest()}
    proxy = ProxyProcess(cfg, log, free_port(), tmp)
    calls = Target("proxy", proxy.url + "/openai")
    mock: Server | None = None
    t_start = time.perf_counter()
    try:
        mock = start_mock(mock_port, tmp)
        # Cold scans of a million records take seconds; a poll set queued behind a busy worker longer.
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as api_session,
        ):
            await mock.wait_ready(session)
            await proxy.start()
            print(f"proxy serving in {proxy.start_s[0]:.1f} s over {base_lines:,} records", flush=True)

            print(f"part 1: endpoint times, {P['cold_runs']} cold run(s), each followed by {P['runs']} with the index present", flush=True)
            R["endpoints"] = await endpoint_times(session, proxy, mock, calls, log, cfg, P)

            print(
                f"part 2: proxied latency, {P['segments']} alternating segments of {P['segment_s']:g} s "
                f"(B: dashboard poll set every {P['poll_s']:g} s + /api/events)",
                flush=True,
            )
            R["latency"] = await latency_ab(session, api_session, proxy.url, calls, proxy.pids(mock), P)
            R["latency"]["rss_mb"] = proxy.rss_mb()
    finally:
        proxy.stop()
        if mock is not None:
            mock.stop()
    R["elapsed_s"] = time.perf_counter() - t_start
    R["proxy_tree_changed"] = tree_digest() != R["proxy_tree"]
    lines = count_lines(log)
    R["log_check"] = {"lines": lines, "expected": base_lines + calls.calls, "ok": lines == base_lines + calls.calls, "calls": calls.calls}
    return R


def report(R: dict[str, Any], quick: bool) -> None:
    w = print
    E, L, P = R["endpoints"], R["latency"], R["params"]
    base = E["baseline_s"]
    w("")
    w(
        f"llm-cost-proxy analytics API benchmark ({'quick' if quick else 'full'} run, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {R['records']:,} records, {R['log_mb']:,.0f} MB)"
    )
    w(f"proxy tree {R['proxy_tree']}{' (CHANGED during the run: the figures mix two trees)' if R['proxy_tree_changed'] else ''}")
    w(f"proxy start-up over the log: {E['proxy_start_s']:.2f} s; API worker start: {E['worker_start_s']:.2f} s (p50 of the cold runs)")
    w(
        f"baseline: `python -m proxy report --format json --since 7d` with the index up to date, p50 of "
        f"{len(E['baseline_runs_s'])} runs: {base:.3f} s (first run, writing the index: {E['cli_first_run_s']:.2f} s)"
    )
    w(f"\np50 of {P['cold_runs']} cold run(s) and {P['cold_runs'] * P['runs']} of the others")
    w(f"{'endpoint':<48}  cold s    ÷base  new record s    ÷base   cached s    ÷base  index")
    for name, e in E["endpoints"].items():
        label = name.replace("{user}", E["user"])
        c = "(not cached)" if name in UNCACHED else f"{e['cached']:8.4f} {times(e['cached'] / base)}"
        idx = "built" if E["index_used"].get(name) else "-"
        w(f"{label:<48} {e['cold']:7.3f} {times(e['cold'] / base)} {e['new_record']:13.3f} {times(e['new_record'] / base)} {c:>17}  {idx}")
    over = [n for n, e in E["endpoints"].items() if e["new_record"] > 1.0]
    w(f"over 1 s with the index present and a new record: {', '.join(over) if over else 'none'}")
    w(f"API and CLI agree on a fixed 7-day window (requests, total cost): {E['cli_api_agree']} {E['cli_api_compared']}")
    oc = E["other_cores"]
    w(f"other processes during the requests: median {oc['median']:.2f} cores, max {oc['max']:.2f}")
    top = max(E["worker_rss_mb"].items(), key=lambda kv: kv[1])
    w(
        f"API worker RSS after an endpoint's runs: up to {top[1]:.0f} MB ({top[0]}); "
        f"after part 2: proxy {L['rss_mb']['proxy']:.0f} MB, API worker {L['rss_mb']['worker']:.0f} MB"
    )

    w(f"\nproxied chat completions, sequential; B: dashboard poll set every {P['poll_s']:g} s + /api/events open")
    w("segment  mode  seconds   calls   p50 ms   p95 ms   API worker cores   other cores")
    for i, s in enumerate(L["segments"]):
        w(
            f"{i + 1:>7}  {s['mode']:>4} {s['seconds']:8.1f} {s['calls']:7d} {s['p50_ms']:8.3f} {s['p95_ms']:8.3f} "
            f"{s['api_worker_cores']:18.2f} {s['other_cores']:13.2f}"
        )
    A, B = L["A"], L["B"]
    w(f"A pooled: {A['calls']} calls, p50 {A['p50_ms']:.3f} ms, p95 {A['p95_ms']:.3f} ms")
    w(f"B pooled: {B['calls']} calls, p50 {B['p50_ms']:.3f} ms, p95 {B['p95_ms']:.3f} ms")
    w(
        f"B ÷ A: p50 {L['p50_ratio']:.2f}x, p95 {L['p95_ratio']:.2f}x (pooled); "
        f"paired by segment: p50 {L['paired_p50_ratio']:.2f}x, p95 {L['paired_p95_ratio']:.2f}x"
    )
    w(
        f"poll sets: {L['poll_sets']} ({L['poll_sets_after_new_record']} after a new record), each p50 {L['poll_set_p50_s']:.2f} s "
        f"(max {L['poll_set_max_s']:.2f} s); events received: {L['events']}; errors: {len(L['errors'])}"
    )
    w(f"the dashboard's first poll set (before the segments, untimed): {L['first_poll_set_s']:.2f} s")
    w("poll calls, p50 s (7 at once, one engine worker): " + ", ".join(f"{k} {v:.2f}" for k, v in L["poll_call_p50_s"].items()))
    noisy = max(L["other_cores_max"], oc["max"])
    if noisy > QUIET_CORES:
        w(f"WARNING: other processes used up to {noisy:.2f} cores during the run; the ratios are noisier than usual")
    lc = R["log_check"]
    w(f"log check: {lc['lines']:,} lines, expected {lc['expected']:,} ({lc['calls']} proxied calls): {'ok' if lc['ok'] else 'MISMATCH'}")
    w(f"measured in {R['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 records, shorter segments")
    ap.add_argument("--records", type=int, help="records in the log (default 1,000,000; --quick 100,000)")
    ap.add_argument("--runs", type=int, help="runs per endpoint with the index present; the p50 is reported (default 3)")
    ap.add_argument("--cold-runs", type=int, help="cold runs per endpoint, each with a new proxy (default 1)")
    ap.add_argument("--segments", type=int, help="alternating A/B latency segments (default 4)")
    ap.add_argument("--segment-seconds", type=float, help="seconds per A segment, and at least per B (default 20; --quick 6)")
    ap.add_argument("--cache-dir", default=str(CACHE_DIR), help=f"where the generated log is kept (default {CACHE_DIR})")
    ap.add_argument("--regenerate", action="store_true", help="generate the log again even if a recent one is cached")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, log copy, server output)")
    ap.add_argument("--out", default=str(RESULTS), help=f"JSON summary (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    P = dict(QUICK if args.quick else FULL)
    given = (
        ("records", args.records),
        ("runs", args.runs),
        ("cold_runs", args.cold_runs),
        ("segments", args.segments),
        ("segment_s", args.segment_seconds),
    )
    for key, value in given:
        if value is not None:
            P[key] = value
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        R = asyncio.run(run(args, P, tmp))
        report(R, args.quick)
    finally:
        if args.keep:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    R["meta"] = {
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_head(),
        "proxy_tree_dirty": proxy_dirty(),
    }
    out = Path(args.out)
    write_results(out, R)
    print(f"JSON summary: {out}")
    return 0 if R["log_check"]["ok"] and R["endpoints"]["cli_api_agree"] and not R["latency"]["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
