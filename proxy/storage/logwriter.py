"""Append JSON lines so that a record reaches the kernel before its reply ends, without
letting a slow or broken disk stall the event loop.

While the log is healthy, ``write`` appends at once on the caller's thread (one
``O_APPEND`` write under a non-blocking shared ``flock``): a SIGKILL after the reply
loses nothing. Whatever could block or fail (lock busy, disk erroring, records held back,
a write that took too long) goes to one writer thread instead, and the caller gets a
Future saying when, and whether, its line reached the kernel. Both paths write under one
lock, the direct one only when nothing is held back: lines keep their ``write`` order.

Every write checks, under the shared lock, that the path still names the open file, and
reopens if not (``reprice --in-place`` swaps it under the exclusive lock; logrotate
renames it). A closed descriptor's number is never kept: the OS hands it to the next
socket. A short write (disk full) is resumed at the byte; if the file moved on meanwhile
the torn tail is terminated and the line written whole, so a reader skips at most that
fragment. Held records wait in memory (bounded); at shutdown what still cannot be written
goes to a fallback file, announced in one line on stderr.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import select
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable

log = logging.getLogger("proxy")

# Records kept for a retry while the disk refuses them; beyond this the oldest whole
# lines are dropped, loudly, rather than exhausting memory.
_MAX_BACKLOG = 256 * 1024 * 1024
# A healthy append takes microseconds; one on the event loop that takes longer than this
# means the disk is struggling, and every call would pay for it. Lines then go through the
# writer thread until its own writes are this fast again.
SLOW_WRITE = 0.020
# While records are held, how often the thread retries without new traffic; also bounds
# how long a wake-up lost to a loop that closed can delay the thread.
RETRY = 0.5
# One write per this many bytes of whole lines: a huge backlog is retried in pieces, so a
# failing attempt costs one small syscall, not a copy of the whole backlog.
_CHUNK = 1 << 20
# Enough lines for any burst; a stalled terminal must not grow memory without end.
_MAX_CONSOLE = 65536
# Console lines go out at most this long after their call: the writer thread is woken for
# them by one timer per interval, not once per event-loop pass. Waking a thread costs a
# futex call and a hand-over of the interpreter lock each time; at a few thousand calls a
# second that was several percent of the proxy's CPU time.
CONSOLE_EVERY = 0.05
_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)  # writes up to this size to a pipe are atomic (POSIX)
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def default_fallback() -> Path:
    env = os.environ.get("COST_TRACKING_FALLBACK")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"llm-cost-proxy-unwritten-{os.getpid()}.jsonl"


_Told = list[tuple[asyncio.Future[bool], bool]]


def _settle(told: _Told) -> None:
    for f, ok in told:
        if not f.done():  # a caller may have stopped waiting
            f.set_result(ok)


def _resolve(told: _Told) -> None:
    """From any thread: each future is set on its own loop."""
    for loop in {f.get_loop() for f, _ in told}:
        try:
            loop.call_soon_threadsafe(_settle, [t for t in told if t[0].get_loop() is loop])
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def console_chunks(lines: list[str]) -> list[bytes]:
    """Console lines as writes of whole lines, each at most ``PIPE_BUF`` bytes where a
    line allows: a write that size to a pipe (journald, docker) is never split, so lines
    from several workers sharing one stderr never interleave mid-line."""
    out: list[bytes] = []
    chunk = bytearray()
    for text in lines:
        line = text.encode("utf-8", "replace") + b"\n"
        if chunk and len(chunk) + len(line) > _PIPE_BUF:
            out.append(bytes(chunk))
            chunk.clear()
        chunk += line
    if chunk:
        out.append(bytes(chunk))
    return out


class JsonlWriter:
    """Opening the log (and its directory) happens at construction: OSError if it fails.
    ``fallback``: where ``close`` saves what the log refused; ``default_fallback()``."""

    def __init__(self, path: str | os.PathLike[str], console_fd: int | None = 2, fallback: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self._path = os.fspath(self.path)
        self.fallback_path = Path(fallback) if fallback is not None else default_fallback()
        self._console_fd = console_fd
        self.slow_write = SLOW_WRITE
        self._fd = -1
        self._dev = self._ino = 0
        # Records not yet (entirely) in the kernel, oldest first; only removed under _io.
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        self._queued = 0  # lines ever held
        self._done = 0  # held lines that left: written, dropped or saved to the fallback
        self._waiters: collections.deque[tuple[int, asyncio.Future[bool]]] = collections.deque()
        self._told: _Told = []  # answers decided under _io, sent after it
        self._torn = 0  # bytes of _held[0] already in the file
        self._torn_at = (0, 0, -1)  # (dev, ino, offset just past that fragment)
        self._dirty_tail = False  # the file may end in a torn line (ours or another writer's)
        self._direct = True
        self._failing = False
        self._error: OSError | None = None
        self._console: collections.deque[str] = collections.deque(maxlen=_MAX_CONSOLE)
        self._console_due = 0.0  # while a timer is to wake the thread for console lines: by when (monotonic)
        self._kicked: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._stop = False
        self._io = threading.Lock()  # whoever holds it may write the log: loop or thread
        self._q = threading.Lock()  # _held and _waiters; held briefly, never during I/O
        self._wake = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="jsonl-writer", daemon=True)
        self._thread.start()

    @property
    def held_records(self) -> int:
        return len(self._held)

    @property
    def console(self) -> bool:
        """Whether a call's console line goes anywhere (else it need not be made)."""
        return self._console_fd is not None

    def write(self, line: bytes, console: str | None = None) -> asyncio.Future[bool] | None:
        """Append one complete line (ending in a newline). None: the line is in the
        kernel already (or, outside a loop, queued). A Future: it resolves to True once
        the writer thread handed the line to the kernel, False if the disk refused it and
        it waits in memory. Call from one thread at a time (the event loop)."""
        if console is not None and self._console_fd is not None:
            self._console.append(console)
            self._kick_console()
        if self._closed:
            self._enqueue(line, None)
            self._finish()  # a call that outlived shutdown: written synchronously
            return None
        if self._direct and self._io.acquire(False):
            try:
                if self._write_direct(line):
                    return None
                return self._enqueue(line, self._loop())
            finally:
                self._io.release()
        fut = self._enqueue(line, self._loop())
        if self._closed:
            self._finish()  # close() ran meanwhile and will not see this line
        return fut

    def _write_direct(self, line: bytes) -> bool:
        """Under _io: the line written now, or False to hand it to the thread."""
        fd = self._fd
        if fd < 0 or self._held or self._dirty_tail:
            return False
        t0 = time.perf_counter()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False  # a rewriter holds the file: the thread waits for it, not the loop
        n = 0
        try:
            st = os.stat(self._path)
            # Checked on every write, not now and then: a rewriter releases its lock right
            # after the swap, and a line written to the old file then would be lost.
            if st.st_ino == self._ino and st.st_dev == self._dev:
                n = os.write(fd, line)
        except OSError:
            pass  # the thread retries, and reports the error once
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if n == len(line):
            if time.perf_counter() - t0 > self.slow_write:
                self._direct = False
            return True
        if n:
            self._torn = n
            self._torn_at = (self._dev, self._ino, os.lseek(fd, 0, os.SEEK_CUR))
        return False

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def _enqueue(self, line: bytes, loop: asyncio.AbstractEventLoop | None) -> asyncio.Future[bool] | None:
        fut = loop.create_future() if loop is not None else None
        with self._q:
            self._held.append(line)
            self._held_bytes += len(line)
            if fut is not None:
                self._waiters.append((self._queued, fut))
            self._queued += 1
        self._kick()
        return fut

    def _kick(self) -> None:
        loop = self._loop()
        if loop is None:
            self._wake.set()
        elif self._kicked is not loop:
            # Waking the thread once per loop pass, not once per call, keeps the
            # hand-off off the per-call cost.
            self._kicked = loop
            loop.call_soon(self._kick_now)

    def _kick_now(self) -> None:
        self._kicked = None
        self._wake.set()

    def _kick_console(self) -> None:
        if self._console_due and time.monotonic() < self._console_due:
            # The line goes with those already waiting for the timer. (Not even the
            # running loop is asked for: that is a getpid() system call every time.)
            return
        loop = self._loop()
        if loop is None:
            self._wake.set()
            return
        # Twice the interval: a timer lost with a loop that closed is replaced after that.
        self._console_due = time.monotonic() + 2 * CONSOLE_EVERY
        loop.call_later(CONSOLE_EVERY, self._console_now)

    def _console_now(self) -> None:
        self._console_due = 0.0
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(RETRY)
            self._wake.clear()
            stop = self._stop
            try:
                if self._held:
                    with self._io:
                        self._drain()
                    self._answer()
                self._write_console()
            except Exception as e:  # a bug here must not end the log silently
                log.error("log writer: unexpected %s: %s", type(e).__name__, e)
            if stop:
                return

    def _drain(self) -> bool:
        """Under _io: write the held lines, oldest first; False if the disk refused."""
        fast = True
        while True:
            with self._q:
                if not self._held:
                    break
                batch, size = [], 0
                for line in self._held:
                    batch.append(line)
                    size += len(line)
                    if size >= _CHUNK:
                        break
            try:
                took = self._write_batch(batch)
            except OSError as e:
                self._fail(e)
                return False
            fast = fast and took <= self.slow_write
        if self._failing:
            self._failing = False
            log.warning("writing %s again; the held records are written", self.path)
        if fast:
            self._direct = True
        return True

    def _write_batch(self, batch: list[bytes]) -> float:
        """One write of ``batch`` (the head of _held); progress recorded even when short.
        Returns how long the write itself took."""
        if self._fd < 0:
            self._open()
        # Completing or terminating a torn line must not race another process's append.
        mode = fcntl.LOCK_EX if self._torn or self._dirty_tail else fcntl.LOCK_SH
        fd = locked = self._fd
        fcntl.flock(fd, mode)
        try:
            if self._replaced():
                locked = -1
                self._reopen(mode)
                fd = locked = self._fd
            skip = 0
            if self._torn:
                st = os.fstat(fd)
                if self._torn_at == (st.st_dev, st.st_ino, st.st_size):
                    skip = self._torn  # nothing came after our fragment: complete it
                else:
                    self._torn, self._dirty_tail = 0, True
            prefix = b"\n" if self._dirty_tail and not self._ends_a_line(fd) else b""
            data = b"".join([prefix, memoryview(batch[0])[skip:], *batch[1:]])
            t0 = time.perf_counter()
            n = os.write(fd, data)
            took = time.perf_counter() - t0
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._dirty_tail = False
            at = os.lseek(fd, 0, os.SEEK_CUR) if n < len(data) else -1
            self._advance(n - len(prefix), at)
            return took
        finally:
            if locked >= 0:
                fcntl.flock(locked, fcntl.LOCK_UN)

    def _ends_a_line(self, fd: int) -> bool:
        """Whether our file is empty or ends in a newline; we hold its lock."""
        st = os.fstat(fd)
        if not st.st_size:
            return True
        try:  # our descriptor is write-only; the path names the same file (checked)
            rd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # unreadable: an empty line is better than a merged one
        try:
            return os.fstat(rd).st_ino == st.st_ino and os.pread(rd, 1, st.st_size - 1) == b"\n"
        finally:
            os.close(rd)

    def _advance(self, n: int, at: int) -> None:
        """``n`` more bytes of the held lines reached the file, ending at offset ``at``."""
        with self._q:
            off = self._torn
            while n:
                rest = len(self._held[0]) - off
                if n < rest:
                    off += n
                    self._torn_at = (self._dev, self._ino, at)
                    break
                n -= rest
                self._held_bytes -= len(self._held.popleft())
                self._done += 1
                off = 0
            self._torn = off
            self._tell(True, self._done)

    def _tell(self, ok: bool, upto: float = float("inf")) -> None:
        """Under _q: the callers of the lines before ``upto`` (default: all) are to hear
        ``ok``, once _io is released (see _told)."""
        while self._waiters and self._waiters[0][0] < upto:
            self._told.append((self._waiters.popleft()[1], ok))

    def _answer(self) -> None:
        """With _io released: a caller told its line is written may find the direct path
        free again for its next one."""
        with self._q:
            told, self._told = self._told, []
        if told:
            _resolve(told)

    def _replaced(self) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return True
        return st.st_ino != self._ino or st.st_dev != self._dev

    def _open(self) -> None:
        try:
            fd = os.open(self._path, _FLAGS, 0o640)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # removed under us
            fd = os.open(self._path, _FLAGS, 0o640)
        st = os.fstat(fd)  # cannot fail on a descriptor just opened
        self._dev, self._ino, self._fd = st.st_dev, st.st_ino, fd

    def _reopen(self, mode: int) -> None:
        old, self._fd = self._fd, -1  # from here on the number is not ours
        if self._torn:
            # The torn line will be written whole into the new file; end the fragment
            # where it is too (a rotated file), where nothing followed it.
            with suppress(OSError):
                st = os.fstat(old)
                if self._torn_at == (st.st_dev, st.st_ino, st.st_size):
                    os.write(old, b"\n")
            self._torn, self._dirty_tail = 0, True
        os.close(old)
        self._open()
        fcntl.flock(self._fd, mode)

    def _fail(self, e: OSError) -> None:
        self._error = e
        if not self._torn:
            # Another process sharing the file may have torn a line meanwhile: check
            # that the file ends a line before appending to it again.
            self._dirty_tail = True
        if not self._failing:
            self._failing = True
            log.error("cannot write %s (%s): holding the records in memory to retry", self.path, e.strerror or e)
        dropped = self._drop(lambda: self._held_bytes > _MAX_BACKLOG)
        if dropped:
            log.error("record backlog over %d MB: %d oldest records dropped", _MAX_BACKLOG >> 20, len(dropped))

    def _drop(self, more: Callable[[], bool]) -> list[bytes]:
        """Under _io: remove the oldest held lines while ``more()``; every waiter hears
        False (its line waits in memory, or is gone)."""
        lines = []
        with self._q:
            self._tell(False)
            while self._held and more():
                line = self._held.popleft()
                self._held_bytes -= len(line)
                self._done += 1
                lines.append(line)
                if self._torn:  # its fragment stays in the file: end it before the next line
                    self._torn, self._dirty_tail = 0, True
        return lines

    def _write_console(self) -> None:
        parts = [self._console.popleft() for _ in range(len(self._console))]
        if parts and self._console_fd is not None:
            with suppress(OSError):  # a closed terminal must not stop the log
                for chunk in console_chunks(parts):
                    _write_all(self._console_fd, chunk)

    def close(self) -> None:
        """Write everything held; what the log still refuses goes to the fallback, with
        one line on stderr. Never raises."""
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._finish()

    def _finish(self) -> None:
        try:
            with self._io:
                if self._held:
                    self._drain()
                self._write_console()
                if self._held:
                    self._spill()
                fd, self._fd = self._fd, -1
                if fd >= 0:
                    with suppress(OSError):
                        os.fsync(fd)
                    os.close(fd)
            self._answer()
        except Exception as e:
            self._say(f"closing {self.path}: {type(e).__name__}: {e}")

    def _spill(self) -> None:
        lines = self._drop(lambda: True)  # a torn head goes whole: the log has a fragment
        n = len(lines)
        what = f"{n} record{'s' if n != 1 else ''} could not be written to {self.path}"
        reason = (self._error.strerror if self._error is not None else None) or "not writable"
        try:
            fd = os.open(self.fallback_path, _FLAGS, 0o600)
            try:
                _write_all(fd, b"".join(lines))
            finally:
                os.close(fd)
        except OSError as e:
            self._say(f"{what} ({reason}); the fallback {self.fallback_path} failed too ({e.strerror or e}): {n} lost")
            return
        self._say(f"{what} ({reason}); saved to {self.fallback_path}")

    @staticmethod
    def _say(text: str) -> None:
        with suppress(OSError):
            _write_all(2, f"llm-cost-proxy: {text}\n".encode("utf-8", "replace"))
