"""The README's quickstart, every command as written, on a fresh copy of the project.

The tour's commands are read from README.md itself (``sh`` blocks line by line, the
``$ `` lines of ``console`` blocks, the ``python`` SDK examples) and run with bash in a
copy of the project whose config.yml points the providers at the simulated provider
on 127.0.0.1 (`python -m proxy simulate`); the only change to a command is the port (a free one for 9002). Each must
succeed, and where the README shows output, the real output must have its lines: the
same labels in the same order (numbers differ from run to run).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy.web.simulator import SimSettings, loopback_socket, start_simulator
from tests.support.ports import free_port
from tests.support.proxy_process import wait_serving
from tests.support.records import gpt4o_call

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOUR = README[README.index("## Five-minute tour") : README.index("## Documentation")]
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)  # the output the README shows, if any


def tour_steps(text: str = TOUR) -> tuple[list[Step], list[str]]:
    """The shell steps and the python examples of the tour, in order."""
    steps: list[Step] = []
    pythons: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang == "sh":
            joined = re.sub(r"\\\n\s*", " ", body)
            steps += [Step(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        elif lang == "console":
            for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
                command, *output = chunk.rstrip("\n").split("\n")
                steps.append(Step(command, [line for line in output if line.strip()]))
        elif lang == "python":
            pythons.append(body)
    return steps, pythons


def shape(line: str) -> str:
    """What a shown line must keep: its text before the first number or amount, with
    runs of spaces as one (column widths follow the numbers)."""
    line = LOG_PREFIX.sub("", line).strip()
    head = re.split(r"[\d$≥]", line, maxsplit=1)[0]
    return re.sub(r"\s+", " ", head).strip()


def assert_shows(expected: list[str], output: str, command: str) -> None:
    got = [shape(line) for line in output.splitlines()]
    at = 0
    for want in (shape(line) for line in expected):
        if len(want) < 3 or want in ("…", "..."):
            continue
        try:
            at = got.index(want, at) + 1
        except ValueError:
            # Lines may be found out of order only by a pipe's reordering; say what is missing.
            pytest.fail(f"{command!r}: the README shows a line starting {want!r}, not in the output:\n{output}")


def bare_venv_over(real_prefix: Path, where: Path) -> Path:
    """A venv that sees the test run's packages (so serve.sh installs nothing) and is
    marked installed, standing in for the ./.venv the README's setup creates."""
    venv.EnvBuilder(with_pip=False).create(where)
    site = next((where / "lib").glob("python3.*/site-packages"))
    real_site = next((real_prefix / "lib").glob("python3.*/site-packages"))
    (site / "_project.pth").write_text(f"import site; site.addsitedir({str(real_site)!r})\n")
    for extras in ("", "-tokenizer,fast,reports", "-test"):
        (where / f".installed{extras}").touch()
    return where


@pytest.fixture
async def project(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    sock = loopback_socket()
    upstream = await start_simulator(SimSettings(), sock)
    try:
        yield make_project(tmp_path, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        await upstream.cleanup()


def make_project(tmp_path: Path, upstream: str) -> dict[str, Any]:
    """A copy of the project whose providers are the simulated provider at ``upstream``
    (python -m proxy simulate, in-process), with its ./.venv."""
    copy = tmp_path / "llm-proxy"
    for part in ("proxy", "scripts"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "config.yml"):
        shutil.copy2(ROOT / name, copy / name)
    config = (copy / "config.yml").read_text()
    config = re.sub(r"base_url: https://\S+", f"base_url: {upstream}", config)
    (copy / "config.yml").write_text(config)
    bare_venv_over(Path(sys.prefix), copy / ".venv")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("COST_TRACKING_FILE", "LLM_PROXY_VENV", "LLM_PROXY_REEXEC", "VIRTUAL_ENV")}
    env.update(OPENAI_API_KEY="sk-test-openai", ANTHROPIC_API_KEY="sk-ant-test", GEMINI_API_KEY="test-gemini-key")
    return {"dir": copy, "port": port, "env": env}


async def run(command: str, project: dict[str, Any], timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-o",
        "pipefail",
        "-c",
        command,
        cwd=project["dir"],
        env=project["env"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def with_port(command: str, port: int) -> str:
    command = command.replace("9002", str(port))
    if command.startswith("./scripts/serve.sh") and "--port" not in command:
        command += f" --port {port}"
    return command


async def python_examples(examples: list[str], base: str, env: dict[str, str]) -> None:
    """Each example's clients, made as written (base URL on the test's port), each
    making one call through the proxy."""
    for example in examples:
        for chunk in example.split("\n\n"):
            code = chunk.replace("localhost:9002", base)
            ns: dict[str, Any] = {}
            old = dict(os.environ)
            os.environ.update(env)
            try:
                exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (the README's own code)
                client = ns["client"]
                kind = type(client).__module__
                if kind.startswith("openai"):
                    reply: Any = await asyncio.to_thread(
                        client.chat.completions.create, model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
                    )
                    assert reply.usage.total_tokens > 0
                elif kind.startswith("anthropic"):
                    reply = await asyncio.to_thread(
                        client.messages.create, model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
                    )
                    assert reply.usage.input_tokens > 0
                else:
                    reply = await asyncio.to_thread(client.models.generate_content, model="gemini-2.5-flash", contents="Hi")
                    assert reply.usage_metadata.total_token_count > 0
            finally:
                os.environ.clear()
                os.environ.update(old)


async def test_every_quickstart_command_works_as_written(project: dict[str, Any]) -> None:
    steps, pythons = tour_steps()
    assert len(steps) >= 8 and pythons, "the tour lost its commands?"
    port = project["port"]
    server: asyncio.subprocess.Process | None = None
    try:
        for step in steps:
            command = with_port(step.command, port)
            if command.startswith("./scripts/serve.sh") and "--exit" not in command:
                assert server is None, "the tour starts one proxy"
                server = await asyncio.create_subprocess_exec(
                    "bash", "-c", f"exec {command}", cwd=project["dir"], env=project["env"], stderr=asyncio.subprocess.PIPE
                )
                async with aiohttp.ClientSession() as s:
                    ok = await wait_serving(s, f"http://127.0.0.1:{port}/health", exited=lambda: server.returncode is not None, timeout=60)
                assert ok, f"{command} did not start"
                banner = b""
                while banner.count(b"\n") < 1 + len(step.expected) - 1:
                    banner += await asyncio.wait_for(server.stderr.readline(), 10)  # type: ignore[union-attr]
                assert_shows(step.expected, banner.decode(), command)
                await python_examples(pythons, f"127.0.0.1:{port}", project["env"])
                continue
            code, out, err = await run(command, project)
            assert code == 0, f"{command!r} exited {code}:\n{out}\n{err}"
            assert "Traceback" not in err, err
            if step.expected:
                assert_shows(step.expected, out + err, command)
    finally:
        if server is not None and server.returncode is None:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)


def test_the_tour_parser_reads_commands_outputs_and_examples() -> None:
    text = "```sh\na --x \\\n  --y   # c\n# only a comment\n```\n```console\n$ b\nout 1\n\n$ c\n```\n```python\nx = 1\n```\n"
    steps, pythons = tour_steps(text)
    assert [s.command for s in steps] == ["a --x  --y   # c", "b", "c"]
    assert steps[1].expected == ["out 1"] and steps[2].expected == []
    assert pythons == ["x = 1\n"]
    assert shape("2026-12-01 22:59:59,636 INFO   openai  http://x") == "INFO openai http://x"
    assert shape("Total Cost: $12.345678") == "Total Cost:"


async def test_the_guides_cron_line_works_as_written(project: dict[str, Any], tmp_path: Path) -> None:
    """cron: a bare environment (PATH=/usr/bin:/bin plus where `python` is), a `python`
    without the dependencies, the working directory not the project: the mail gets the
    guide's summary."""
    [line] = [x for x in README.splitlines() if x.startswith("0 9 * * * cd /path/to/llm-proxy")]
    command = line.split(" ", 5)[5].replace("/path/to/llm-proxy", str(project["dir"]))
    log = project["dir"] / "logs" / "cost-tracking.jsonl"
    log.parent.mkdir(exist_ok=True)
    calls = [gpt4o_call(time.time() - 600 + i) for i in range(3)]
    log.write_text("".join(json.dumps(c) + "\n" for c in calls))
    bin_dir = tmp_path / "bin"
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(bare / "bin" / "python")
    mailbox = tmp_path / "mailbox"
    mail = bin_dir / "mail"
    mail.write_text(f'#!/bin/sh\necho "$@" > {mailbox}.args\ncat > {mailbox}\n')
    mail.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh", "LOGNAME": "cron"}
    proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", command, cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert (tmp_path / "mailbox.args").read_text().split() == ["-s", "Daily", "LLM", "Costs", "admin@company.com"]
    body = mailbox.read_text()
    assert "LLM PROXY COST ANALYSIS SUMMARY" in body and "Total Requests: 3" in body, body + err.decode()
