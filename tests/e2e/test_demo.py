"""``python -m proxy demo`` and ``python -m proxy simulate`` as real subprocesses: the
demo's calls reach its own log, mixed and priced, and its summary says what the log
holds; the official SDKs get completions with usage from the simulator alone."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from proxy.core.money import format_usd

ROOT = Path(__file__).resolve().parents[2]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_demo_sends_mixed_calls_to_its_own_log_and_reports_them(tmp_path: Path) -> None:
    log = tmp_path / "demo.jsonl"
    done = run_demo("--exit", "--port", "0", "--calls", "60", "--log-file", str(log))
    assert done.returncode == 0, done.stderr
    assert "Cost Tracking" not in done.stderr  # the summary is not buried under a line per call
    records = [json.loads(line, parse_float=Decimal) for line in log.read_text().splitlines()]
    assert len(records) == 60
    assert {r["provider"] for r in records} == {"openai", "anthropic", "gemini"}
    assert len({r["user_id"] for r in records}) >= 3 and any(r["tags"].get("feature") for r in records)
    ok = [r for r in records if r["status"] == 200]
    assert all(r["usage_source"] == "provider" and r["total_cost"] > 0 for r in ok if r["endpoint"] != "/openai/v1/embeddings")
    assert any(r["is_streaming"] for r in ok) and any(r["cache_read_tokens"] for r in ok)
    assert any(r["cache_write_tokens"] for r in ok) and any(r["reasoning_tokens"] for r in ok)
    errors = [r for r in records if r["status"] >= 400]
    assert errors and {r["status"] for r in errors} <= {429, 500}
    # The summary is the log's: its count, its errors and its total.
    total = sum((r["total_cost"] for r in records if r["total_cost"] is not None), Decimal(0))
    assert total > 0
    assert f"logged 60 calls to {log}" in done.stdout and f"{len(errors)} errors" in done.stdout
    assert f"total cost {format_usd(total)} at config.yml's prices" in done.stdout
    assert f"python -m proxy report --log-file {log} --all" in done.stdout
    assert "Ctrl-C" not in done.stdout  # --exit: nothing left serving


def test_demo_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = run_demo("--exit", "--port", str(port), "--calls", "5", "--log-file", str(tmp_path / "d.jsonl"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: port ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "d.jsonl").exists()


@pytest.fixture
def simulator() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "simulate", "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        m = re.match(r"simulated provider on (http://127\.0\.0\.1:\d+)$", first.strip())
        assert m, first
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_official_sdks_against_the_simulator_alone(simulator: str) -> None:
    client = openai.OpenAI(base_url=f"{simulator}/v1", api_key="any-key", max_retries=0)
    reply = client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "Hello there"}], max_tokens=200)
    assert reply.model == "o4-mini-2025-04-16" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 200
    assert reply.usage.completion_tokens_details is not None and reply.usage.completion_tokens_details.reasoning_tokens
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    claude = anthropic.Anthropic(base_url=simulator, api_key="any-key", max_retries=0)
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]) as stream:
        message = stream.get_final_message()
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 100 and message.content[0].text  # type: ignore[union-attr]


def test_demo_verbose_prints_each_calls_cost_line(tmp_path: Path) -> None:
    done = run_demo("--exit", "--port", "0", "--calls", "12", "--verbose", "--log-file", str(tmp_path / "demo.jsonl"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("💵 Cost Tracking:") == 12
