"""``python -m proxy … | head -1``: a reader that stops early closes the pipe while the
command still writes. Real processes and a real pipe, on output far bigger than the
pipe's buffer, so that the write after ``head`` exits really fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.records import gpt4o_call

ROOT = Path(__file__).resolve().parents[2]
PIPE_BUFFER = 1 << 16  # Linux's default; the output below is many times this
USERS = 4000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipes")
    now = time.time()
    with (d / "cost.jsonl").open("w") as f:
        for i in range(USERS):
            rec = gpt4o_call(now - 600 + i * 0.1, user_id=f"user-{i:05d}")
            f.write(json.dumps(rec) + "\n")
    # One budget per user: `budgets --json` writes a line for each of them.
    (d / "config.yml").write_text("budgets:\n  limits:\n    - {scope: user, period: monthly, usd: 100}\n")
    return d


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COST_TRACKING_FILE"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def head_1(workdir: Path, *args: str) -> tuple[int, str, str]:
    """``python -m proxy ARGS | head -1``: (the command's status, head's output, the command's stderr)."""
    cmd = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = subprocess.Popen(["head", "-1"], stdin=cmd.stdout, stdout=subprocess.PIPE)
    assert cmd.stdout is not None and cmd.stderr is not None
    cmd.stdout.close()  # head holds the only read end: once it exits, writes fail with EPIPE
    out, _ = head.communicate(timeout=60)
    err = cmd.stderr.read()
    cmd.stderr.close()
    return cmd.wait(timeout=60), out.decode(), err.decode()


def full_size(workdir: Path, *args: str) -> int:
    p = subprocess.run([sys.executable, "-m", "proxy", *args], cwd=workdir, env=_env(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return len(p.stdout)


def test_budgets_json_into_head(workdir: Path) -> None:
    args = ["budgets", "--json", "--log-file", "cost.jsonl"]
    assert full_size(workdir, *args) > 10 * PIPE_BUFFER
    code, out, err = head_1(workdir, *args)
    assert json.loads(out)["budget"] == "user:user-00000 monthly (each user)"
    assert (code, err) == (0, "")


def test_detailed_report_into_head(workdir: Path) -> None:
    args = ["report", "--log-file", "cost.jsonl", "--since", "all", "--format", "detailed"]
    assert full_size(workdir, *args) > 4 * PIPE_BUFFER
    code, out, err = head_1(workdir, *args)
    assert out.split()[:2] == ["time", "provider/model"]
    assert (code, err) == (0, "")


def test_shell_pipeline(workdir: Path) -> None:
    # As a user types it, the command's status taken from the pipeline.
    p = subprocess.run(
        [
            "bash",
            "-c",
            f"'{sys.executable}' -m proxy budgets --json --log-file cost.jsonl 2>err.txt | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
        ],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.stdout.strip() == "0"
    assert (workdir / "err.txt").read_text() == ""
