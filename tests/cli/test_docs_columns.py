"""The CSV columns the docs list are the ones the commands write (the README's list
once lacked four of them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from proxy.cli.app import cli
from tests.support import ROOT
from tests.support.records import gpt4o_call


def documented_headers(doc: str) -> set[str]:
    return {line.strip() for line in (ROOT / "docs" / doc).read_text().splitlines() if line.startswith("time_utc,")}


def test_documented_per_request_columns_are_the_written_ones(tmp_path: Path) -> None:
    log = tmp_path / "cost.jsonl"
    log.write_text(json.dumps(gpt4o_call(time.time() - 60)) + "\n")
    written = set()
    for args in (["report", "--format", "csv", "--since", "all"], ["export", "--format", "csv"]):
        res = CliRunner().invoke(cli, [*args, "--log-file", str(log), "--output", "-"], catch_exceptions=False)
        assert res.exit_code == 0, res.stderr
        written.add(res.stdout.splitlines()[0].strip())
    assert len(written) == 1  # report and export write the same columns
    for doc in ("reports.md", "commands.md"):
        assert documented_headers(doc) == written, doc
