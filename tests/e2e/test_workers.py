"""``python -m proxy --workers N`` as a real process tree: N workers on one port, one
log with every call once and whole, and /health, /metrics, /api/... giving the totals
of all workers (whichever one answers), across a worker's restart; the supervisor's
signals; what it refuses to start with."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT
from tests.support.config import CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import MockUpstream, json_reply
from tests.support.ports import HOST, free_port
from tests.support.provider_replies import chat_completion
from tests.support.proxy_process import proxy_command
from tests.support.records import dec, parse_log
from tests.support.workers import Workers, alive, start_workers

COST_LINE = re.compile(
    r"^\S+ \S+ INFO 💵 Cost Tracking: openai/\S+ \| tokens in=\d+ out=\d+ \(cache read=\d+ write=\d+\) \| Cost: \S+ \| 200 \d+ms$"
)
MODELS = ("gpt-4o", "gpt-5", "o4-mini")


def _mock_routes(mock: MockUpstream) -> None:
    # Each call's usage differs (by its message's length), so a sum counts each call once.
    def reply(rec: Any) -> dict:
        n = len(rec.json["messages"][0]["content"])
        usage = {"prompt_tokens": 100 + n, "completion_tokens": 10 + n, "total_tokens": 110 + 2 * n}
        return chat_completion(rec.json["model"], usage=usage)

    mock.on("/v1/chat/completions", json_reply(reply))


async def _call(url: str, i: int) -> None:
    # A new connection each time: the kernel spreads connections, not requests, over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        body = {"model": MODELS[i % 3], "messages": [{"role": "user", "content": "x" * i}]}
        async with s.post(f"{url}/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}) as r:
            assert r.status == 200, await r.text()
            await r.read()


async def _calls(url: str, ids: range) -> None:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            await _call(url, i)

    await asyncio.gather(*(one(i) for i in ids))


async def _get(url: str, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, s.get(url + path) as r:
        return r.status, await r.read()


async def _health(url: str) -> dict:
    status, body = await _get(url, "/health")
    assert status == 200
    return json.loads(body, parse_float=Decimal)["cost_stats_24h"]


async def _metrics(url: str) -> dict[str, float]:
    status, body = await _get(url, "/metrics")
    assert status == 200, body
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name in ("llm_proxy_requests_total", "llm_proxy_cost_usd_total", "llm_proxy_tokens_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _prefixes(records: list[dict]) -> set[str]:
    # A record id is the process's random prefix (12 hex digits) and a counter.
    return {r["record_id"][:12] for r in records}


@pytest.fixture
async def cluster(mock: MockUpstream, tmp_path: Path):
    started: list[Workers] = []

    async def start(config: dict | None = None, **kw: Any) -> Workers:
        w = await start_workers(config or make_config(mock.url), tmp_path, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.returncode is None:
            w.proc.kill()
            await w.proc.wait()


async def test_two_workers_log_every_call_once_and_each_answers_with_all_workers_totals(mock, cluster):
    _mock_routes(mock)
    w = await cluster()
    pids = await w.wait_workers(2)
    await _calls(w.url, range(1, 121))

    records = parse_log(w.log.read_text())
    assert len(records) == 120 and len({r["record_id"] for r in records}) == 120
    assert len(_prefixes(records)) == 2, "both workers served calls"
    assert {r["input_tokens"] for r in records} == {100 + i for i in range(1, 121)}
    cost = sum((dec(r["total_cost"]) for r in records), Decimal(0))
    tokens = sum(r["total_tokens"] for r in records)

    # Fresh connections reach both workers; every answer is the whole log's.
    for _ in range(12):
        h = await _health(w.url)
        assert (h["requests"], h["total_cost"], h["tokens"]) == (120, cost, tokens)
        m = await _metrics(w.url)
        assert m["llm_proxy_requests_total"] == 120
        assert abs(Decimal(repr(m["llm_proxy_cost_usd_total"])) - cost) < Decimal("1e-9")
        assert m["llm_proxy_tokens_total"] == tokens
    # Each call's record by its id, whichever worker made it and whichever one is asked.
    for rec in records[::10]:
        status, body = await _get(w.url, f"/api/calls/{rec['record_id']}")
        assert status == 200 and json.loads(body)["record"]["record_id"] == rec["record_id"]
    status, body = await _get(w.url, "/api/analytics/usage?days=1")
    assert status == 200, body
    usage = json.loads(body, parse_float=Decimal)
    assert usage["requests"] == 120 and usage["total_cost"] == cost

    # A worker killed: the supervisor starts another, which counts from the same start.
    os.kill(pids[0], signal.SIGKILL)
    await w.wait_workers(2, not_in=[pids[0]])
    await _calls(w.url, range(121, 141))
    records = parse_log(w.log.read_text())
    assert len(records) == 140 and len(_prefixes(records)) >= 2
    cost = sum((dec(r["total_cost"]) for r in records), Decimal(0))
    for _ in range(12):
        m = await _metrics(w.url)
        assert m["llm_proxy_requests_total"] == 140
        assert abs(Decimal(repr(m["llm_proxy_cost_usd_total"])) - cost) < Decimal("1e-9")
        assert (await _health(w.url))["requests"] == 140

    code = await w.stop()
    assert code == 0, "".join(w.stderr)
    err = "".join(w.stderr)
    assert "worker 0" in err and "starting it again" in err
    # Every cost line whole: one per call, none interleaved with another.
    cost_lines = [line for line in err.splitlines() if "Cost Tracking" in line]
    assert len(cost_lines) == 140 and all(COST_LINE.match(line) for line in cost_lines), cost_lines[:3]
    assert all(not alive(p) for p in pids)


async def test_sigterm_lets_calls_in_flight_finish_and_a_killed_supervisor_takes_its_workers(mock, cluster):
    slow = json_reply(chat_completion("gpt-4o"))

    async def delayed(request, rec):
        await asyncio.sleep(1.0)
        return await slow(request, rec)

    mock.on("/v1/chat/completions", delayed)
    w = await cluster()
    pids = await w.wait_workers(2)
    calls = [asyncio.create_task(_call(w.url, i)) for i in range(1, 9)]
    while len(mock.requests) < 8:
        await asyncio.sleep(0.01)
    w.proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*calls)  # each answered, none cut
    assert await w.stop() == 0
    assert len(parse_log(w.log.read_text())) == 8
    assert all(not alive(p) for p in pids)

    w2 = await cluster()
    pids = await w2.wait_workers(2)
    await w2.stop(signal.SIGKILL)
    for _ in range(400):  # the workers see their pipe to the supervisor close
        if not any(alive(p) for p in pids):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(p) for p in pids)


def _serve(args: list[str], cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*proxy_command(cfg, log_file=tmp_path / "cost.jsonl"), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workers", "0"], "--workers: expected 1 to 256 processes, got 0"),
        (["--workers", "many"], "--workers: expected a number of processes or 'auto', got 'many'"),
    ],
)
def test_a_bad_worker_count_is_one_line_and_status_2(tmp_path, args, says):
    cfg = tmp_path / "c.yml"
    cfg.write_text(json.dumps(make_config("http://127.0.0.1:9")))
    done = _serve([*args, "--port", str(free_port())], cfg, tmp_path)
    assert done.returncode == 2 and done.stderr.strip().endswith(says) and len(done.stderr.strip().splitlines()) == 1


def test_in_process_budgets_are_refused_with_workers(tmp_path):
    config = make_config("http://127.0.0.1:9")
    config["budgets"] = {"limits": [{"scope": "global", "period": "daily", "usd": 5}]}
    cfg = tmp_path / "c.yml"
    cfg.write_text(json.dumps(config))
    done = _serve(["--workers", "2", "--port", str(free_port())], cfg, tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "--workers 2" in line and "budgets.backend: redis://" in line


def test_a_port_in_use_is_one_line(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(json.dumps(make_config("http://127.0.0.1:9")))
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(["--workers", "2", "--port", str(port)], cfg, tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"port {port} on 127.0.0.1 is in use" in line
