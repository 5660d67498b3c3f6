"""``append_line``: one whole line appended to a log that a running proxy may be
writing at the same moment (``python -m proxy log``).

The proxy's writer (storage/logwriter.py) appends each batch with one ``O_APPEND``
write under a shared ``flock``, and ``reprice --in-place`` swaps the file under the
exclusive one (storage/rewrite.py). An append from another process therefore takes the
exclusive lock: no write is in flight while it holds it, so it can check that the file
still ends a line (a proxy's write cut short by a full disk leaves a fragment, which
must not swallow our line) and that the path still names the file it opened (a swap
or a logrotate rename in between would put the line in the old file). The line then
goes in one ``write`` and is fsynced before the lock is released. The proxy's own
appends never wait for this lock on its event loop: they try it without blocking and
hand the line to their writer thread when it is busy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# A rewriter holds the exclusive lock only while it copies the last lines and swaps the
# file: well under a second. Longer means something is stuck; say so rather than hang.
LOCK_TIMEOUT = 10.0
_POLL = 0.01


def _lock(fd: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, f"locked by another process for over {timeout:g} s", path) from None
            time.sleep(_POLL)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _ends_a_line(fd: int, path: str) -> bool:
    """Whether the (locked) file is empty or ends in a newline."""
    size = os.fstat(fd).st_size
    if not size:
        return True
    rd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # our descriptor is write-only
    try:
        return os.pread(rd, 1, size - 1) == b"\n"
    finally:
        os.close(rd)


def append_line(path: str | os.PathLike[str], line: bytes, *, timeout: float = LOCK_TIMEOUT) -> None:
    """Append ``line`` (one complete JSON line, ending in a newline) to the log at
    ``path``, creating it and its directory if needed. Raises OSError when the log
    cannot be written (or stays locked for ``timeout`` seconds)."""
    if not line.endswith(b"\n") or b"\n" in line[:-1]:
        raise ValueError("append_line takes exactly one line")
    p = os.fspath(path)
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a file swapped under us is reopened; five swaps in a row is not a log
        fd = os.open(p, _FLAGS, 0o640)
        try:
            _lock(fd, p, timeout)
            if not _same_file(fd, p):
                continue  # renamed or replaced between open and lock: the path names another file now
            data = line if _ends_a_line(fd, p) else b"\n" + line
            view = memoryview(data)
            while view:  # one write; a short one (disk full) is resumed under the same lock
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p)
                view = view[n:]
            os.fsync(fd)
            return
        finally:
            os.close(fd)  # closing releases the lock
    raise OSError(errno.EAGAIN, "the log kept being replaced while appending", p)
