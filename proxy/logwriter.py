"""Append JSON lines from the event loop without ever blocking it.

Records are serialized by the caller, gathered for one pass of the event loop, and
handed to one writer thread as a single batch; the thread writes each batch with one
``os.write`` on an ``O_APPEND`` descriptor, so lines never interleave or tear, even
across processes. The per-call console lines travel the same way to stderr, so no
terminal write ever happens on the event loop either.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from pathlib import Path

_STOP = object()


class JsonlWriter:
    def __init__(self, path: str | os.PathLike[str], console_fd: int | None = 2) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._console_fd = console_fd
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lines: list[bytes] = []
        self._console: list[bytes] = []
        self._scheduled = False
        self._thread = threading.Thread(target=self._run, name="jsonl-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def write(self, line: bytes, console: str | None = None) -> None:
        """Queue one complete line (ending in a newline) and an optional console line;
        never blocks. Called from the event loop (or any single thread)."""
        if self._closed:
            raise RuntimeError("writer is closed")
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
            if lines:
                self._write_all(self._fd, b"".join(lines))
            text = b"".join(console)
            if text and self._console_fd is not None:
                try:
                    self._write_all(self._console_fd, text)
                except OSError:
                    pass  # a closed terminal must not stop the log
            if stop:
                return

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
        os.fsync(self._fd)
        os.close(self._fd)
