#!/usr/bin/env python3
"""Calls, records, duplicates and losses when the disk misbehaves under a live proxy.

Runs the real proxy (``python -m proxy``) against the benchmark's mock upstream
(``baseline_servers.py``), on
127.0.0.1, with its log on a tiny tmpfs, and counts what reached the log:

* disk-full    - the tmpfs is filled to the last byte, calls are made, space is freed,
                 more calls are made, the proxy is stopped with SIGINT;
* unwritable   - the log is renamed away (as logrotate does) and the file system made
                 read-only, so the writer cannot reopen it; calls; read-write again;
* shutdown-ro  - the file system is read-only when the proxy is stopped: the held
                 records must land in the fallback file, with one line on stderr;
* sigkill      - 32 concurrent callers, SIGKILL mid-flight: every reply received in full
                 must have a record.

    sudo python bench/fault_runs.py [--calls 1200]

Needs root (mount). Prints one line per run; JSON in bench/results/fault_runs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import proxy_harness as bp  # the mock upstream and the client calls

RESULTS = bp.ROOT / "bench" / "results" / "fault_runs.json"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def fill(directory: Path) -> Path:
    path = directory / "filler"
    with open(path, "ab", buffering=0) as f:
        block = b"\0" * 4096
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return path


def count(paths: list[Path]) -> dict[str, int]:
    """Valid lines, unparseable fragments, and records written more than once."""
    valid = bad = 0
    ids: dict[str, int] = {}
    for p in paths:
        if not p.exists():
            continue
        for line in p.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            valid += 1
            ids[rec["record_id"]] = ids.get(rec["record_id"], 0) + 1
    return {"lines": valid, "fragments": bad, "unique": len(ids), "duplicates": sum(n - 1 for n in ids.values())}


class Proxy:
    def __init__(self, tmp: Path, mock_port: int, log: Path, fallback: Path) -> None:
        self.port = bp.free_port()
        cfg = tmp / "config.yml"
        bp.write_config(cfg, mock_port)
        self.stderr = tmp / f"proxy-{self.port}.stderr"
        self.proc = subprocess.Popen(
            bp.proxy_command(cfg, self.port, log_file=log),
            cwd=bp.ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr, "wb"),
            env={**os.environ, "COST_TRACKING_FALLBACK": str(fallback)},
        )
        self.url = f"http://{bp.HOST}:{self.port}/openai"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        if not await bp.wait_serving(session, f"http://{bp.HOST}:{self.port}/health", exited=lambda: self.proc.poll() is not None):
            raise RuntimeError(self.stderr.read_text())

    def stop(self, sig: int = signal.SIGINT) -> str:
        self.proc.send_signal(sig)
        self.proc.wait(30)
        return self.stderr.read_text(errors="replace")


async def calls(session: aiohttp.ClientSession, url: str, n: int, conc: int = 16) -> tuple[int, list[str]]:
    """n calls (every 4th streamed); (calls whose reply arrived in full, their request ids)."""
    target = bp.Target("proxy", url)
    done = 0
    left = n

    async def worker(i: int) -> None:
        nonlocal done, left
        while left > 0:
            left -= 1
            r = await (bp.call_stream(session, target) if left % 4 == 0 else bp.call_json(session, target))
            done += r is not None

    await asyncio.gather(*(worker(i) for i in range(conc)))
    return done, target.errors


async def run_disk(kind: str, tmp: Path, mock_port: int, n: int) -> dict:
    fs = tmp / kind
    fs.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs))
    log, fallback = fs / "cost.jsonl", tmp / f"{kind}-fallback.jsonl"
    out: dict = {"run": kind}
    try:
        proxy = Proxy(tmp, mock_port, log, fallback)
        async with aiohttp.ClientSession() as session:
            await proxy.ready(session)
            made = 0
            if kind == "disk-full":
                filler = fill(fs)
                made += (await calls(session, proxy.url, n // 2))[0]
                filler.unlink()
                made += (await calls(session, proxy.url, n - n // 2))[0]
            elif kind == "unwritable":
                made += (await calls(session, proxy.url, n // 4))[0]
                log.rename(fs / "cost.jsonl.1")
                # A read-only file system laid over the directory: the log's path is gone
                # and nothing can be created there (remount,ro is refused while the old
                # log is open for writing).
                sh("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(fs))
                made += (await calls(session, proxy.url, n // 2))[0]
                sh("umount", str(fs))
                made += (await calls(session, proxy.url, n - n // 4 - n // 2))[0]
            else:  # shutdown-ro
                made += (await calls(session, proxy.url, n // 2))[0]
                sh("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(fs))
                made += (await calls(session, proxy.url, n - n // 2))[0]
        err = proxy.stop()
        if kind == "shutdown-ro":
            sh("umount", str(fs))
        out["stderr_tail"] = [line for line in err.splitlines() if "records could not be written" in line][-1:]
        out["traceback"] = "Traceback" in err
        files = [fs / "cost.jsonl.1", log, fallback]
        out.update(calls=made, **count(files))
        out["lost"] = made - out["unique"]
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    return out


async def run_sigkill(tmp: Path, mock_port: int, n: int) -> dict:
    log = tmp / "sigkill.jsonl"
    proxy = Proxy(tmp, mock_port, log, tmp / "sigkill-fallback.jsonl")
    received: list[int] = []
    async with aiohttp.ClientSession() as session:
        await proxy.ready(session)
        target = bp.Target("proxy", proxy.url)
        stop = asyncio.Event()

        async def worker(i: int) -> None:
            while not stop.is_set():
                r = await (bp.call_stream(session, target) if i % 2 else bp.call_json(session, target))
                if r is not None and not stop.is_set():
                    received.append(1)

        workers = [asyncio.create_task(worker(i)) for i in range(32)]
        while len(received) < n:
            await asyncio.sleep(0.005)
        proxy.proc.kill()
        # Replies counted up to the kill; anything received after it could only have
        # come in full from a proxy that had written its record before its last byte.
        got = len(received)
        proxy.proc.wait(10)
        stop.set()
        await asyncio.gather(*workers)
    c = count([log])
    return {"run": "sigkill", "replies_received": got, **c, "lost": max(0, got - c["unique"])}


async def main_async(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mock_port = bp.free_port()
        mock = bp.start_mock(mock_port, tmp)
        try:
            async with aiohttp.ClientSession() as s:
                await mock.wait_ready(s)
            results = [await run_disk(k, tmp, mock_port, args.calls) for k in ("disk-full", "unwritable", "shutdown-ro")]
            results.append(await run_sigkill(tmp, mock_port, args.calls))
        finally:
            mock.stop()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = asyncio.run(main_async(args))
    for r in results:
        print(json.dumps(r))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": args.calls, "seconds": time.perf_counter() - t0, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
