"""The report's output file and header, as a user's script meets them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.analyze_cli import make_records, run
from tests.support.synthlog import write_log


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "cost-tracking.jsonl", make_records(300, seed=5, days=3))


@pytest.mark.parametrize(
    "bad",
    [
        ["--since", "bogus"],
        ["--tz", "Mars/Olympus"],
        ["--group-by", "colour"],
        ["--tag", "no-equals-sign"],
        ["--status", "teapot"],
        ["--start-date", "2026-11-20", "--since", "7d"],
    ],
)
def test_a_mistake_leaves_the_output_file_as_it_was(tmp_path: Path, log: Path, bad: list[str]) -> None:
    # A nightly job writing costs.csv must not lose yesterday's file to a typo.
    out = tmp_path / "costs.csv"
    out.write_text("yesterday's report\n")
    p = run("--log-file", str(log), "--format", "csv", "-o", str(out), *bad, ok=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ")
    assert out.read_text() == "yesterday's report\n"


def test_a_missing_log_leaves_the_output_file_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "costs.csv"
    out.write_text("yesterday's report\n")
    p = run("--log-file", str(tmp_path / "nope.jsonl"), "-o", str(out), ok=False)
    assert p.returncode == 2 and "no log found" in p.stderr
    assert out.read_text() == "yesterday's report\n"


def test_the_filters_line_names_each_value_plainly(log: Path) -> None:
    p = run("--log-file", str(log), "--since", "all", "--status", "4xx", "--status", "ok", "--provider", "openai")
    [line] = [ln for ln in p.stdout.splitlines() if ln.startswith("Filters: ")]
    assert line == "Filters: provider=openai  status=4xx,ok"


def test_a_suggestion_prices_cache_reads_by_the_family_rule(tmp_path: Path) -> None:
    """An Anthropic model priced without cached_input: a cache read bills at 0.1 x input
    (docs/providers.md §6.2, pricing.cache_read_rate), so caching long prompts saves
    money and the tip says how much. The suggestion used to take the input rate instead
    and left the saving out."""
    recs = [
        {
            "schema_version": 1,
            "timestamp": f"2026-11-23T10:{i:02d}:00.000Z",
            "record_id": f"r-{i}",
            "provider": "anthropic",
            "provider_type": "anthropic",
            "model": "claude-sonnet-4-5",
            "response_model": "claude-sonnet-4-5-20250929",
            "input_tokens": 10_000,
            "output_tokens": 500,
            "total_tokens": 10_500,
            "cache_read_tokens": 0,
            "total_cost": 0.0375,
            "input_cost": 0.03,
            "output_cost": 0.0075,
            "status": 200,
        }
        for i in range(30)
    ]
    write_log(tmp_path / "cost.jsonl", recs)
    (tmp_path / "config.yml").write_text(
        "catalog: {enabled: false}\n"
        "providers:\n  anthropic:\n    base_url: https://api.anthropic.com\n"
        "    models:\n      claude-sonnet-4-5: {pricing: {input: 3.00, output: 15.00}}\n"
    )
    p = run("--log-file", str(tmp_path / "cost.jsonl"), "--config", str(tmp_path / "config.yml"), "--since", "all", "--suggest")
    [tip] = [ln for ln in p.stdout.splitlines() if "calls sent prompts of" in ln]
    # 300,000 input tokens, none cached; 10% cached saves 30,000 x (3.00 - 0.30) / 1M.
    assert "(each 10% of it cached saves about $0.0810)" in tip, tip
