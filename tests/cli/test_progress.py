"""A progress bar on stderr while a report or a reprice reads the log: drawn when stderr
is a terminal (a real pty here), absent when it is a pipe; never in the output itself."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.analyze_cli import CONFIG, NOW, SCRIPT, make_records
from tests.support.ptys import run_on_pty
from tests.support.synthlog import write_log


def run_with_tty_stderr(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``argv`` with stderr on a pty and stdout a pipe: (status, stdout, what the terminal got)."""
    code, terminal, out = run_on_pty(argv, cwd, tty="stderr")
    return code, out, terminal


def run_piped(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANALYZE_COSTS_NOW": NOW.isoformat()}
    env.pop("COST_TRACKING_FILE", None)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log past the size at which a scan is cut into byte ranges (24 MiB; ranges of
    32 MiB), so the bar moves per finished range, written by repeating one generated day."""
    d = tmp_path_factory.mktemp("progress")
    log = write_log(d / "cost.jsonl", make_records(2000, seed=4, days=1))
    block = log.read_bytes()
    assert block.count(b'"request_id":"req-') == 2000
    with log.open("ab") as f:
        copy = 0
        while f.tell() < 48 << 20:
            copy += 1  # each copy's calls get their own ids, so none is a repeat to skip
            f.write(block.replace(b'"request_id":"req-', b'"request_id":"copy%d-' % copy))
    return log


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_report_draws_a_bar_on_a_terminal_and_none_on_a_pipe(big_log: Path, jobs: str) -> None:
    argv = [sys.executable, str(SCRIPT), "--log-file", str(big_log), "--since", "all", "--no-index", "-j", jobs]
    code, out, tty = run_with_tty_stderr(argv, big_log.parent)
    assert code == 0, tty
    assert "reading the log [" in tty and "100%" in tty
    assert tty.count("\r") >= 3  # redrawn in place, more than once: per finished range
    assert tty.endswith("\r\x1b[K")  # and erased before the report
    assert out.startswith("=" * 60 + "\n")  # the report itself is untouched
    piped = run_piped(argv, big_log.parent)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout == out


def test_a_reprice_draws_a_bar_on_a_terminal_and_none_on_a_pipe(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(CONFIG)
    log = write_log(tmp_path / "cost.jsonl", make_records(8000, seed=6, days=5))
    assert log.stat().st_size > 3 << 20  # the bar moves about every MiB read
    base = [sys.executable, "-m", "proxy", "reprice", "--config", str(tmp_path / "config.yml"), "--log-file", str(log)]
    code, out, tty = run_with_tty_stderr([*base, "--out", str(tmp_path / "a.jsonl")], ROOT)
    assert code == 0, tty
    assert "re-pricing [" in tty and "100%" in tty and tty.count("\r") >= 3 and tty.endswith("\r\x1b[K")
    assert out.startswith("records: 8000\n")
    piped = run_piped([*base, "--out", str(tmp_path / "b.jsonl")], ROOT)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.replace("b.jsonl", "a.jsonl") == out
    code, out, tty = run_with_tty_stderr([*base, "--dry-run"], ROOT)
    assert code == 0 and "reading the log [" in tty and "100%" in tty


def test_rows_streamed_to_the_terminal_get_no_bar_between_them(tmp_path: Path) -> None:
    """--format detailed to a terminal: the bar would land between the rows, so none."""
    log = write_log(tmp_path / "cost.jsonl", make_records(100, seed=2, days=1))
    master, slave = pty.openpty()
    env = {**os.environ, "ANALYZE_COSTS_NOW": NOW.isoformat()}
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--log-file", str(log), "--since", "all", "--format", "detailed"],
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait() == 0
    shown = b"".join(chunks).decode()
    assert "reading the log" not in shown and "\x1b[K" not in shown
    assert shown.startswith("time ")
