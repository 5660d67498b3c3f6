"""``python -m proxy serve`` as a real process, from start to stop: a start-up that fails
says so on one line (exit 2), the banner's URLs work with the official SDK, forward-only
mode says it writes no log (and writes none), a draining shutdown says how many calls it
waits for; and the model names users type (snapshots, the shipped aliases) are priced."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner
from openai import AsyncOpenAI

from proxy.cli.app import cli
from tests.support import ROOT
from tests.support.config import CLIENT_OPENAI_KEY, OPENAI_MODELS, PROXY_OPENAI_KEY
from tests.support.mock_upstream import json_reply
from tests.support.provider_replies import GPT4O_USAGE, chat_completion, openai_chat
from tests.support.proxy_process import wait_serving
from tests.support.records import dec, parse_log

SHIPPED = ROOT / "config.yml"
RAW = yaml.safe_load(SHIPPED.read_text())
LOG_LINE = re.compile(r"^\S+ \S+ [A-Z]+ (.*)$")  # logging's "date time LEVEL message"
MILLION = Decimal(1_000_000)


def env(log: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["COST_TRACKING_FILE"] = str(log)
    return e


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def argv(config: Path, port: int, log: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--log-file", str(log)]


def run_failing(tmp_path: Path, config: Path, port: int = 0, log: Path | None = None) -> str:
    """Run serve expecting a start-up failure: exit 2, exactly one line on stderr, an
    ``error:`` line, no traceback. Returns the line."""
    log = log or tmp_path / "logs" / "cost.jsonl"
    proc = subprocess.run(argv(config, port, log), cwd=tmp_path, env=env(log), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- a malformed config ----------------------------------------------------------------------

UPSTREAM = {"base_url": "http://127.0.0.1:1"}
TYPOS = [
    ({"alises": {"gpt4": "gpt-4o"}, "providers": {"openai": UPSTREAM}}, "alises", "aliases"),
    ({"providers": {"openai": {**UPSTREAM, "api_kye": PROXY_OPENAI_KEY}}}, "providers.openai.api_kye", "api_key"),
    ({"providers": {"openai": UPSTREAM}, "server": {"read_timout": 5}}, "server.read_timout", "read_timeout"),
    ({"providers": {"openai": UPSTREAM}, "features": {"cost_trackin": {"enabled": False}}}, "features.cost_trackin", "cost_tracking"),
]


@pytest.mark.parametrize("config,key,known", TYPOS, ids=[t[1] for t in TYPOS])
def test_a_misspelt_key_stops_start_up_on_one_line(tmp_path: Path, config: dict, key: str, known: str) -> None:
    path = write_config(tmp_path, config, "bad.yml")
    line = run_failing(tmp_path, path)
    assert line == f"error: {path}: {key}: unknown key; did you mean '{known}'?"
    assert PROXY_OPENAI_KEY not in line
    assert not (tmp_path / "logs").exists()


# --- other start-up failures -----------------------------------------------------------------


def test_a_port_in_use_says_which_and_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = run_failing(tmp_path, write_config(tmp_path, {"providers": {"openai": UPSTREAM}}), port)
    assert line == f"error: port {port} on 127.0.0.1 is in use (another proxy running?): stop it or pass --port N"
    assert not (tmp_path / "logs").exists()


def test_a_log_path_under_a_regular_file_names_the_path(tmp_path: Path) -> None:
    # A file where a directory should be stops root too (ENOTDIR), unlike chmod.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory\n")
    log = blocker / "log.jsonl"
    line = run_failing(tmp_path, write_config(tmp_path, {"providers": {"openai": UPSTREAM}}), log=log)
    assert line == f"error: cannot open the cost log {log}: {blocker} is a file, not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_log_directory_without_write_permission_names_the_path(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        log = locked / "cost.jsonl"
        line = run_failing(tmp_path, write_config(tmp_path, {"providers": {"openai": UPSTREAM}}), log=log)
    finally:
        locked.chmod(stat.S_IRWXU)
    assert line.startswith(f"error: cannot open the cost log {log}: ") and "ermission denied" in line


@pytest.mark.parametrize("what", ["a directory", "bad YAML", "not a keys file"])
def test_an_unreadable_keys_file_is_one_line(tmp_path: Path, what: str) -> None:
    keys = tmp_path / "keys.yml"
    if what == "a directory":
        keys.mkdir()
    elif what == "bad YAML":
        keys.write_text("keys: [unclosed\n")
    else:
        keys.write_text("keys: 42\n")
    config = write_config(tmp_path, {"providers": {"openai": {**UPSTREAM, "api_key": PROXY_OPENAI_KEY}}, "auth": {"keys_file": str(keys)}})
    line = run_failing(tmp_path, config)
    assert line.startswith(f"error: keys file {keys} (auth.keys_file in {config}): ")
    assert PROXY_OPENAI_KEY not in line


# --- the proxy serving ---------------------------------------------------------------------


class Serving:
    """The proxy process after its banner: its URL, the banner's messages, and the rest
    of stderr read as it comes (the pipe never fills)."""

    def __init__(self, proc: asyncio.subprocess.Process, banner: list[str], log: Path) -> None:
        self.proc, self.banner, self.log = proc, banner, log
        self.url = re.fullmatch(r"llm-cost-proxy on (\S+?)(,| ).*", banner[0]).group(1)  # type: ignore[union-attr]
        self.lines: list[str] = []
        self.signalled = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode().rstrip("\n"))

    def provider_url(self, name: str) -> str:
        for line in self.banner[1:]:
            m = re.fullmatch(rf"  {re.escape(name)} +(\S+) -> .*", line)
            if m:
                return m.group(1)
        raise AssertionError(f"{name} not in the banner: {self.banner}")

    def messages(self) -> list[str]:
        return [m.group(1) for m in map(LOG_LINE.match, self.lines) if m]

    async def wait_for(self, text: str, timeout: float = 10) -> None:
        async def poll() -> None:
            while not any(text in m for m in self.messages()):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)

    def sigterm(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        """SIGTERM (once) and the exit status."""
        if not self.signalled:
            self.sigterm()
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await asyncio.wait_for(self.reader, 5)
        return code


@pytest.fixture
async def serve(tmp_path: Path):
    started: list[Serving] = []

    async def start(config: dict[str, Any]) -> Serving:
        path = write_config(tmp_path, config)
        log = tmp_path / "logs" / "cost.jsonl"
        proc = await asyncio.create_subprocess_exec(
            *argv(path, 0, log), cwd=tmp_path, env=env(log), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        banner: list[str] = []
        while len(banner) < 1 + len(config["providers"]):
            raw = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert raw, f"proxy exited at start-up: {banner}"
            m = LOG_LINE.match(raw.decode().rstrip("\n"))
            if m and (banner or m.group(1).startswith("llm-cost-proxy on ")):
                banner.append(m.group(1))
        served = Serving(proc, banner, log)
        started.append(served)
        # The banner comes before the server handles signals: wait until it serves.
        async with aiohttp.ClientSession() as http:
            assert await wait_serving(http, f"{served.url}/health", exited=lambda: proc.returncode is not None)
        return served

    yield start
    for s in started:
        if s.proc.returncode is None:
            s.proc.kill()
            await s.proc.wait()


async def test_the_banner_urls_work_with_the_openai_sdk(mock, serve) -> None:
    """A provider whose base_url ends in /v1 (Ollama, vLLM) is announced without a
    second /v1; one without it gets /v1. Both URLs, given to the SDK as they are, answer."""
    mock.on("/v1/chat/completions", openai_chat(mock))
    served = await serve(
        {
            "catalog": {"enabled": False},
            "providers": {
                "local": {"type": "openai", "base_url": mock.url + "/v1", "models": OPENAI_MODELS},
                "openai": {"base_url": mock.url, "models": OPENAI_MODELS},
            },
        }
    )
    assert served.banner[0] == f"llm-cost-proxy on {served.url}, logging to {served.log}"
    assert served.provider_url("local") == f"{served.url}/local"
    assert served.provider_url("openai") == f"{served.url}/openai/v1"
    for name in ("local", "openai"):
        async with AsyncOpenAI(base_url=served.provider_url(name), api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
            raw = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert raw.http_response.status_code == 200 and raw.parse().usage.prompt_tokens == GPT4O_USAGE["prompt_tokens"]
    assert [r.path for r in mock.requests] == ["/v1/chat/completions"] * 2  # never /v1/v1
    assert await served.stop() == 0
    records = parse_log(served.log.read_text())
    assert [r["provider"] for r in records] == ["local", "openai"]
    assert all(r["status"] == 200 and dec(r["total_cost"]) for r in records)


async def test_cost_tracking_off_says_no_log_is_written_and_writes_none(mock, serve, tmp_path: Path) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock))
    served = await serve({"features": {"cost_tracking": {"enabled": False}}, "providers": {"openai": {"base_url": mock.url}}})
    assert served.banner[0] == f"llm-cost-proxy on {served.url} (cost tracking off: no log is written)"
    async with AsyncOpenAI(base_url=served.provider_url("openai"), api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        reply = await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello!"
    assert await served.stop() == 0
    assert not served.log.exists() and not served.log.parent.exists()
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".jsonl", ".gz", ".idx")] == []


async def test_sigterm_says_how_many_calls_it_waits_for(mock, serve) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=1.5))  # each reply 1.5 s late
    served = await serve(
        {
            "catalog": {"enabled": False},
            "server": {"shutdown_timeout": 20},
            "providers": {"openai": {"base_url": mock.url, "models": OPENAI_MODELS}},
        }
    )

    async def call() -> str | None:
        async with AsyncOpenAI(base_url=served.provider_url("openai"), api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
            reply = await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        return reply.choices[0].message.content

    calls = [asyncio.create_task(call()) for _ in range(3)]

    async def all_upstream() -> None:
        while len(mock.requests) < 3:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(all_upstream(), 15)
    served.sigterm()
    await served.wait_for("shutting down:")
    assert "shutting down: waiting up to 20 s for 3 calls in flight" in served.messages()
    assert await asyncio.wait_for(asyncio.gather(*calls), 15) == ["Hello!"] * 3  # they finished
    assert await served.stop() == 0
    assert len(parse_log(served.log.read_text())) == 3


async def test_sigterm_with_nothing_in_flight_says_so(mock, serve) -> None:
    served = await serve({"providers": {"openai": {"base_url": mock.url}}})
    assert await served.stop() == 0
    assert "shutting down: no calls in flight" in served.messages()


# --- the names users type are priced ---------------------------------------------------------

NAMES = ["claude-3-5-sonnet-20241022", "claude-3-haiku-20240307", "gpt-4o-2024-11-20", "gpt-4o-mini-2024-07-18"]
ALIASES = ["claude-sonnet-3.5", "claude-haiku-3", "gpt4o", "gpt4mini"]


def test_the_shipped_aliases_are_there() -> None:
    assert set(ALIASES) <= set(RAW["aliases"])


@pytest.mark.parametrize("name", NAMES + ALIASES)
def test_pricing_show_prices_every_name_from_config_yml(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli, ["pricing", "show", name, "--config", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    # The target the YAML maps the alias to (snapshots: the name without its date).
    target = RAW["aliases"].get(name) or re.sub(r"-(\d{4}-\d{2}-\d{2}|\d{8})$", "", name)
    provider = next(p for p, spec in RAW["providers"].items() if target in (spec.get("models") or {}))
    header = result.output.splitlines()[0]
    assert header.startswith(f"{name} ({provider}) -> {target}, from the config.yml"), result.output
    rates = RAW["providers"][provider]["models"][target]["pricing"]
    row = next(ln for ln in result.output.splitlines() if ln.strip().startswith("always"))
    assert Decimal(row.split()[1]) == Decimal(str(rates["input"]))


async def test_a_call_naming_an_alias_is_priced_as_its_target(mock, start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gpt4mini`` goes upstream as sent (an alias only prices); the reply that names it
    back is priced at config.yml's gpt-4o-mini rates."""
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    shipped = yaml.safe_load(SHIPPED.read_text())
    for spec in shipped["providers"].values():
        spec["base_url"] = mock.url
    shipped["catalog"] = {"enabled": False}
    mock.on("/v1/chat/completions", json_reply(lambda rec: chat_completion(rec.json["model"], GPT4O_USAGE)))
    proxy = await start_proxy(shipped)
    async with AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        await c.chat.completions.create(model="gpt4mini", messages=[{"role": "user", "content": "hi"}])
    assert mock.requests[0].json["model"] == "gpt4mini"
    [rec] = await proxy.records()
    rates = {k: Decimal(str(v)) for k, v in RAW["providers"]["openai"]["models"]["gpt-4o-mini"]["pricing"].items()}
    usage: dict[str, Any] = GPT4O_USAGE
    inp, cached, out = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"]
    want = ((inp - cached) * rates["input"] + cached * rates["cached_input"] + out * rates["output"]) / MILLION
    assert rec["model"] == "gpt4mini" and rec["pricing_source"] == "config"
    assert rec["total_cost"] is not None and dec(rec["total_cost"]) == want
