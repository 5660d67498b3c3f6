"""``--format csv`` "creates a CSV file" (the user guide) when stdout is a terminal, and
writes to stdout when piped or with ``--output -``: run on a real pty."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from tests.support.analyze_cli import SCRIPT, make_records, run
from tests.support.ptys import run_on_pty
from tests.support.synthlog import write_log


def run_on_a_tty(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The script with stdout on a pty (stderr a pipe); returns (status, tty text, stderr)."""
    return run_on_pty([sys.executable, str(SCRIPT), *args], cwd, tty="stdout")


def test_on_a_terminal_csv_goes_to_a_file_named_for_the_window(tmp_path: Path) -> None:
    recs = make_records(200, seed=8, days=3)
    log = write_log(tmp_path / "cost.jsonl", recs)
    piped = run("--log-file", str(log), "--format", "csv", "--start-date", "2026-11-21", "--end-date", "2026-11-22")
    code, shown, err = run_on_a_tty(
        "--log-file", str(log), "--format", "csv", "--start-date", "2026-11-21", "--end-date", "2026-11-22", cwd=tmp_path
    )
    assert code == 0, err
    made = tmp_path / "cost-report-2026-11-21-2026-11-22.csv"
    assert err.splitlines() == [f"CSV written to {made.name}"]
    assert shown == ""
    # The file holds what stdout gets when piped: every request of those two days.
    assert made.read_text(encoding="utf-8") == piped.stdout
    rows = list(csv.DictReader(io.StringIO(made.read_text(encoding="utf-8"))))
    assert len(rows) == sum(1 for r in recs if r["timestamp"][:10] in ("2026-11-21", "2026-11-22"))


def test_a_relative_window_names_the_file_by_its_times_and_dash_means_stdout(tmp_path: Path) -> None:
    log = write_log(tmp_path / "cost.jsonl", make_records(50, seed=9, days=1))
    code, _, err = run_on_a_tty("--log-file", str(log), "--format", "csv", "--since", "6h", "--tz", "Europe/Berlin", cwd=tmp_path)
    assert code == 0, err
    # 18:00 UTC is 19:00 in Berlin in November; six hours before, 13:00.
    assert (tmp_path / "cost-report-2026-11-23_1300-2026-11-23_1900.csv").exists()
    code, shown, err = run_on_a_tty("--log-file", str(log), "--format", "csv", "--since", "6h", "--output", "-", cwd=tmp_path)
    assert code == 0 and shown.startswith("time_utc,") and "CSV written" not in err
    assert sorted(p.name for p in tmp_path.glob("cost-report-*")) == ["cost-report-2026-11-23_1300-2026-11-23_1900.csv"]


def test_a_csv_file_already_there_is_kept_and_the_new_one_takes_another_name(tmp_path: Path) -> None:
    log = write_log(tmp_path / "cost.jsonl", make_records(50, seed=9, days=1))
    args = ("--log-file", str(log), "--format", "csv", "--since", "6h")
    first = tmp_path / "cost-report-2026-11-23_1200-2026-11-23_1800.csv"
    first.write_text("MY EDITS\n")
    code, _, err = run_on_a_tty(*args, cwd=tmp_path)
    assert code == 0 and err.splitlines() == ["CSV written to cost-report-2026-11-23_1200-2026-11-23_1800-2.csv"], err
    assert first.read_text() == "MY EDITS\n"
    code, _, err = run_on_a_tty(*args, cwd=tmp_path)
    assert code == 0 and err.endswith("-3.csv\n"), err
