"""A log re-priced into a new file, or rewritten in place under the writer's lock so
that no line a running proxy appends meanwhile is lost (``reprice_file``)."""

from __future__ import annotations

import fcntl
import gzip
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from proxy.engine.reprice import RepriceStats, reprice_lines
from proxy.pricing import PriceBook
from proxy.storage.logfiles import is_gzip, open_log


def complete_lines(f: Iterable[bytes], tail: bytearray) -> Iterator[bytes]:
    """The lines of ``f`` that end in a newline, each whole.

    The log may be growing while we read it, and a reader takes no lock: the proxy's
    writes exclude only the rewriter's exclusive lock. Linux does not make a read atomic
    against a write to a regular file: ``write`` copies one page-cache folio at a time and
    raises the file size after each, so a read meeting a line in flight can end at a folio
    boundary with the line half there, and the next read finds its rest. Seen (CI, and
    ``tests/test_reprice.py``): a 522-byte line at offset 65120, read up to 65536 and then
    EOF. Terminating that piece as a line of its own split one record into two unreadable
    lines (and, for ``--in-place``, its rest then came from the copy under the lock). So
    a piece without its newline waits here for the rest; what is still unended when ``f``
    is exhausted is left in ``tail``, for the caller: copied under the lock, or ended."""
    for line in f:
        if not line.endswith(b"\n"):
            tail += line  # only at EOF: the rest, if any, is still being written
            continue
        if tail:
            line = bytes(tail) + line
            tail.clear()
        yield line


def all_lines(f: Iterable[bytes]) -> Iterator[bytes]:
    """Every line of a file read as it stands; an unended last line too (reprice_lines
    ends it)."""
    tail = bytearray()
    yield from complete_lines(f, tail)
    if tail:
        yield bytes(tail)


# A progress callback: (bytes done, bytes in all).
Progress = Callable[[int, int], None]
_PROGRESS_STEP = 1 << 20  # report about every MiB read


def counted(lines: Iterable[bytes], total: int, progress: Progress | None) -> Iterator[bytes]:
    """``lines`` as they are, telling ``progress`` the bytes read so far, of ``total``
    (a plain file's size; 0 when unknown, as for a gzip file, whose decompressed bytes
    are counted: it then ends with the count as the total)."""
    if progress is None:
        yield from lines
        return
    done = told = 0
    for line in lines:
        done += len(line)
        if done - told >= _PROGRESS_STEP:
            told = done
            progress(min(done, total) if total else done, total)
        yield line
    progress(total or done, total or done)


def reprice_file(
    src: Path, dst: Path | None, book: PriceBook, *, in_place: bool = False, now: float | None = None, progress: Progress | None = None
) -> RepriceStats:
    """Write the re-priced log to ``dst``; or, with ``in_place``, atomically replace ``src``.
    ``progress`` hears of the bytes read."""
    stats = RepriceStats()
    size = 0 if is_gzip(src) else src.stat().st_size
    now = now if now is not None else datetime.now(timezone.utc).timestamp()
    if in_place:
        if is_gzip(src):
            raise ValueError("--in-place does not rewrite compressed files; use --out")
        fd, tmp = tempfile.mkstemp(prefix=src.name + ".", suffix=".reprice", dir=src.parent)
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                tail = bytearray()  # a line the proxy was still writing when we read it
                for line in reprice_lines(counted(complete_lines(f, tail), size, progress), book, stats, now):
                    out.write(line)
                # A running proxy writes each batch under a shared lock and follows a
                # rename (storage/logwriter.py): holding the exclusive lock while the last lines
                # are copied and the new file swapped in, no line can fall in between.
                # Under it no write is in flight, so the piece in ``tail`` and its rest,
                # read now, make one line again.
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    out.write(bytes(tail) + f.read())  # lines appended while we worked, as they are
                    out.flush()
                    os.fsync(out.fileno())
                    os.chmod(tmp, os.stat(src).st_mode & 0o777)
                    os.replace(tmp, src)
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return stats
    assert dst is not None
    if dst.resolve() == src.resolve():
        raise ValueError("--out is the input file: use --in-place to rewrite it")
    with open_log(src) as f, gzip.open(dst, "wb") if dst.suffix == ".gz" else dst.open("wb") as out:
        for line in reprice_lines(counted(all_lines(f), size, progress), book, stats, now):
            out.write(line)
    return stats
