"""SIGKILL under load: every reply a client received in full has its record.

The proxy runs as its own process (``python -m proxy``), as in production; the mock
upstream and the clients run here. The proxy is killed with SIGKILL while calls are in
flight; afterwards each reply the client received completely (a whole JSON body, or a
stream through its final event and the end of the body) must have a line in the log,
found by the upstream's id for that call.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from tests.support import ROOT
from tests.support.config import OPENAI_MODELS
from tests.support.ports import free_port
from tests.support.proxy_process import health_url, proxy_command, wait_serving


def _upstream() -> web.Application:
    counter = iter(range(10**9))

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = f"chatcmpl-{next(counter)}"
        usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "model": "gpt-4o-2024-08-06",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": rid, "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
        for text in ("Hel", "lo"):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n".encode())
        await resp.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _call(session: aiohttp.ClientSession, url: str, stream: bool, done: list[str]) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return
            data = await r.read()  # raises if the body was cut
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        return
    if stream:
        text = data.decode()
        if not text.rstrip().endswith("data: [DONE]"):
            return
        rid = json.loads(text.split("\n", 1)[0][6:])["id"]
    else:
        rid = json.loads(data)["id"]
    done.append(rid)


async def test_no_record_lost_to_sigkill_under_load(tmp_path: Path) -> None:
    runner = web.AppRunner(_upstream())
    await runner.setup()
    up_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "providers": {"openai": {"base_url": f"http://127.0.0.1:{up_port}", "models": OPENAI_MODELS}},
                "catalog": {"enabled": False},
            }
        )
    )
    log = tmp_path / "cost.jsonl"
    proc = subprocess.Popen(
        proxy_command(cfg, port, log_file=log),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            assert await wait_serving(session, health_url(port), interval=0.1), "the proxy did not start"

            stop = asyncio.Event()

            async def worker(i: int) -> None:
                while not stop.is_set():
                    await _call(session, url, stream=i % 2 == 1, done=done)

            workers = [asyncio.create_task(worker(i)) for i in range(32)]
            while len(done) < 1500:
                await asyncio.sleep(0.01)
            # Kill mid-flight: 32 calls are somewhere between request and reply.
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            await asyncio.gather(*workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await runner.cleanup()

    lines = log.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: no torn line either
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids)), "a call was recorded twice"
    missing = set(done) - set(ids)
    assert len(done) >= 1500
    assert not missing, f"{len(missing)} of {len(done)} fully received replies have no record"
