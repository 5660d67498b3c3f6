"""``python -m proxy --workers N`` as a real process tree: started on a free port, its
banner awaited, its workers found (the supervisor's children that serve), stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from tests.support import ROOT
from tests.support.ports import free_port
from tests.support.proxy_process import proxy_command


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still running (from /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def is_worker(pid: int) -> bool:
    """A spawned worker, not multiprocessing's resource tracker."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for every purpose here
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Workers:
    """A running ``--workers N`` proxy: ``url``, ``log``, ``workers()``, ``stop()``."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: Path, banner: list[str]) -> None:
        self.proc, self.url, self.log, self.banner = proc, url, log, banner
        self.stderr: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def workers(self) -> list[int]:
        return [p for p in children(self.proc.pid) if is_worker(p)]

    async def wait_workers(self, n: int, not_in: Sequence[int] = (), timeout: float = 60) -> list[int]:
        """The workers, once ``n`` run and none of them is in ``not_in`` (a restart seen)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.workers()
            if len(found) == n and not set(found) & set(not_in):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} workers (not {list(not_in)}), found {found}; stderr: {''.join(self.stderr)[-2000:]}")
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code


async def start_workers(
    config: dict[str, Any], tmp_path: Path, count: int | str = 2, *, extra: Sequence[str] = (), log: Path | None = None, timeout: float = 90
) -> Workers:
    """``python -m proxy --config C --port P --workers count`` with ``config`` (JSON is
    YAML), logging to ``log`` (default tmp_path/cost.jsonl); returns once the banner says
    every worker serves. Raises with the process's stderr if it exits first."""
    cfg = tmp_path / f"workers-{time.monotonic_ns()}.yml"
    cfg.write_text(json.dumps(config))
    log = log or tmp_path / "cost.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [*proxy_command(cfg, port, log_file=log), "--workers", str(count), *extra]
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stderr=asyncio.subprocess.PIPE, cwd=str(tmp_path))
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = await asyncio.wait_for(proc.stderr.readline(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"no banner within {timeout:g} s: {''.join(lines)}") from None
        if not raw:
            await proc.wait()
            raise AssertionError(f"the proxy exited ({proc.returncode}) before serving: {''.join(lines)}")
        line = raw.decode(errors="replace")
        lines.append(line)
        if "llm-cost-proxy on http://" in line:
            return Workers(proc, f"http://127.0.0.1:{port}", log, lines)
