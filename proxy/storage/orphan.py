"""Helper processes (the analytics engine's, the body digester) end with the proxy
process that started them, however it ended.

A pool's worker waits on a queue whose pipe it holds both ends of, so a parent killed
by SIGKILL (or a worker of ``serve --workers N`` killed and restarted) would leave it
waiting forever, holding the terminal and the log's descriptors. A watcher thread in
the helper notices the parent is gone and ends it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

CHECK_EVERY = 1.0  # seconds: how long an orphan may outlive its parent


def exit_with_parent(parent: int) -> None:
    """Call first thing in a helper process, with the pid of the process that started it
    (passed by that process: a parent gone before the helper got here has already left
    it with another): the helper exits (status 0) once that parent has."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(CHECK_EVERY)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def end_helpers(grace: float) -> int:
    """Wait up to ``grace`` seconds for this process's helper processes (pools already
    told to shut down) to exit, then terminate those still running; how many were.

    A pool shut down without waiting can miss its stop signal as the interpreter exits
    (the queue's feeder thread is gone first): the helper then waits for work forever,
    and the interpreter's exit waits for the helper, so the proxy never exits. Their
    work (a report answer, an index update written by rename) is safe to cut."""
    deadline = time.monotonic() + grace
    cut = 0
    for proc in multiprocessing.active_children():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            cut += 1
            proc.terminate()
            proc.join(1.0)
    return cut
