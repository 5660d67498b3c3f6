"""``--output`` never overwrites a log the command is reading: opening it for writing
would truncate the very records being reported (before this, `report --output
logs/cost-tracking.jsonl` left an empty log and exit status 0)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxy.cli.app import cli
from tests.support.records import gpt4o_call


@pytest.mark.parametrize("fmt", ["summary", "csv", "json", "detailed"])
def test_report_over_its_own_log_or_a_rotated_sibling_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log, rotated = logs / "cost-tracking.jsonl", logs / "cost-tracking.jsonl.1"
    log.write_text("".join(json.dumps(gpt4o_call(time.time() - 60 + i)) + "\n" for i in range(3)))
    rotated.write_text(json.dumps(gpt4o_call(time.time() - 7200)) + "\n")
    before = {p: p.read_bytes() for p in (log, rotated)}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COST_TRACKING_FILE", raising=False)
    for output in ("logs/cost-tracking.jsonl", str(log), "logs/cost-tracking.jsonl.1"):
        res = CliRunner().invoke(cli, ["report", "--format", fmt, "--output", output], catch_exceptions=False)
        assert res.exit_code == 2 and res.stderr.startswith("error: --output:") and "erase" in res.stderr, res.stderr
        assert {p: p.read_bytes() for p in before} == before
    # Any other file is written as asked.
    ok = CliRunner().invoke(cli, ["report", "--format", fmt, "--output", "report.out"], catch_exceptions=False)
    assert ok.exit_code == 0 and (tmp_path / "report.out").stat().st_size > 0


def test_export_to_a_name_read_as_a_rotated_part_of_the_log_is_refused(tmp_path: Path) -> None:
    # cost.jsonl.1 next to cost.jsonl is read with it: an export there double-counts every call.
    log = tmp_path / "cost.jsonl"
    log.write_text("".join(json.dumps(gpt4o_call(time.time() - 60 + i)) + "\n" for i in range(3)))
    for name in ("cost.jsonl.1", "cost.jsonl-20261101"):
        res = CliRunner().invoke(cli, ["export", "--log-file", str(log), "--format", "jsonl", "--output", str(tmp_path / name)])
        assert res.exit_code == 2 and "rotated part" in res.stderr, res.stderr
        assert not (tmp_path / name).exists()
    report = CliRunner().invoke(cli, ["report", "--log-file", str(log), "--format", "json", "--since", "all"], catch_exceptions=False)
    assert json.loads(report.stdout)["totals"]["requests"] == 3
    ok = CliRunner().invoke(cli, ["export", "--log-file", str(log), "--format", "jsonl", "--output", str(tmp_path / "costs-export.jsonl")])
    assert ok.exit_code == 0 and len((tmp_path / "costs-export.jsonl").read_text().splitlines()) == 3
