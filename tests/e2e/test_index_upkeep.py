"""The proxy keeps its log's roll-up index current (web/index_upkeep.py): after its calls
the index covers the whole log, so a report reads no line raw, and says what a report
that reads every line says. Rotation and a report updating the index at the same time
are handled too."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tests.support import ROOT
from tests.support.config import make_config
from tests.support.mock_upstream import MockUpstream
from tests.support.ports import free_port
from tests.support.provider_replies import openai_chat
from tests.support.proxy_process import health_url, proxy_command, wait_serving
from tests.support.synthlog import REALISTIC, dumps, records, write_log


def index_of(log: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(log.with_name(f".{log.name}.rollup").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def covered(log: Path) -> int:
    data = index_of(log)
    return data["segments"][-1]["b"] if data and data["segments"] else 0


async def until_covered(log: Path, proc: subprocess.Popen[bytes], deadline: float = 60) -> None:
    """Wait for the upkeep to index ``log`` to its end (it runs after a quiet second)."""
    end = time.monotonic() + deadline
    while covered(log) != log.stat().st_size:
        assert proc.poll() is None, "the proxy stopped"
        assert time.monotonic() < end, f"index covers {covered(log)} of {log.stat().st_size} bytes"
        await asyncio.sleep(0.1)


def report(log: Path, *extra: str) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "proxy", "report", "--log-file", str(log), "--since", "all", "--format", "json", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout, parse_float=Decimal)


async def calls(session: aiohttp.ClientSession, port: int, n: int) -> None:
    url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
    for i in range(n):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"hi {i}"}], "stream": i % 3 == 0}
        async with session.post(url, json=body, headers={"Authorization": "Bearer sk-test"}) as r:
            assert r.status == 200
            await r.read()


async def test_the_proxy_keeps_its_index_current(tmp_path: Path, mock: MockUpstream) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock, unique_ids=True))
    # A log the proxy did not write, already there when it starts: indexed too.
    log = write_log(tmp_path / "cost.jsonl", records(3000, mix=REALISTIC, seed=5, end=time.time() - 60, days=2))
    assert index_of(log) is None
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(make_config(mock.url)))
    port = free_port()
    proc = subprocess.Popen(proxy_command(config, port, host="127.0.0.1", log_file=log), cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as s:
            assert await wait_serving(s, health_url(port), exited=lambda: proc.poll() is not None)
            await calls(s, port, 40)
            await until_covered(log, proc)
            first = index_of(log)
            assert first is not None and first["segments"][0]["a"] == 0
            # The report reads the index and nothing raw (it covers every byte), and
            # agrees with a report that reads every line.
            indexed, raw = report(log), report(log, "--no-index")
            assert indexed["totals"] == raw["totals"]
            assert indexed["totals"]["requests"] == 3040

            # More calls extend the index; a report over it agrees again.
            await calls(s, port, 25)
            await until_covered(log, proc)
            assert report(log)["totals"] == report(log, "--no-index")["totals"]

            # Rotated: the log renamed, the proxy starts a new one under the name (which
            # another writer grows past SMALL_LOG too). Its index is of the new file: the
            # old one's does not apply to it.
            log.rename(tmp_path / "cost.jsonl.1")
            await calls(s, port, 10)
            more = b"".join(dumps(r) for r in records(1500, mix=REALISTIC, seed=6, end=time.time() - 60, days=1))
            fd = os.open(log, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, more)  # one O_APPEND write, as the proxy's are: never torn between
            finally:
                os.close(fd)
            await until_covered(log, proc)
            st = log.stat()
            data = index_of(log)
            assert data is not None and data["stat"][:2] == [st.st_dev, st.st_ino]
            assert report(log, "--no-rotated")["totals"]["requests"] == 1510
            assert report(log)["totals"] == report(log, "--no-index")["totals"]  # both files
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_one_updater_at_a_time(tmp_path: Path) -> None:
    """While another process holds the update lock, the upkeep skips its turn and a
    report still answers (without saving); once free, the update is done."""
    from proxy.storage.index import lock_path, update_index

    log = write_log(tmp_path / "cost.jsonl", records(400, mix=REALISTIC, seed=9, end=time.time() - 60, days=1))
    fd = os.open(lock_path(log), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert update_index(log) is None
        assert report(log)["totals"]["requests"] == 400
        assert index_of(log) is None
    finally:
        os.close(fd)
    assert update_index(log) == log.stat().st_size
    assert report(log)["totals"] == report(log, "--no-index")["totals"]
