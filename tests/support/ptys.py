"""Running a command with one of its outputs on a real pseudo-terminal (pty), for what a
command does only when a person is watching (a progress bar, a CSV file instead of rows)."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

from tests.support.analyze_cli import NOW


def run_on_pty(argv: list[str], cwd: Path, *, tty: str) -> tuple[int, str, str]:
    """``argv`` with ``tty`` ("stdout" or "stderr") on a pty and the other a pipe, the
    reports' "now" pinned; returns (status, what the terminal got, what the pipe got)."""
    master, slave = pty.openpty()
    env = {**os.environ, "ANALYZE_COSTS_NOW": NOW.isoformat()}
    env.pop("COST_TRACKING_FILE", None)
    if tty == "stdout":
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=slave, stderr=subprocess.PIPE)
    else:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    pipe = p.stdout if tty == "stderr" else p.stderr
    piped = pipe.read().decode() if pipe else ""
    return p.wait(), b"".join(chunks).decode(), piped
