"""``python -m proxy log``: a call made outside the proxy, recorded like one made through
it, priced from config.yml, and counted by ``report`` and ``budgets``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli.app import cli
from proxy.config import Config
from proxy.core.attribution import TAG_NAME, clean_value
from proxy.errors import UsageError
from proxy.manual import manual_record, parse_metadata
from proxy.storage.append import append_line
from proxy.storage.logwriter import JsonlWriter
from tests.support import ROOT
from tests.support.records import gpt4o_call

M = Decimal(1_000_000)
# USD per 1M tokens, set here and written into the test's config.yml.
GPT4O = {"input": Decimal("2.5"), "output": Decimal("10"), "cached_input": Decimal("1.25")}
HAIKU = {"input": Decimal("1"), "output": Decimal("5")}
CONFIG = f"""
catalog: {{enabled: false}}
aliases: {{gpt4o: gpt-4o}}
providers:
  openai:
    base_url: "http://127.0.0.1:1"
    models: {{gpt-4o: {{pricing: {{input: {GPT4O["input"]}, output: {GPT4O["output"]}, cached_input: {GPT4O["cached_input"]}}}}}}}
  work-claude:
    type: anthropic
    base_url: "http://127.0.0.1:1"
    models: {{claude-haiku-4-5: {{pricing: {{input: {HAIKU["input"]}, output: {HAIKU["output"]}}}}}}}
budgets:
  limits:
    - {{scope: global, period: daily, usd: 5}}
"""


def gpt4o_cost(inp: int, out: int, cached: int = 0) -> Decimal:
    return ((inp - cached) * GPT4O["input"] + cached * GPT4O["cached_input"] + out * GPT4O["output"]) / M


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    cfg = tmp_path / "config.yml"
    cfg.write_text(CONFIG)
    return cfg, tmp_path / "logs" / "cost.jsonl"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in log.read_text().splitlines()]


def test_logged_call_is_priced_and_counted_by_report_and_budgets(setup: tuple[Path, Path]) -> None:
    cfg, log = setup
    existing = gpt4o_call(time.time() - 60)  # a call the proxy wrote before
    log.parent.mkdir()
    log.write_text(json.dumps(existing) + "\n")
    common = ["--config", str(cfg), "--log-file", str(log)]
    res = invoke(
        "log", "--model", "gpt4o", "--input-tokens", "1500", "--cached-tokens", "1000", "--output-tokens", "750",
        "--category", "planning", "--description", "Q1 strategy", "--user", "john@example.com",
        "--metadata", '{"project": "CoreReceptionAI", "n": 3}', *common,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    expected = gpt4o_cost(1500, 750, cached=1000)
    assert res.stdout.count("\n") == 1
    assert f"${expected}" in res.stdout and "openai/gpt-4o" in res.stdout and "config" in res.stdout
    old, rec = records(log)
    assert old == json.loads(json.dumps(existing), parse_float=Decimal)  # appended, nothing rewritten
    assert rec["schema_version"] == 2 and rec["usage_source"] == "manual" and rec["endpoint"] is None
    assert (rec["provider"], rec["provider_type"], rec["model"]) == ("openai", "openai", "gpt-4o")  # alias resolved
    assert (rec["input_tokens"], rec["cache_read_tokens"], rec["output_tokens"], rec["total_tokens"]) == (1500, 1000, 750, 2250)
    assert rec["total_cost"] == expected and rec["input_cost"] + rec["output_cost"] == expected
    assert rec["pricing_source"] == "config" and rec["user_id"] == "john@example.com"
    assert rec["tags"] == {"category": "planning", "description": "Q1 strategy", "project": "CoreReceptionAI", "n": "3"}

    report = invoke("report", "--since", "all", "--format", "json", "--tag", "category=planning", *common)
    assert report.exit_code == 0, report.output
    totals = json.loads(report.stdout, parse_float=Decimal)["totals"]
    assert totals["requests"] == 1 and totals["total_cost"] == expected
    everything = json.loads(invoke("report", "--since", "all", "--format", "json", *common).stdout, parse_float=Decimal)
    assert everything["totals"]["total_cost"] == expected + Decimal(str(existing["total_cost"]))

    budgets = invoke("budgets", "--json", *common)
    assert budgets.exit_code == 0, budgets.output
    (row,) = [json.loads(line, parse_float=Decimal) for line in budgets.stdout.splitlines()]
    assert row["spent_usd"] == expected + Decimal(str(existing["total_cost"]))


def test_real_process_log_then_report(setup: tuple[Path, Path]) -> None:
    cfg, log = setup
    env = {k: v for k, v in os.environ.items() if k != "COST_TRACKING_FILE"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    p = run(
        "log",
        "--model",
        "claude-haiku-4-5",
        "--input-tokens",
        "12000",
        "--output-tokens",
        "400",
        "--config",
        str(cfg),
        "--log-file",
        str(log),
    )
    assert p.returncode == 0, p.stderr
    expected = (12000 * HAIKU["input"] + 400 * HAIKU["output"]) / M
    # Priced under the configured anthropic provider, which is what the record names.
    assert "work-claude/claude-haiku-4-5" in p.stdout and f"${expected}" in p.stdout
    r = run("report", "--log-file", str(log), "--config", str(cfg), "--since", "all", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout, parse_float=Decimal)
    assert doc["totals"]["total_cost"] == expected and doc["totals"]["requests"] == 1
    assert doc["by_model"][0]["provider"] == "work-claude" and doc["by_model"][0]["model"] == "claude-haiku-4-5"


def test_provider_choice_and_unpriced_model(setup: tuple[Path, Path]) -> None:
    cfg, log = setup
    common = ["--config", str(cfg), "--log-file", str(log), "--json"]
    # Not priced in the config: the family from the name, a configured provider of it.
    res = invoke("log", "--model", "claude-opus-9", "--input-tokens", "10", "--output-tokens", "5", *common)
    assert res.exit_code == 0
    rec = json.loads(res.stdout)
    assert (rec["provider"], rec["provider_type"], rec["total_cost"]) == ("work-claude", "anthropic", None)
    assert "warning: no price for claude-opus-9" in res.stderr
    res = invoke("log", "--model", "gemini-9-pro", "--input-tokens", "10", "--output-tokens", "5", *common)
    assert json.loads(res.stdout)["provider"] == "gemini"  # no gemini provider configured: the family's name
    res = invoke("log", "--model", "gpt-4o", "--provider", "azure", "--input-tokens", "10", "--output-tokens", "5", *common)
    rec = json.loads(res.stdout)
    assert (rec["provider"], rec["provider_type"], rec["total_cost"]) == ("azure", "openai", None)  # as given: its own prices
    assert len(records(log)) == 3  # unpriced calls are recorded too, as the proxy records them


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-tokens", "-1", "--output-tokens", "5"], "--input-tokens"),
        (["--input-tokens", "1.5", "--output-tokens", "5"], "--input-tokens"),
        (["--input-tokens", "10", "--output-tokens", "5", "--cached-tokens", "11"], "--cached-tokens"),
        (["--input-tokens", "10", "--output-tokens", "5", "--metadata", "[1, 2]"], "--metadata"),
        (["--input-tokens", "10", "--output-tokens", "5", "--metadata", "{not json"], "--metadata"),
        (["--input-tokens", "10", "--output-tokens", "5", "--metadata", '{"team": "x"}'], "field of the record"),
        (["--input-tokens", "10", "--output-tokens", "5", "--category", "a", "--metadata", '{"category": "b"}'], "--category"),
        # Counts past any real call (a cost readers would reject as corrupt, or past 64 bits).
        (["--input-tokens", "999999999999999999", "--output-tokens", "1"], "--input-tokens"),
        (["--input-tokens", "10", "--output-tokens", "99999999999999999999999"], "--output-tokens"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(setup: tuple[Path, Path], args: list[str], message: str) -> None:
    cfg, log = setup
    res = invoke("log", "--model", "gpt-4o", *args, "--config", str(cfg), "--log-file", str(log))
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and message in res.stderr and res.stderr.count("\n") == 1
    assert not log.exists()


def test_append_beside_a_running_writer_keeps_every_line_whole(tmp_path: Path) -> None:
    log = tmp_path / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    config = Config(path="(none)", providers={}, catalog=False)
    pad = "x" * 3000  # lines longer than a pipe buffer's atomic size, to give a tear a chance

    def proxy_side() -> None:
        for i in range(300):
            writer.write(orjson.dumps({"who": "proxy", "i": i, "pad": pad}) + b"\n")

    t = threading.Thread(target=proxy_side)
    t.start()
    for i in range(100):
        rec, _ = manual_record(config, model="gpt-4o", input_tokens=i, output_tokens=1, tags={"i": str(i), "pad": pad[:100]})
        append_line(log, orjson.dumps(rec) + b"\n")
    t.join()
    writer.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(1 for r in lines if r.get("who") == "proxy") == 300
    assert sorted(r["input_tokens"] for r in lines if r.get("usage_source") == "manual") == list(range(100))


# --- --metadata parsing -------------------------------------------------------------------

scalars = st.one_of(st.text(max_size=40), st.integers(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.none())
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.from_regex(TAG_NAME, fullmatch=True), scalars, max_size=8)))
def test_metadata_is_an_object_of_scalars_kept_as_clean_string_tags(value: Any) -> None:
    text = json.dumps(value)
    try:
        tags = parse_metadata(text)
    except UsageError as e:
        assert "\n" not in str(e)
        valid = (
            isinstance(value, dict)
            and all(TAG_NAME.fullmatch(k.strip().lower()) for k in value)
            and not any(k.strip().lower() in ("team", "session", "session_id") for k in value)
            and len({k.strip().lower() for k in value}) == len(value)
            and not any(isinstance(v, (dict, list)) for v in value.values())
        )
        assert not valid, (value, e)
        return
    assert isinstance(value, dict)
    want = {}
    for k, v in value.items():
        if v is not None:
            cleaned = clean_value(v if isinstance(v, str) else json.dumps(v))  # json.dumps: the text the test wrote
            if cleaned is not None:
                want[k.strip().lower()] = cleaned
    assert tags == want
    # Whatever the metadata says, the record's own fields are its own.
    config = Config(path="(none)", providers={}, catalog=False)
    plain, _ = manual_record(config, model="gpt-4o", input_tokens=5, output_tokens=1, now=1.8e9)
    tagged, _ = manual_record(config, model="gpt-4o", input_tokens=5, output_tokens=1, now=1.8e9, tags=tags)
    for k in plain:
        if k not in ("record_id", "tags"):
            assert tagged[k] == plain[k], k


def test_a_key_pasted_into_a_description_or_metadata_never_reaches_the_log(setup: tuple[Path, Path]) -> None:
    cfg, log = setup
    secret = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX1234"
    res = invoke(
        "log", "--model", "gpt-4o", "--input-tokens", "10", "--output-tokens", "5", "--description", f"rotated {secret} today",
        "--metadata", json.dumps({"note": secret}), "--config", str(cfg), "--log-file", str(log),
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    text = log.read_text()
    assert secret not in text and secret not in res.stdout and "[redacted]" in text
