"""The harness of the proxy benchmarks (``bench_proxy.py``, ``bench_durability.py``,
``fault_runs.py``): the servers started as processes (the baseline mock upstream and bare
forwarder of ``baseline_servers.py``, and the proxy), what the kernel says about them
(RSS, CPU, the machine's other load), the HTTP load generator and its statistics, the
proxy log's check and the facts a result file records (commit, dirty tree).

Free ports and the proxy's command line come from tests/support/, shared with the tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as ``python bench/x.py``: tests.support from the repository
    sys.path.insert(0, str(ROOT))

from baseline_servers import DONE_EVENT, HOST, MODEL  # noqa: E402  (HOST, MODEL: for the scripts too)

# Also for the scripts (``bp.free_port()``, ``bp.proxy_command(...)``).
from tests.support.ports import free_port as free_port  # noqa: E402
from tests.support.proxy_process import proxy_command as proxy_command  # noqa: E402
from tests.support.proxy_process import wait_serving as wait_serving  # noqa: E402

SERVERS = Path(__file__).resolve().parent / "baseline_servers.py"
CLIENT_KEY = "sk-bench-0123456789abcdef"


# --------------------------------------------------------------------------- process helpers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmRSS:", b"VmHWM:")):
                    k, v = line.split(b":", 1)
                    out[k.decode()] = int(v.split()[0])
    except OSError:
        pass
    return out


_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has run, all its live threads: from each
    thread's ``schedstat`` (nanoseconds), else ``/proc/PID/stat`` (clock ticks). A tick is
    10 ms, as much as 40 proxied calls cost, so per-call figures from ticks were
    quantized by several percent per round; the benchmarked servers' threads live as long
    as the process, so none of their time is lost with an exited thread."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        total = 0
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                continue  # a thread that ended meanwhile
        return total / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def sys_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user + nice + system + steal; irq/softirq left out (mostly our own loopback traffic).
    return (sum(vals[:3]) + (vals[7] if len(vals) > 7 else 0)) / _TCK


class LoadMeter:
    """How many cores processes other than ours kept busy during a phase (noise check)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> "LoadMeter":
        self.w0, self.sys0, self.c0 = time.perf_counter(), sys_busy(), time.process_time()
        self.cpu0 = {k: proc_cpu(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.client_cpu = time.process_time() - self.c0
        self.cpu = {k: proc_cpu(p) - self.cpu0[k] for k, p in self.pids.items()}
        ours = self.client_cpu + sum(self.cpu.values())
        self.other_cores = max(0.0, (sys_busy() - self.sys0 - ours) / self.wall) if self.wall else 0.0


class Server:
    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log_path = logdir / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        url = f"http://{HOST}:{self.port}{self.ready_path}"
        if not await wait_serving(session, url, exited=lambda: self.proc.poll() is not None, timeout=timeout):
            raise RuntimeError(f"{self.name} did not start; log:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT (aiohttp's graceful stop: the proxy flushes its log), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_mock(port: int, logdir: Path) -> Server:
    """The baseline mock upstream (``baseline_servers.py --serve mock``) on ``port``."""
    return Server("mock", [sys.executable, str(SERVERS), "--serve", "mock", "--port", str(port)], port, "/ping", logdir)


def start_bare(port: int, mock_port: int, logdir: Path) -> Server:
    """The bare forwarder in front of the mock on ``mock_port``."""
    argv = [sys.executable, str(SERVERS), "--serve", "bare", "--port", str(port), "--upstream", f"http://{HOST}:{mock_port}"]
    return Server("bare", argv, port, "/ping", logdir)


def start_proxy(
    name: str, config: Path, port: int, logdir: Path, env: dict[str, str] | None = None, python: list[str] | None = None
) -> Server:
    """``python -m proxy`` (``python``: what runs the module, e.g. under cProfile) on ``port``."""
    argv = proxy_command(config, port, host=HOST, python=python or [sys.executable])
    return Server(name, argv, port, "/health", logdir, env=env)


# --------------------------------------------------------------------------- client side


class Target:
    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self.url = base + "/v1/chat/completions"
        self.calls = 0  # every request attempt (the proxy must log each one)
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        if len(self.errors) < 1000:
            self.errors.append(msg)


HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
BODY_JSON = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "user": "bench"})
# Clients that do not ask for usage: the proxy injects include_usage and hides the extra chunk.
BODY_STREAM = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "user": "bench", "stream": True})


async def call_json(session: aiohttp.ClientSession, t: Target) -> float | None:
    t.calls += 1
    t0 = time.perf_counter()
    try:
        async with session.post(t.url, data=BODY_JSON, headers=HEADERS) as r:
            data = await r.read()
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        t.error(f"json: {type(e).__name__}: {e}")
        return None
    dt = time.perf_counter() - t0
    if status != 200 or b'"usage"' not in data:
        t.error(f"json: status {status}")
        return None
    return dt


async def call_stream(
    session: aiohttp.ClientSession,
    t: Target,
    gap_ms: float = 0,
    big: int = 0,
) -> tuple[float, float, int] | None:
    """(time to first body byte, total time, bytes) of one streamed call."""
    t.calls += 1
    headers = dict(HEADERS)
    if gap_ms:
        headers["x-mock-gap-ms"] = str(gap_ms)
    if big:
        headers["x-mock-big-bytes"] = str(big)
    t0 = time.perf_counter()
    try:
        async with session.post(t.url, data=BODY_STREAM, headers=headers) as r:
            first = await r.content.readany()
            t1 = time.perf_counter()
            n, tail = len(first), first[-64:]
            async for chunk in r.content.iter_any():
                n += len(chunk)
                tail = (tail + chunk)[-64:]
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        t.error(f"stream: {type(e).__name__}: {e}")
        return None
    t2 = time.perf_counter()
    if status != 200 or not tail.endswith(DONE_EVENT):
        t.error(f"stream: status {status}, ended with {tail[-20:]!r}")
        return None
    return t1 - t0, t2 - t0, n


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "median_ms": pct(xs, 50) * 1000,
        "p95_ms": pct(xs, 95) * 1000,
        "p99_ms": pct(xs, 99) * 1000,
        "mean_ms": (statistics.fmean(xs) * 1000) if xs else float("nan"),
    }


async def interleaved(session: aiohttp.ClientSession, targets: list[Target], n: int, budget: float, fn) -> dict[str, list]:
    """n sequential calls per target, round-robin with rotating order, bounded by ``budget`` seconds."""
    out: dict[str, list] = {t.name: [] for t in targets}
    deadline = time.monotonic() + budget
    for i in range(n):
        if time.monotonic() > deadline:
            print(f"    (time budget hit after {i} rounds)", flush=True)
            break
        k = i % len(targets)
        for t in targets[k:] + targets[:k]:
            r = await fn(session, t)
            if r is not None:
                out[t.name].append(r)
    return out


async def concurrent(
    session: aiohttp.ClientSession, t: Target, n: int, conc: int, budget: float, stream: bool, pids: dict[str, int]
) -> dict[str, Any]:
    done = 0
    started = 0
    deadline = time.monotonic() + budget

    async def worker() -> None:
        nonlocal done, started
        while started < n and time.monotonic() < deadline:
            started += 1
            r = await (call_stream(session, t) if stream else call_json(session, t))
            if r is not None:
                done += 1

    with LoadMeter(pids) as m:
        await asyncio.gather(*(worker() for _ in range(conc)))
    wall = m.wall
    return {
        "calls": done,
        "attempted": started,
        "wall_s": wall,
        "rps": done / wall if wall else 0.0,
        "client_cpu_pct": 100 * m.client_cpu / wall if wall else 0.0,
        "server_cpu_s": m.cpu,
        "other_cores": m.other_cores,
    }


async def rss_sampler(pid: int, stop: asyncio.Event, peak: list[int], max_samples: int = 100_000) -> None:
    for _ in range(max_samples):
        rss = proc_status(pid).get("VmRSS", 0)
        peak[0] = max(peak[0], rss)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.01)
        except asyncio.TimeoutError:
            pass


# --------------------------------------------------------------------------- config, log, result facts


def write_config(path: Path, mock_port: int) -> None:
    # JSON is YAML: no yaml dependency needed here.
    cfg = {
        "features": {"cost_tracking": {"enabled": True}},
        "server": {"shutdown_timeout": 5},
        "providers": {
            "openai": {
                "base_url": f"http://{HOST}:{mock_port}",
                "models": {MODEL: {"pricing": {"input": 0.15, "output": 0.60, "cached_input": 0.075}}},
            }
        },
    }
    path.write_bytes(orjson.dumps(cfg, option=orjson.OPT_INDENT_2))


def check_log(path: Path, expected: int) -> dict[str, Any]:
    lines = path.read_bytes().splitlines() if path.exists() else []
    bad = 0
    statuses: dict[int, int] = {}
    streaming = priced = with_usage = errors = 0
    sample = None
    for ln in lines:
        try:
            rec = orjson.loads(ln)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        sample = sample or rec
        statuses[rec.get("status")] = statuses.get(rec.get("status"), 0) + 1
        streaming += bool(rec.get("is_streaming"))
        priced += rec.get("total_cost") is not None
        with_usage += rec.get("input_tokens") is not None
        errors += rec.get("error") is not None
    return {
        "lines": len(lines),
        "expected": expected,
        "ok": len(lines) == expected and bad == 0,
        "unparseable": bad,
        "statuses": {str(k): v for k, v in statuses.items()},
        "streaming": streaming,
        "priced": priced,
        "with_usage": with_usage,
        "with_error": errors,
        "sample": sample,
    }


def profile_top(path: Path, n: int = 30) -> str:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(n)
    return buf.getvalue()


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def proxy_dirty() -> bool | None:
    """Uncommitted changes under proxy/ (the numbers then describe the working tree)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def git_head() -> str | None:
    try:
        return (
            subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None
