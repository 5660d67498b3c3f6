"""``python -m proxy`` as a real process: serve, SIGTERM with a call in flight, bad configs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.support import ROOT
from tests.support.config import CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply
from tests.support.ports import free_port
from tests.support.provider_replies import chat_completion, openai_chat
from tests.support.proxy_process import proxy_command, wait_serving
from tests.support.records import assert_no_secrets, dec, parse_log


def _env(log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COST_TRACKING_FILE"] = str(log)
    return env


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.signalled = False

    def sigterm(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    async def terminate(self, timeout: float = 15) -> tuple[int, str]:
        """SIGTERM (once) and wait for the exit code and stderr."""
        if not self.signalled:
            self.sigterm()
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None  # communicate() returns once the process exited
        return self.proc.returncode, err.decode()


@pytest.fixture
async def serve(tmp_path):
    procs: list[asyncio.subprocess.Process] = []

    async def start(config: dict) -> Served:
        cfg = tmp_path / "config.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log = tmp_path / "logs" / "cost.jsonl"
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *proxy_command(cfg, port, host="127.0.0.1"),
            cwd=tmp_path,
            env=_env(log),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            serving = await wait_serving(s, f"{url}/health", exited=lambda: proc.returncode is not None)
        if not serving and proc.returncode is not None:
            _, err = await proc.communicate()
            raise AssertionError(f"proxy exited at start-up: {err.decode()}")
        assert serving, "proxy did not start"
        return Served(proc, url, log)

    yield start
    for p in procs:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_serves_a_call_and_logs_it(mock, serve):
    mock.on("/v1/chat/completions", openai_chat(mock))
    served = await serve(make_config(mock.url))
    async with AsyncOpenAI(base_url=f"{served.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        reply = await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.prompt_tokens == 10000
    async with aiohttp.ClientSession() as s, s.get(f"{served.url}/health") as r:
        health = json.loads(await r.read(), parse_float=Decimal)
    assert health["cost_stats_24h"]["requests"] == 1
    assert health["cost_stats_24h"]["total_cost"] == Decimal("0.02")

    code, err = await served.terminate()
    assert code == 0, err
    [rec] = parse_log(served.log.read_text())  # COST_TRACKING_FILE chose the path
    assert rec["model"] == "gpt-4o" and rec["response_model"] == "gpt-4o-2024-08-06"
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"]) == (10000, 8000, 500)
    assert dec(rec["total_cost"]) == Decimal("0.020")
    assert_no_secrets(served.log.read_text())
    assert CLIENT_OPENAI_KEY not in err


async def test_console_prints_one_cost_line_per_call_and_one_unpriced_warning_per_model(mock, serve):
    # The mock answers with the model it was asked for, priced or not.
    mock.on("/v1/chat/completions", json_reply(lambda rec: chat_completion(rec.json["model"])))
    served = await serve(make_config(mock.url))
    async with AsyncOpenAI(base_url=f"{served.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        for model in ("gpt-4o", "my-finetune", "my-finetune", "other-unpriced\n\x1b[31mFAKE LINE", "my-finetune"):
            await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    mock.on("/v1/chat/completions", json_reply({"error": {"message": "nope"}}, status=400))
    async with AsyncOpenAI(base_url=f"{served.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError):  # not billed: $0, whatever the model's price
            await c.chat.completions.create(model="my-finetune", messages=[{"role": "user", "content": "hi"}])
    code, err = await served.terminate()
    assert code == 0, err
    lines = err.splitlines()
    cost_lines = [ln for ln in lines if "💵 Cost Tracking:" in ln]
    assert len(cost_lines) == 6
    assert "openai/gpt-4o " in cost_lines[0] and "Cost: $0.02 " in cost_lines[0] and "in=10000 out=500" in cost_lines[0]
    assert all("Cost: unpriced" in ln for ln in cost_lines[1:5])
    assert "Cost: $0.00 | 400" in cost_lines[5]
    warnings = [ln for ln in lines if "Cost: Not calculated (no pricing configured)" in ln]
    assert len(warnings) == 2  # once per unpriced model, however many calls
    assert any("openai/my-finetune" in ln for ln in warnings) and any("openai/other-unpriced" in ln for ln in warnings)
    # a client-chosen name cannot forge console lines or send terminal escapes
    assert "\x1b" not in err and not any(ln.startswith("FAKE LINE") or ln.startswith("[31m") for ln in lines)


@pytest.mark.parametrize("stream", [False, True])
async def test_sigterm_lets_the_in_flight_call_finish(stream, mock, serve):
    # Non-stream: the reply comes 1 s after the request; stream: 1 s after the first chunk.
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=1.0))
    served = await serve(make_config(mock.url))

    async def call():
        async with AsyncOpenAI(base_url=f"{served.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
            msgs = [{"role": "user", "content": "hi"}]
            if not stream:
                return (await c.chat.completions.create(model="gpt-4o", messages=msgs)).choices[0].message.content
            chunks = [ch async for ch in await c.chat.completions.create(model="gpt-4o", messages=msgs, stream=True)]
            return "".join(ch.choices[0].delta.content or "" for ch in chunks)

    task = asyncio.create_task(call())
    await asyncio.wait_for(mock.received.wait(), 5)
    await asyncio.sleep(0.2)  # the call is now in flight (a stream has sent its first chunk)
    served.sigterm()
    assert await asyncio.wait_for(task, 10) == "Hello!"  # completed, not cut
    code, err = await served.terminate()
    assert code == 0, err
    [rec] = parse_log(served.log.read_text())  # flushed before exit
    assert rec["status"] == 200 and rec["error"] is None and rec["is_streaming"] is stream
    assert dec(rec["total_cost"]) == Decimal("0.020")


BAD_CONFIGS = [
    ({"providers": {"openai": {"base_url": "ftp://example.com"}}}, "providers.openai.base_url"),
    (
        {
            "providers": {
                "openai": {"base_url": "http://127.0.0.1:1", "models": {"gpt-4o": {"pricing": {"input": 2.5, "output": 10, "bogus": 1}}}}
            }
        },
        "providers.openai.models.gpt-4o.pricing.bogus",
    ),
    ({"providers": {"mystery": {"base_url": "http://127.0.0.1:1"}}}, "providers.mystery.type"),
    ({"providers": {"openai": {"base_url": "http://127.0.0.1:1"}}, "server": {"read_timeout": -1}}, "server.read_timeout"),
]


@pytest.mark.parametrize("config,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_malformed_config_exits_naming_file_and_key(config, key, tmp_path):
    cfg = tmp_path / "broken.yml"
    cfg.write_text(json.dumps(config))
    proc = subprocess.run(
        proxy_command(cfg, free_port(), host="127.0.0.1"),
        cwd=tmp_path,
        env=_env(tmp_path / "log.jsonl"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert f"error: {cfg}: {key}: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_that_is_not_yaml_exits_naming_file(tmp_path):
    cfg = tmp_path / "broken.yml"
    cfg.write_text("providers:\n  openai: {base_url: [unclosed\n")
    proc = subprocess.run(
        proxy_command(cfg, free_port()),
        cwd=tmp_path,
        env=_env(tmp_path / "log.jsonl"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert f"error: {cfg}: " in proc.stderr and "YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_sigterm_past_shutdown_timeout_still_records_the_cut_call(mock, serve):
    """A stream longer than server.shutdown_timeout is cut at the deadline, and its
    record (with the error and the usage known so far) still reaches the file."""
    from tests.support.mock_upstream import sse, stream_reply
    from tests.support.provider_replies import anthropic_stream_events

    events = sse(anthropic_stream_events())
    mock.on("/v1/messages", stream_reply(mock, [events[0], 5.0, *events[1:]]))
    served = await serve({**make_config(mock.url), "server": {"shutdown_timeout": 0.5}})
    got = b""

    async def call():
        nonlocal got
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{served.url}/anthropic/v1/messages",
                json={"model": "claude-haiku-4-5", "max_tokens": 5, "stream": True, "messages": []},
                headers={"x-api-key": "sk-ant-test-client-0123456789abcdef"},
            ) as r:
                async for piece in r.content.iter_any():
                    got += piece

    task = asyncio.create_task(call())
    await asyncio.wait_for(mock.received.wait(), 5)
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    code, err = await served.terminate()
    assert time.monotonic() - t0 < 4  # did not wait for the 5 s stream
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    assert got.startswith(events[0]) and b"message_stop" not in got
    assert code == 0, err
    [rec] = parse_log(served.log.read_text())
    assert rec["error"] and rec["is_streaming"] is True
    assert rec["input_tokens"] == 3100  # from message_start
