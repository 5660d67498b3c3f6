"""``storage.orphan.exit_with_parent``: a helper process (a pool's worker) ends once the
process that started it has gone, even when that process died before the helper had
finished starting (then the helper's parent is already another process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT

# A parent that starts two spawned helpers, one of which takes a second to reach
# exit_with_parent, tells their pids and dies at once, without shutting its pools down.
PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from proxy.storage.orphan import exit_with_parent

def slow_start(parent):
    time.sleep(1.0)
    exit_with_parent(parent)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    quick = ProcessPoolExecutor(1, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))
    quick.submit(os.getpid).result()
    slow = ProcessPoolExecutor(1, mp_context=ctx, initializer=slow_start, initargs=(os.getpid(),))
    slow.submit(os.getpid)
    time.sleep(0.3)  # the slow helper started, not yet at exit_with_parent
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    os._exit(0)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


def test_helpers_end_with_their_parent_even_one_not_yet_started(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) >= 2
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"helpers still running after their parent died: {left}"
