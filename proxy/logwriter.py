"""Append JSON lines from the event loop without ever blocking it.

Records are serialized by the caller and handed to one writer thread through a
queue; the thread writes whole batches with ``os.write`` on an ``O_APPEND``
descriptor, so lines never interleave or tear, even across processes.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

_STOP = object()


class JsonlWriter:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jsonl-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one complete line (ending in a newline); never blocks."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._queue.put(line)

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batch: list[bytes] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)  # type: ignore[arg-type]
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_all(b"".join(batch))
            if stop:
                return

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        """Write everything queued, then close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        os.fsync(self._fd)
        os.close(self._fd)
