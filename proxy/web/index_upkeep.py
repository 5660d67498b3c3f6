"""The proxy keeps its log's roll-up index current (storage/index.py ``update_index``),
so that a report over a log it wrote reads the index and nothing raw, from the first run.

A task looks at the log's size every ``CHECK_EVERY`` seconds, on the event loop (one
``stat``), and never on a call's path. Lines appended and not yet indexed are rolled up
once the log has been quiet for a check, or at once when ``BUSY_BYTES`` are waiting (a
log that is never quiet is indexed too); a log under ``SMALL_LOG`` is left alone. The work runs in one helper process of its own
(spawned on first need, niced below the proxy, one core at most), so neither the event
loop nor the interpreter's lock is held by it; it ends with the proxy.

Several processes may keep the same log (``serve --workers N`` appends to one log from
every worker) and a report may be updating the index at the same time: the update
takes a non-blocking lock beside the index and whoever finds it taken skips that turn.
What the index says is checked against the log's bytes by every reader in any case, so
a rotation (a new file under the name) or ``reprice --in-place`` (a new inode) is
noticed and the index rebuilt."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from aiohttp import web

from proxy.storage.index import update_index
from proxy.storage.memo import SegmentMemo
from proxy.storage.orphan import exit_with_parent
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")

CHECK_EVERY = 1.0  # seconds between looks at the log's size
SMALL_LOG = 1 << 20  # a log under this a report reads whole in milliseconds: left unindexed
BUSY_BYTES = 8 << 20  # index this much without waiting for a quiet second
NICE = 10  # the helper's CPU priority below the proxy's

_memo: SegmentMemo | None = None  # the helper process's: segments it checked stay trusted


def _start_helper(parent: int) -> None:
    global _memo
    exit_with_parent(parent)
    _memo = SegmentMemo(max_shapes=0)
    try:
        os.nice(NICE)
    except OSError:  # pragma: no cover - not allowed here: run at the proxy's priority
        pass


def _update(path: str) -> int | None:
    """In the helper: the offset the index covers now, None if another process had it."""
    return update_index(Path(path), _memo)


class IndexUpkeep:
    """The task that keeps one log's index current, and its helper process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.covered = -1  # offset the index reached at the last update (-1: none yet)
        self.updates = 0
        self._pool: ProcessPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_size = -1
        self._tried = -1  # the size at the last update: a torn last line is not retried alone

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="index-upkeep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def due(self, size: int) -> bool:
        """Whether lines wait to be indexed and the log is quiet or they are many."""
        quiet = size == self._last_size
        self._last_size = size
        if size == self._tried or size < SMALL_LOG:
            return False  # nothing new since the last update (it may have left a torn line)
        waiting = size - self.covered if size >= self.covered else size  # (smaller: a new file)
        return waiting > 0 and (quiet or waiting >= BUSY_BYTES or self.covered < 0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                size = os.stat(self.path).st_size
            except OSError:
                continue  # not written yet, or rotated away this instant
            if not self.due(size):
                continue
            self._tried = size
            try:
                got = await loop.run_in_executor(self._helper(), _update, str(self.path))
            except BrokenProcessPool:
                self._pool = None  # killed: a new one next time
                self._tried = -1
            except Exception as e:  # the proxy serves on without a current index
                log.warning("index upkeep of %s failed: %s: %s", self.path, type(e).__name__, e)
            else:
                self.updates += 1
                if got is not None:
                    self.covered = got

    def _helper(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork of a process with threads (the log writer) is not safe. (Not
            # a fork server either: it outlives a proxy that is killed, and its helpers
            # with it, holding the proxy's stderr.)
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_helper, initargs=(os.getpid(),)
            )
        return self._pool


UPKEEP = web.AppKey("lcp_index_upkeep", IndexUpkeep)


def setup_index_upkeep(app: web.Application, state: ProxyState, log_path: Path) -> None:
    """Keep ``log_path``'s roll-up index current while the app runs (nothing to keep
    without cost tracking: the proxy writes no log)."""
    if state.writer is None:
        return
    upkeep = IndexUpkeep(Path(log_path))
    app[UPKEEP] = upkeep

    async def on_startup(app: web.Application) -> None:
        upkeep.start()

    async def on_cleanup(app: web.Application) -> None:
        await upkeep.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
