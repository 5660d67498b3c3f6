"""The analytics API's engine worker: a worker that dies (killed, out of memory) is
replaced on the next request, and proxied calls never wait for a long query."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import yaml

from tests.support import ROOT
from tests.support.config import make_config
from tests.support.ports import free_port
from tests.support.proxy_process import health_url, proxy_command, wait_serving
from tests.support.synthlog import REALISTIC, records, write_log


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def _workers(pid: int) -> list[int]:
    """The proxy's spawned worker processes (multiprocessing's resource tracker aside)."""
    found = []
    for child in _children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd:
            found.append(child)
    return found


def _start(tmp_path: Path, n: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    """The proxy as its own process over a log of ``n`` generated records."""
    log = write_log(tmp_path / "log.jsonl", records(n, mix=REALISTIC, seed=n, end=time.time() - 60, days=3))
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(make_config("http://127.0.0.1:9")))
    port = free_port()
    proc = subprocess.Popen(proxy_command(config, port, host="127.0.0.1", log_file=log), cwd=ROOT, stderr=subprocess.PIPE)
    return proc, port, log


async def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    proc, port, log = _start(tmp_path, 500)
    try:
        async with aiohttp.ClientSession() as s:
            assert await wait_serving(s, health_url(port), exited=lambda: proc.poll() is not None)
            url = health_url(port, "/api/analytics/usage?days=7")
            async with s.get(url) as r:
                assert r.status == 200
                first = await r.json()
            workers = _workers(proc.pid)
            assert workers, "the worker runs in a process of its own"
            for w in workers:
                os.kill(w, signal.SIGKILL)
            # A different query (no cached answer): the dead pool is replaced and it answers.
            async with s.get(url + "&provider=openai") as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["requests"] <= first["requests"]
            assert set(_workers(proc.pid)).isdisjoint(workers)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"analytics worker stopped; starting a new one" in err


async def test_without_auth_only_requests_addressed_to_this_machine_are_answered(tmp_path: Path) -> None:
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1 sends its
    own Host and Origin; it was answered with everyone's numbers, and could POST usage."""
    proc, port, log = _start(tmp_path, 50)
    try:
        async with aiohttp.ClientSession() as s:
            assert await wait_serving(s, health_url(port), exited=lambda: proc.poll() is not None)
            url = health_url(port, "/api/analytics/usage?days=7")
            for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
                async with s.get(url, headers={"Host": host}) as r:
                    assert r.status == 200, host
            evil = {"Host": f"rebind.attacker.example:{port}", "Origin": f"http://rebind.attacker.example:{port}"}
            async with s.get(url, headers=evil) as r:
                assert r.status == 403 and "127.0.0.1" in (await r.json())["error"]["message"]
            body = b'{"model": "gpt-4o", "input_tokens": 10, "output_tokens": 5}'
            post = health_url(port, "/api/usage")
            async with s.post(post, data=body, headers={"Content-Type": "application/json", "Origin": "http://evil.example"}) as r:
                assert r.status == 403
            lines = log.read_bytes().count(b"\n")
            async with s.post(post, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 201
            assert log.read_bytes().count(b"\n") == lines + 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


async def test_clients_that_leave_an_export_leave_no_reader_behind(tmp_path: Path) -> None:
    """An export read by a thread that waited on a full queue once stayed blocked when its
    client left; the export threads are few, so later exports would wait for ever."""
    proc, port, log = _start(tmp_path, 20_000)
    try:
        async with aiohttp.ClientSession() as s:
            assert await wait_serving(s, health_url(port), exited=lambda: proc.poll() is not None)
            url = health_url(port, "/api/analytics/export?format=jsonl&days=30")
            for _ in range(4):  # more than the export threads
                async with s.get(url) as r:
                    assert r.status == 200
                    await r.content.read(1000)
                    r.close()  # leaves mid-stream
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
                body = await r.read()
            want = sum(1 for line in log.read_bytes().splitlines() if line.strip())
            assert body.count(b"\n") == want  # every record of the 3 days, once
            async with s.get(health_url(port, "/health")) as r:
                assert r.status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
