#!/usr/bin/env python3
"""Benchmark: what the cost on replies and ``/metrics`` cost a proxied call.

One run, everything on 127.0.0.1, each server its own process: the baseline mock upstream
(``baseline_servers.py``) and four proxies in front of it, all with the same providers
and prices:

* **A**, **A2** - ``replies: {cost_headers: false, stream_comment: false}``, ``metrics: {enabled: false}``
                  (A2 is A again: A2/A is how far two identical processes differ in this run);
* **B**         - the defaults: ``x-llm-cost-*`` headers, the ``: llm-cost`` stream comment, the
                  metrics tally fed by every record and ``GET /metrics``;
* **B+scrape**  - B's configuration, scraped by Prometheus every second for the whole run
                  (``prometheus`` when on PATH, else a client sending the same GET).

Measured, every figure against A's in the same run: sequential latency of JSON calls and
of streamed calls (the mock's SSE, the client asking ``include_usage``), targets interleaved
call by call; requests/second at 32 concurrent callers, rounds paired; each proxy's CPU per
call; and, in this process, the time of the work B adds per call. Checked: every log holds
exactly the calls made through its proxy; every reply of B carried the cost headers (JSON)
or the comment (streams), A's none; a sample of B's figures equals its log's records to the
digit; ``/metrics`` counts every call of B and is a 404 on A.

    python bench/bench_outputs.py            # full run (about 2 minutes)
    python bench/bench_outputs.py --quick    # short run (about 30 s)
    python bench/bench_outputs.py --split    # also H (headers and comment only) and M (metrics only)

Table on stdout, JSON in bench/results/outputs-latest.json; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import baseline_servers
import orjson
from proxy_harness import (  # also puts the repository on sys.path: proxy.* below
    CLIENT_KEY,
    HOST,
    MODEL,
    ROOT,
    LoadMeter,
    Server,
    Target,
    check_log,
    free_port,
    git_head,
    proxy_dirty,
    start_mock,
    start_proxy,
    summary_ms,
    write_config,
    write_results,
)

from proxy.core.records import json_default  # noqa: E402  (the added work, timed in-process)
from proxy.core.reply_cost import comment_line, cost_headers  # noqa: E402
from proxy.engine.metrics_tally import MetricsTally  # noqa: E402
from proxy.web.metrics import Snapshot, render  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "outputs-latest.json"
PROMETHEUS = shutil.which("prometheus")

# What a client sees, as docs/replies.md documents it (not imported: the bench checks the promise).
HEADER_PREFIX = "x-llm-cost-"
COST_HEADER = "x-llm-cost-usd"
RECORD_ID_HEADER = "x-llm-cost-record-id"
COMMENT = b": llm-cost "

# Sequential phases stop at their call count or their time budget, whichever comes first;
# throughput rounds last a fixed time (a loaded machine then runs as long as a quiet one).
FULL = dict(
    warmup=200,
    latency_calls=2000,
    latency_budget_s=25.0,
    stream_calls=1000,
    stream_budget_s=15.0,
    rps_rounds=6,
    rps_round_s=1.5,
    stream_rps_rounds=3,
    stream_rps_round_s=1.2,
    blocks=10,
    sample_every=25,
)
QUICK = dict(
    warmup=40,
    latency_calls=300,
    latency_budget_s=5.0,
    stream_calls=150,
    stream_budget_s=3.0,
    rps_rounds=3,
    rps_round_s=0.5,
    stream_rps_rounds=1,
    stream_rps_round_s=0.5,
    blocks=5,
    sample_every=10,
)
CONCURRENCY = 32
SCRAPE_EVERY_S = 1.0
QUIET_CORES = 0.25
# Each target's (replies.cost_headers and replies.stream_comment, metrics.enabled). A2 is A
# again, a second process: how far two identical proxies differ is the run's resolution (on
# 2 busy cores, more than any one figure's own spread shows). H and M (--split): one part each.
SWITCHES = {"A": (False, False), "A2": (False, False), "B": (True, True), "H": (True, False), "M": (False, True), "B+scrape": (True, True)}

HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "Say hello."}]
BODY_JSON = orjson.dumps({"model": MODEL, "messages": MESSAGES, "user": "bench"})
# The client asks for usage itself: the mock's usage chunk passes through, nothing is hidden.
BODY_STREAM = orjson.dumps(
    {"model": MODEL, "messages": MESSAGES, "user": "bench", "stream": True, "stream_options": {"include_usage": True}}
)


# --------------------------------------------------------------------------- the client


class Seen:
    """What one target's replies carried, call by call (counted after each call's clock stopped)."""

    def __init__(self, sample_every: int) -> None:
        self.sample_every = sample_every
        self.json_calls = self.json_with_cost = self.json_with_any = 0
        self.streams = self.streams_with_comment = self.streams_with_any_header = 0
        self.samples: list[dict[str, Any]] = []  # figures from replies, compared with the log afterwards

    def json_reply(self, headers: Any) -> None:
        self.json_calls += 1
        self.json_with_cost += COST_HEADER in headers
        self.json_with_any += any(k.lower().startswith(HEADER_PREFIX) for k in headers)
        if self.json_calls % self.sample_every == 0 and COST_HEADER in headers:
            self.samples.append(
                {
                    "kind": "headers",
                    "record_id": headers.get(RECORD_ID_HEADER),
                    "total_cost": headers[COST_HEADER],
                    "input_tokens": headers.get(HEADER_PREFIX + "input-tokens"),
                    "output_tokens": headers.get(HEADER_PREFIX + "output-tokens"),
                }
            )

    def stream_reply(self, headers: Any, body: bytes) -> None:
        self.streams += 1
        self.streams_with_any_header += any(k.lower().startswith(HEADER_PREFIX) for k in headers)
        at = body.find(b"\n" + COMMENT)
        if at < 0:
            return
        self.streams_with_comment += 1
        if self.streams % self.sample_every == 0:
            start = at + 1 + len(COMMENT)
            facts = json.loads(body[start : body.index(b"\n", start)], parse_float=Decimal)
            self.samples.append({"kind": "comment", "header_record_id": headers.get(RECORD_ID_HEADER), **facts})

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int) and k != "sample_every"}


async def call_json(session: aiohttp.ClientSession, t: Target, seen: Seen) -> float | None:
    t.calls += 1
    t0 = time.perf_counter()
    try:
        async with session.post(t.url, data=BODY_JSON, headers=HEADERS) as r:
            data = await r.read()
            dt = time.perf_counter() - t0
            status, headers = r.status, r.headers
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        t.error(f"json: {type(e).__name__}: {e}")
        return None
    if status != 200 or b'"usage"' not in data:
        t.error(f"json: status {status}")
        return None
    seen.json_reply(headers)
    return dt


async def call_stream(session: aiohttp.ClientSession, t: Target, seen: Seen) -> tuple[float, float] | None:
    """(time to the first body byte, time to the last) of one streamed call."""
    t.calls += 1
    t0 = time.perf_counter()
    try:
        async with session.post(t.url, data=BODY_STREAM, headers=HEADERS) as r:
            parts = [await r.content.readany()]
            t1 = time.perf_counter()
            async for chunk in r.content.iter_any():
                parts.append(chunk)
            t2 = time.perf_counter()
            status, headers = r.status, r.headers
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        t.error(f"stream: {type(e).__name__}: {e}")
        return None
    body = b"".join(parts)
    if status != 200 or not body.endswith(baseline_servers.DONE_EVENT):
        t.error(f"stream: status {status}, ended with {body[-20:]!r}")
        return None
    seen.stream_reply(headers, body)
    return t1 - t0, t2 - t0


Call = Callable[[aiohttp.ClientSession, Target, Seen], Awaitable[Any]]


async def interleaved(
    session: aiohttp.ClientSession, targets: list[Target], seen: dict[str, Seen], n: int, budget: float, fn: Call
) -> list[dict[str, Any]]:
    """``n`` rounds, one sequential call per target in each (order rotating), kept by round
    so that block ratios compare calls made at the same moments."""
    rounds: list[dict[str, Any]] = []
    deadline = time.monotonic() + budget
    for i in range(n):
        if time.monotonic() > deadline:
            print(f"    (time budget hit after {i} rounds)", flush=True)
            break
        k = i % len(targets)
        rounds.append({t.name: await fn(session, t, seen[t.name]) for t in targets[k:] + targets[:k]})
    return rounds


async def concurrent(
    session: aiohttp.ClientSession, t: Target, seen: Seen, seconds: float, fn: Call, pids: dict[str, int]
) -> dict[str, Any]:
    """``CONCURRENCY`` callers, each calling again as soon as its reply is in, for ``seconds``."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            if await fn(session, t, seen) is not None:
                done += 1

    with LoadMeter(pids) as m:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {
        "calls": done,
        "rps": done / m.wall if m.wall else 0.0,
        "proxy_cpu_us_per_call": 1e6 * m.cpu[t.name] / done if done else None,
        "other_cores": m.other_cores,
    }


# --------------------------------------------------------------------------- the scrape load


class Scraper:
    """Prometheus itself scraping B+scrape every second, or (without the binary) a client
    sending the same GET on the same schedule."""

    def __init__(self, kind: str, target_port: int, tmp: Path) -> None:
        self.kind, self.target_port, self.tmp = kind, target_port, tmp
        self.server: Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.client_scrapes: list[float] = []
        self.client_failed = 0
        self.port = free_port()

    async def start(self, session: aiohttp.ClientSession) -> None:
        if self.kind == "prometheus":
            cfg = {
                "global": {"scrape_interval": f"{SCRAPE_EVERY_S:g}s", "scrape_timeout": f"{SCRAPE_EVERY_S:g}s"},
                "scrape_configs": [{"job_name": "llm-cost-proxy", "static_configs": [{"targets": [f"{HOST}:{self.target_port}"]}]}],
            }
            path = self.tmp / "prometheus.yml"
            path.write_bytes(orjson.dumps(cfg))  # JSON is YAML
            argv = [
                str(PROMETHEUS),
                f"--config.file={path}",
                f"--storage.tsdb.path={self.tmp / 'prometheus-data'}",
                f"--web.listen-address={HOST}:{self.port}",
                "--log.level=warn",
            ]
            self.server = Server("prometheus", argv, self.port, "/-/ready", self.tmp)
            await self.server.wait_ready(session)
        elif self.kind == "client":
            self.task = asyncio.create_task(self._loop(session))

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        url = f"http://{HOST}:{self.target_port}/metrics"
        accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
        while True:
            t0 = time.perf_counter()
            async with session.get(url, headers={"Accept": accept}) as r:
                await r.read()
                self.client_failed += r.status != 200
            self.client_scrapes.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, SCRAPE_EVERY_S - (time.perf_counter() - t0)))

    async def query(self, session: aiohttp.ClientSession, q: str) -> float | None:
        async with session.get(f"http://{HOST}:{self.port}/api/v1/query", params={"query": q}) as r:
            result = (await r.json())["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def finish(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """How the scrapes went, and the request count of the last one (taken after every call)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            xs = self.client_scrapes
            return {
                "kind": "client",
                "scrapes": len(xs),
                "failed": self.client_failed,
                "scrape_ms_median": 1000 * statistics.median(xs) if xs else None,
            }
        if self.server is None:
            return {"kind": "none"}
        await asyncio.sleep(SCRAPE_EVERY_S * 2.5)  # one scrape after the last call at least
        out: dict[str, Any] = {"kind": "prometheus", "version": _prometheus_version()}
        for key, q in (
            ("scrapes", "count_over_time(up[1h])"),
            ("scrapes_up", "sum_over_time(up[1h])"),
            ("scrape_ms_mean", "1000 * avg_over_time(scrape_duration_seconds[1h])"),
            ("scrape_ms_max", "1000 * max_over_time(scrape_duration_seconds[1h])"),
            ("samples_per_scrape", "scrape_samples_scraped"),
            ("requests_total", "sum(llm_proxy_requests_total)"),
        ):
            out[key] = await self.query(session, q)
        return out

    def pid(self) -> dict[str, int]:
        return {"prometheus": self.server.pid} if self.server is not None else {}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _prometheus_version() -> str | None:
    try:
        out = subprocess.run([str(PROMETHEUS), "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[2] if len(out) > 2 else None


# --------------------------------------------------------------------------- checks


def proxy_config(path: Path, mock_port: int, replies: bool, metrics: bool) -> None:
    """The harness's config (openai at the mock, a price for the model); a part that is on
    is left to its defaults, so B's config is the harness's exactly."""
    write_config(path, mock_port)
    cfg = orjson.loads(path.read_bytes())
    if not replies:
        cfg["replies"] = {"cost_headers": False, "stream_comment": False}
    if not metrics:
        cfg["metrics"] = {"enabled": False}
    path.write_bytes(orjson.dumps(cfg, option=orjson.OPT_INDENT_2))


async def metrics_requests(session: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    """GET /metrics: its status, and the sum of llm_proxy_requests_total over its series."""
    async with session.get(f"http://{HOST}:{port}/metrics") as r:
        text = await r.text()
        status = r.status
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("llm_proxy_requests_total{"))
    return {"status": status, "requests_total": total if status == 200 else None}


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The log's records by record_id, money as exact decimals."""
    out = {}
    for line in path.read_bytes().splitlines():
        rec = json.loads(line, parse_float=Decimal)
        out[str(rec.get("record_id"))] = rec
    return out


def check_samples(samples: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each sampled reply's figures against its record in the log, to the digit."""
    bad: list[str] = []
    for s in samples:
        rid = s.get("record_id")
        rec = records.get(str(rid))
        if rec is None:
            bad.append(f"{s['kind']}: record {rid} not in the log")
            continue
        if s["kind"] == "headers":
            got = (Decimal(s["total_cost"]), int(s["input_tokens"]), int(s["output_tokens"]))
        else:
            if s.get("header_record_id") != rid:
                bad.append(f"comment: record id {rid} but header {s.get('header_record_id')}")
            got = (s["total_cost"], s["input_tokens"], s["output_tokens"])
        want = (rec["total_cost"], rec["input_tokens"], rec["output_tokens"])
        if got != want:
            bad.append(f"{s['kind']} {rid}: reply {got} != record {want}")
    return {"sampled": len(samples), "equal": len(samples) - len(bad), "mismatches": bad[:10], "ok": bool(samples) and not bad}


def added_work(log: Path, loops: int = 2000) -> dict[str, float]:
    """The work B does per call and A does not, timed in this process on one of B's own
    records (best of 5 x ``loops``): the size of what the end-to-end figures look for."""
    line = log.read_bytes().split(b"\n", 1)[0]
    rec = json.loads(line, parse_float=Decimal)
    tally = MetricsTally()

    def per_call_us(fn: Callable[[], object]) -> float:
        return 1e6 * min(timeit.repeat(fn, number=loops, repeat=5)) / loops

    out = {
        "cost_headers_us": per_call_us(lambda: cost_headers(rec)),
        "comment_line_us": per_call_us(lambda: comment_line(rec, json_default)),
        "metrics_tally_add_us": per_call_us(lambda: tally.add(rec, line)),
    }

    def scrape() -> bytes:
        series, overflow = tally.snapshot()
        return render(Snapshot(tally.label_names, series, overflow, []))

    out["scrape_render_one_series_us"] = 1e6 * min(timeit.repeat(scrape, number=50, repeat=5)) / 50
    return out


# --------------------------------------------------------------------------- the run


def ratio_summary(rounds: list[dict[str, Any]], names: list[str], pick: Callable[[Any], float], blocks: int) -> dict[str, Any]:
    """p50/p95/p99 per target, and each against A's; the p50 ratio block by block
    (consecutive rounds): how it drifted through the phase."""
    out: dict[str, Any] = {}
    for name in names:
        out[name] = summary_ms([pick(r[name]) for r in rounds if r.get(name) is not None])
    for name in names[1:]:
        out[f"{name}/A"] = {k: out[name][k] / out["A"][k] for k in ("median_ms", "p95_ms", "p99_ms")}
        size = max(1, len(rounds) // blocks)
        per_block = []
        for i in range(0, len(rounds) - size + 1, size):
            chunk = rounds[i : i + size]
            a = [pick(r["A"]) for r in chunk if r.get("A") is not None]
            b = [pick(r[name]) for r in chunk if r.get(name) is not None]
            if a and b:
                per_block.append(statistics.median(b) / statistics.median(a))
        out[f"{name}/A"]["median_by_block"] = [round(x, 3) for x in per_block]
    return out


def rps_summary(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Best and median round per target; each against A paired within each round (seconds
    apart, so under much the same background load), median over the rounds; CPU per call,
    least contended round."""
    out: dict[str, Any] = {}
    for name, rs in rounds.items():
        out[name] = {
            "rps_best": max(r["rps"] for r in rs),
            "rps_median": statistics.median(r["rps"] for r in rs),
            "rps_rounds": [round(r["rps"], 1) for r in rs],
            "other_cores_rounds": [round(r["other_cores"], 2) for r in rs],
            "cpu_us_per_call": min(r["proxy_cpu_us_per_call"] for r in rs if r["proxy_cpu_us_per_call"] is not None),
        }
    for name in list(rounds)[1:]:
        paired = [b["rps"] / a["rps"] for a, b in zip(rounds["A"], rounds[name]) if a["rps"]]
        out[f"{name}/A"] = {
            "rps_best": out[name]["rps_best"] / out["A"]["rps_best"],
            "rps_median": out[name]["rps_median"] / out["A"]["rps_median"],
            "paired": statistics.median(paired),
            "paired_rounds": [round(x, 3) for x in paired],
            "cpu_us_per_call": out[name]["cpu_us_per_call"] / out["A"]["cpu_us_per_call"],
        }
    return out


async def run(args: argparse.Namespace, P: dict[str, Any], tmp: Path) -> dict[str, Any]:
    names = ["A", "A2", "B", *(("H", "M") if args.split else ()), *(("B+scrape",) if args.scraper != "none" else ())]
    mock_port = free_port()
    ports = {name: free_port() for name in names}
    logs = {name: tmp / f"log-{i}.jsonl" for i, name in enumerate(names)}
    servers: dict[str, Server] = {"mock": start_mock(mock_port, tmp)}
    for i, name in enumerate(names):
        cfg = tmp / f"config-{i}.yml"
        proxy_config(cfg, mock_port, *SWITCHES[name])
        env = {"COST_TRACKING_FILE": str(logs[name]), "PYTHONUNBUFFERED": "1"}
        servers[name] = start_proxy(f"proxy-{i}", cfg, ports[name], tmp, env=env)
    scraper = Scraper(args.scraper, ports.get("B+scrape", 0), tmp)
    R: dict[str, Any] = {"names": names, "switches": {n: SWITCHES[n] for n in names}, "params": P, "background_cores": {}}
    seen = {name: Seen(P["sample_every"]) for name in names}
    targets = [Target(name, f"http://{HOST}:{ports[name]}/openai") for name in names]
    t_start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=60, sock_read=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            for s in servers.values():
                await s.wait_ready(session)
            await scraper.start(session)
            R["startup_s"] = time.perf_counter() - t_start
            print(f"mock, {len(names)} proxies and the scraper ({args.scraper}) ready in {R['startup_s']:.1f} s", flush=True)
            pids = {k: s.pid for k, s in servers.items()} | scraper.pid()
            bg = R["background_cores"]

            print(f"warm-up: {P['warmup']} JSON + {P['warmup'] // 4} streamed calls per target", flush=True)
            await interleaved(session, targets, seen, P["warmup"], P["latency_budget_s"], call_json)
            await interleaved(session, targets, seen, P["warmup"] // 4, P["stream_budget_s"], call_stream)

            print(f"latency: {P['latency_calls']} sequential JSON calls per target (interleaved)", flush=True)
            with LoadMeter(pids) as m:
                rounds = await interleaved(session, targets, seen, P["latency_calls"], P["latency_budget_s"], call_json)
            bg["latency_json"] = m.other_cores
            R["latency_json"] = ratio_summary(rounds, names, lambda x: x, P["blocks"])
            R["latency_json"]["cpu_us_per_call"] = {n: 1e6 * m.cpu[n] / len(rounds) for n in names}

            print(f"latency: {P['stream_calls']} sequential streamed calls per target (interleaved)", flush=True)
            with LoadMeter(pids) as m:
                rounds = await interleaved(session, targets, seen, P["stream_calls"], P["stream_budget_s"], call_stream)
            bg["latency_stream"] = m.other_cores
            R["stream_last_byte"] = ratio_summary(rounds, names, lambda x: x[1], P["blocks"])
            R["stream_last_byte"]["cpu_us_per_call"] = {n: 1e6 * m.cpu[n] / len(rounds) for n in names}
            R["stream_first_byte"] = ratio_summary(rounds, names, lambda x: x[0], P["blocks"])

            for key, fn, nrounds, secs in (
                ("rps_json", call_json, P["rps_rounds"], P["rps_round_s"]),
                ("rps_stream", call_stream, P["stream_rps_rounds"], P["stream_rps_round_s"]),
            ):
                what = "JSON" if fn is call_json else "streamed"
                print(
                    f"throughput: {nrounds} round(s) x {secs:g} s of {what} calls per target, {CONCURRENCY} concurrent callers", flush=True
                )
                for t in targets:  # warm-up: connections to the upstream, allocator
                    await concurrent(session, t, seen[t.name], secs / 3, fn, pids)
                per: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for r in range(nrounds):
                    k = r % len(targets)
                    for t in targets[k:] + targets[:k]:
                        res = await concurrent(session, t, seen[t.name], secs, fn, pids)
                        per[t.name].append(res)
                        print(f"    round {r + 1} {t.name:8s} {res['rps']:7.0f} req/s  (other processes {res['other_cores']:.2f} cores)")
                R[key] = rps_summary(per)
                bg[key] = max(max(r["other_cores"] for r in rs) for rs in per.values())

            R["metrics_endpoint"] = {name: await metrics_requests(session, ports[name]) for name in names}
            R["scrape"] = await scraper.finish(session)
            R["elapsed_measure_s"] = time.perf_counter() - t_start
    finally:
        scraper.stop()
        R["exit_codes"] = {k: s.stop() for k, s in reversed(list(servers.items()))}

    R["calls"] = {t.name: t.calls for t in targets}
    R["errors"] = {t.name: {"count": len(t.errors), "first": t.errors[:5]} for t in targets}
    R["seen"] = {name: s.as_dict() for name, s in seen.items()}
    R["log_check"] = {name: check_log(logs[name], R["calls"][name]) for name in names}
    R["figures_check"] = {name: check_samples(seen[name].samples, read_records(logs[name])) for name in names if SWITCHES[name][0]}
    R["checks"] = checks(R)
    R["added_work"] = added_work(logs["B"])
    return R


def checks(R: dict[str, Any]) -> dict[str, bool]:
    """That the run compares what it claims to: a proxy with the replies' cost off sent
    none, with it on sent it on every reply, equal to its log; with metrics off there is no
    /metrics, with it on /metrics counted every call."""
    S, M, calls = R["seen"], R["metrics_endpoint"], R["calls"]
    sc = R["scrape"]
    out = {
        "logs_one_line_per_call": all(c["ok"] for c in R["log_check"].values()),
        # The same work behind every target: each call metered and priced, A's as well.
        "every_record_priced": all(c["priced"] == c["with_usage"] == c["lines"] for c in R["log_check"].values()),
        "no_client_errors": not any(e["count"] for e in R["errors"].values()),
        "figures_equal_the_log": all(c["ok"] for c in R["figures_check"].values()),
    }
    for name in R["names"]:
        s = S[name]
        replies, metrics = SWITCHES[name]
        if replies:
            out[f"{name}_sent_every_cost"] = s["json_with_cost"] == s["json_calls"] > 0 and s["streams_with_comment"] == s["streams"] > 0
        else:
            out[f"{name}_sent_no_cost"] = (
                s["json_calls"] > 0 and s["json_with_any"] == s["streams_with_any_header"] == s["streams_with_comment"] == 0
            )
        if metrics:
            out[f"{name}_metrics_count_every_call"] = M[name]["requests_total"] == calls[name]
        else:
            out[f"{name}_no_metrics_route"] = M[name]["status"] == 404
    if sc["kind"] == "prometheus":
        out["prometheus_scraped_every_call"] = sc["requests_total"] == calls["B+scrape"] and (sc["scrapes_up"] or 0) > 0
    elif sc["kind"] == "client":
        out["every_scrape_answered"] = sc["scrapes"] > 0 and sc["failed"] == 0
    return out


# --------------------------------------------------------------------------- report


def _f(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _row(label: str, values: list[str]) -> str:
    return f"  {label:36s} " + " ".join(f"{v:>9s}" for v in values)


def report(R: dict[str, Any], argv: list[str], quick: bool) -> None:
    w = print
    sc = R["scrape"]
    names = R["names"]
    others = names[1:]
    w("")
    w(
        f"llm-cost-proxy: cost on replies and /metrics ({'quick' if quick else 'full'} run, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, event loop {baseline_servers.event_loop_name()})"
    )
    w(f"command: python bench/bench_outputs.py {' '.join(argv)}".rstrip())
    w(f"proxy code: commit {git_head()}{' + uncommitted changes under proxy/' if proxy_dirty() else ''}")
    scraper = {"prometheus": f"Prometheus {sc.get('version')}", "client": "a client GET", "none": "nothing"}[sc["kind"]]
    w("A, A2: cost headers, stream comment and metrics off (two processes: A2/A is the noise between identical proxies);")
    w("B: all three on (the defaults)" + ("; H: headers and comment only; M: metrics only" if "H" in names else ""))
    if "B+scrape" in names:
        w(f"B+scrape: B's config, its /metrics scraped by {scraper} every {SCRAPE_EVERY_S:g} s")
    head = [*names, *(f"{n}/A" for n in others)]
    w("=" * (38 + 10 * len(head)))
    w(f"{'Latency, sequential (interleaved)':38s} " + " ".join(f"{h:>9s}" for h in head))
    for key, label, stats in (
        ("latency_json", "JSON call", ("median_ms", "p95_ms", "p99_ms")),
        ("stream_last_byte", "stream, to the last byte", ("median_ms", "p95_ms", "p99_ms")),
        ("stream_first_byte", "stream, to the first byte", ("median_ms",)),
    ):
        L = R[key]
        for stat in stats:
            w(
                _row(
                    f"{label}, {stat.split('_')[0]} ms",
                    [f"{L[n][stat]:.3f}" for n in names] + [f"{L[n + '/A'][stat]:.3f}x" for n in others],
                )
            )
        if "cpu_us_per_call" in L:
            c = L["cpu_us_per_call"]
            w(_row("  proxy CPU us/call (whole phase)", [f"{c[n]:.0f}" for n in names] + [f"{c[n] / c['A']:.3f}x" for n in others]))
    blocks = R["latency_json"]["B/A"]["median_by_block"]
    w(f"  (JSON p50, B/A by block of consecutive rounds: {min(blocks):.3f}-{max(blocks):.3f}x over {len(blocks)} blocks)")
    w(f"{'Throughput, 32 concurrent callers':38s} " + " ".join(f"{h:>9s}" for h in head))
    for key, label in (("rps_json", "JSON"), ("rps_stream", "SSE stream")):
        T = R[key]
        for stat, what in (("rps_best", "req/s, best round"), ("rps_median", "req/s, median round")):
            w(_row(f"{label} {what}", [f"{T[n][stat]:.0f}" for n in names] + [f"{T[n + '/A'][stat]:.3f}x" for n in others]))
        w(_row("  paired by round (median)", [""] * len(names) + [f"{T[n + '/A']['paired']:.3f}x" for n in others]))
        w(
            _row(
                "  proxy CPU us/call",
                [f"{T[n]['cpu_us_per_call']:.0f}" for n in names] + [f"{T[n + '/A']['cpu_us_per_call']:.3f}x" for n in others],
            )
        )
    aw = R["added_work"]
    w("What B does per call that A does not, timed in this process (best of 5)")
    w(
        f"  cost headers {aw['cost_headers_us']:.1f} us, stream comment {aw['comment_line_us']:.1f} us, "
        f"metrics tally {aw['metrics_tally_add_us']:.1f} us per call; one scrape's render {aw['scrape_render_one_series_us']:.0f} us"
    )
    w("Checks")
    lc = R["log_check"]
    w("  logs: " + "; ".join(f"{n} {lc[n]['lines']} lines / {lc[n]['expected']} calls" for n in names))
    S = R["seen"]
    for n in names:
        s = S[n]
        w(
            f"  {n:8s} replies: JSON {s['json_with_cost']}/{s['json_calls']} with {COST_HEADER} "
            f"({s['json_with_any']} with any {HEADER_PREFIX}*), streams {s['streams_with_comment']}/{s['streams']} with the comment "
            f"({s['streams_with_any_header']} with any {HEADER_PREFIX}* header)"
        )
    for n, fc in R["figures_check"].items():
        extra = f"  {fc['mismatches']}" if fc["mismatches"] else ""
        w(f"  {n:8s} sampled replies' figures equal to the log's records: {fc['equal']}/{fc['sampled']}{extra}")
    M = R["metrics_endpoint"]
    w(
        "  GET /metrics: "
        + "; ".join(
            f"{n} {M[n]['status']}" + (f", requests_total {_f(M[n]['requests_total'])}" if M[n]["status"] == 200 else "") for n in names
        )
    )
    if sc["kind"] == "prometheus":
        w(
            f"  Prometheus: {_f(sc['scrapes'])} scrapes ({_f(sc['scrapes_up'])} up), {_f(sc['samples_per_scrape'])} samples each, "
            f"{_f(sc['scrape_ms_mean'], '.1f')} ms mean / {_f(sc['scrape_ms_max'], '.1f')} ms max; "
            f"its last scrape: {_f(sc['requests_total'])} requests"
        )
    elif sc["kind"] == "client":
        w(f"  scrapes: {sc['scrapes']}, {sc['failed']} not 200 (median {_f(sc['scrape_ms_median'], '.1f')} ms)")
    w(f"  client-side errors: { {k: v['count'] for k, v in R['errors'].items()} }")
    failed = [name for name, ok in R["checks"].items() if not ok]
    w(f"  {len(R['checks']) - len(failed)}/{len(R['checks'])} checks OK" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    bg = R["background_cores"]
    w("background load from other processes (cores, max per phase): " + ", ".join(f"{k} {v:.2f}" for k, v in bg.items()))
    if any(v > QUIET_CORES for v in bg.values()):
        w("  WARNING: other processes used the CPUs during the run; ratios are noisier than usual")
    w(f"measured in {R['elapsed_measure_s']:.1f} s (start-up {R['startup_s']:.1f} s included)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~20-30 s)")
    ap.add_argument(
        "--scraper",
        choices=("prometheus", "client", "none"),
        default="prometheus" if PROMETHEUS else "client",
        help="what scrapes B+scrape's /metrics every second (default: prometheus when installed, else client)",
    )
    ap.add_argument("--split", action="store_true", help="also H (cost headers and comment only) and M (metrics only)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, server output)")
    ap.add_argument("--out", default=str(RESULTS), help=f"JSON result (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.scraper == "prometheus" and not PROMETHEUS:
        ap.error("no prometheus binary on PATH (use --scraper client)")
    P = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    try:
        R = asyncio.run(run(args, P, tmp))
        report(R, argv, args.quick)
    finally:
        if args.keep:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    R["meta"] = {
        "mode": "quick" if args.quick else "full",
        "argv": argv,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "event_loop": baseline_servers.event_loop_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_head(),
        "proxy_tree_dirty": proxy_dirty(),
    }
    out = Path(args.out)
    write_results(out, R)
    print(f"JSON result: {out}")
    return 0 if all(R["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
