"""Following a log that other processes append to (``serve --workers N``): the whole
lines added since the last look, each record once, across a rotation.

Every worker appends its records to the one log with single ``O_APPEND`` writes, so the
log holds every worker's calls, in one order. A worker that reads what was appended
since its last look, its own lines included, counts exactly what the log holds: the
24-hour window of ``/health``, ``/metrics`` and ``/api/calls`` of every worker agree
with each other and with the log, without the workers talking to each other.

A line still being written (a reader may see part of another process's write) is not
taken until its newline is there: the offset only moves past whole lines. Repeats are
skipped by the rule every reader of the log follows (``engine.lines.Dedupe``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from proxy.engine.lines import Dedupe
from proxy.storage.logfiles import iter_jsonl_lines

log = logging.getLogger("proxy")

# Bytes read per system call; one look reads on until the end, in these steps.
_READ = 1 << 20
# A line longer than this with no newline yet is a torn fragment, not a line in progress:
# it is stepped over rather than re-read at every look.
_MAX_LINE = 64 << 20
# A file that replaced the log (rotation) is read from its start only if it is this
# small: a big one is the same log rewritten in place (``reprice --in-place``), whose
# records were counted already.
_NEW_FILE_MAX = 64 << 20

Record = tuple[dict[str, Any], bytes]


class LogFollower:
    """``read()`` returns the records appended since the previous ``read``. It starts at
    ``offset`` of the file identified by ``ident`` (device, inode) when the log is still
    that file, else at the log's end. A missing log is waited for."""

    def __init__(
        self, path: str | os.PathLike[str], offset: int | None = None, ident: tuple[int, int] | None = None, skip: bytes | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.skip = skip  # lines holding these bytes are stepped over unparsed (a worker's own records)
        self._fd = -1
        self._ident = (0, 0)
        self.offset = 0
        self.bad = [0]  # lines that were not records (torn, corrupt): skipped
        self._dedupe = Dedupe()
        if self._open():
            size = os.fstat(self._fd).st_size
            self.offset = offset if offset is not None and ident == self._ident and 0 <= offset <= size else size

    @property
    def position(self) -> tuple[int, int, int]:
        """(device, inode, offset): where the next ``read`` starts."""
        return (*self._ident, self.offset)

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        self.offset = 0
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, until: int | None = None) -> list[Record]:
        """The records of the whole lines appended since the last read (up to byte
        ``until`` of the current file, if given), then, if the log was replaced by a
        new file, those of the new file's lines."""
        out: list[Record] = []
        if self._fd < 0 and not self._open():
            return out
        if until is None and self._truncated():
            self.offset = 0
        self._read_file(out, until)
        if until is None and self._rotated():
            self._read_file(out, None)
        return out

    def _read_file(self, out: list[Record], until: int | None) -> None:
        while True:
            want = _READ if until is None else min(_READ, until - self.offset)
            if want <= 0:
                return
            data = os.pread(self._fd, want, self.offset)
            if not data:
                return
            end = data.rfind(b"\n") + 1
            if end == 0:
                if len(data) < want:
                    return  # a line in progress: taken once its newline is there
                step = self._long_line(out, len(data), until)
                if step == 0:
                    return
                self.offset += step
                continue
            lines = data[:end].splitlines(keepends=True)
            if self.skip is not None:
                lines = [line for line in lines if self.skip not in line]
            out.extend(iter_jsonl_lines(lines, self.bad, self._dedupe))
            self.offset += end
            if len(data) < want:
                return

    def _long_line(self, out: list[Record], have: int, until: int | None) -> int:
        """Bytes to step over when a read found no newline at all: the whole line once
        its newline is found, or a fragment beyond ``_MAX_LINE`` (never a record)."""
        at = self.offset + have
        while at - self.offset < _MAX_LINE and (until is None or at < until):
            chunk = os.pread(self._fd, _READ, at)
            if not chunk:
                return 0
            nl = chunk.find(b"\n")
            if nl >= 0:
                line = os.pread(self._fd, at + nl + 1 - self.offset, self.offset)
                if self.skip is None or self.skip not in line:
                    out.extend(iter_jsonl_lines([line], self.bad, self._dedupe))
                return len(line)
            at += len(chunk)
        if until is not None and at >= until:
            return 0  # the rest is past the end asked for
        self.bad[0] += 1
        return at - self.offset

    def _truncated(self) -> bool:
        """Whether the file was cut in place (logrotate's copytruncate) and maybe written
        anew: shorter than where we are, or no longer a line's end just before it."""
        size = os.fstat(self._fd).st_size
        return size < self.offset or (0 < self.offset <= size and os.pread(self._fd, 1, self.offset - 1) != b"\n")

    def _rotated(self) -> bool:
        """Whether the path now names another file (rotated away); if so, the follower
        moves to the new file's start."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # rotated away, nothing new yet: keep reading the old file
        if (st.st_dev, st.st_ino) == self._ident or not self._open():
            return False
        if st.st_size > _NEW_FILE_MAX:
            log.info("the log %s was replaced by a large file (rewritten in place?): following it from its end", self.path)
            self.offset = os.fstat(self._fd).st_size
        return True
