"""Append JSON lines from the event loop without ever blocking it.

Records are serialized by the caller, gathered for one pass of the event loop, and
handed to one writer thread as a single batch; the thread writes each batch with one
``os.write`` on an ``O_APPEND`` descriptor, so lines never interleave or tear, even
across processes. The per-call console lines travel the same way to stderr, so no
terminal write ever happens on the event loop either.

The log may be replaced under a running proxy (``reprice --in-place``, logrotate's
rename-and-create): each batch is written under a shared ``flock`` after checking that
the path still names the open file, and is reopened when it does not. A rewriter that
holds the exclusive lock on the old file while it swaps in the new one therefore loses
no line.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import threading
from pathlib import Path

log = logging.getLogger("proxy")

_STOP = object()
# Lines kept for a retry while the disk refuses them (full, read-only); beyond this
# the oldest are dropped, loudly, rather than exhausting memory.
_MAX_BACKLOG = 256 * 1024 * 1024


def open_log_fd(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


class JsonlWriter:
    def __init__(self, path: str | os.PathLike[str], console_fd: int | None = 2) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open_log_fd(self.path)
        self._console_fd = console_fd
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lines: list[bytes] = []
        self._console: list[bytes] = []
        self._backlog = b""
        self._failing = False
        self._scheduled = False
        self._lock = threading.Lock()  # the descriptor, between the thread and close()
        self._thread = threading.Thread(target=self._run, name="jsonl-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def write(self, line: bytes, console: str | None = None) -> None:
        """Queue one complete line (ending in a newline) and an optional console line;
        never blocks. Called from the event loop (or any single thread)."""
        if self._closed:
            # A call that outlived shutdown: still one line, written synchronously.
            fd = open_log_fd(self.path)
            try:
                self._write_all(fd, line)
            finally:
                os.close(fd)
            return
        self._lines.append(line)
        if console is not None and self._console_fd is not None:
            self._console.append(console.encode("utf-8", "replace") + b"\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_over()
            return
        # Waking the writer thread once per loop pass, not once per call, keeps the
        # thread hand-off off the per-call cost.
        self._scheduled = True
        loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._scheduled = False
        if self._lines or self._console:
            self._queue.put((b"".join(self._lines), b"".join(self._console)))
            self._lines.clear()
            self._console.clear()

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            lines: list[bytes] = []
            console: list[bytes] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                else:
                    data, text = item  # type: ignore[misc]
                    lines.append(data)
                    console.append(text)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            self._write_lines(b"".join(lines))
            text = b"".join(console)
            if text and self._console_fd is not None:
                try:
                    self._write_all(self._console_fd, text)
                except OSError:
                    pass  # a closed terminal must not stop the log
            if stop:
                return

    def _write_lines(self, data: bytes) -> None:
        data = self._backlog + data
        if not data:
            return
        try:
            with self._lock:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                try:
                    if self._replaced():
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                        os.close(self._fd)
                        self._fd = open_log_fd(self.path)
                        fcntl.flock(self._fd, fcntl.LOCK_SH)
                    self._write_all(self._fd, data)
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as e:
            # Keep the lines for the next batch; say so once, not per batch.
            self._backlog = data[-_MAX_BACKLOG:] if len(data) > _MAX_BACKLOG else data
            if not self._failing:
                self._failing = True
                log.error("cannot write %s (%s): holding %d bytes of records to retry", self.path, e.strerror, len(self._backlog))
            if len(data) > _MAX_BACKLOG:
                log.error("record backlog over %d MB: oldest records dropped", _MAX_BACKLOG >> 20)
            return
        if self._failing:
            self._failing = False
            log.warning("writing %s again; the held records are written", self.path)
        self._backlog = b""

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._fd)
        return (st.st_ino, st.st_dev) != (own.st_ino, own.st_dev)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def close(self) -> None:
        """Write everything queued, then close the file."""
        if self._closed:
            return
        self._hand_over()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        if self._backlog:
            self._write_lines(b"")  # one last try
        with self._lock:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
