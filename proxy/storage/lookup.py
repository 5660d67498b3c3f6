"""One call's record by its ``record_id`` (``GET /api/calls/{id}``): the recent calls
kept in memory as their lines were written, older ones found in the log's files."""

from __future__ import annotations

import mmap
import re
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Iterator

import orjson

from proxy.core.records import upgrade_record
from proxy.storage.logfiles import is_gzip, log_files, open_log, order_files

RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RecentRecords:
    """The last ``size`` records' lines by id: a client asking about the call it just
    made (the id from its reply's headers) never waits for a search of the log."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._lines: OrderedDict[str, bytes] = OrderedDict()

    def add(self, record: dict[str, Any], line: bytes) -> None:
        rid = record.get("record_id")
        if isinstance(rid, str):
            self._lines[rid] = line
            if len(self._lines) > self.size:
                self._lines.popitem(last=False)

    def get(self, record_id: str) -> bytes | None:
        return self._lines.get(record_id)


def find_record(log_path: Path, record_id: str) -> dict[str, Any] | None:
    """The record with this id in the log and its rotated files, newest first; None if
    no file holds it. A plain file is searched through a memory map, not parsed; any line
    holding the id as a JSON string is a candidate (writers differ in spacing), and the
    first whose ``record_id`` it is wins."""
    needle = orjson.dumps(record_id)
    try:
        files = order_files(log_files([str(log_path)]))
    except FileNotFoundError:
        return None
    for path in reversed(files):
        try:
            for line in _candidates(path, needle):
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("record_id") == record_id:
                    return upgrade_record(rec)
        except (OSError, ValueError, EOFError, zlib.error):
            continue  # unreadable or torn (a gzip cut short): the other files still count
    return None


# Lines holding the id but not as their record_id (a request id that happens to equal
# it) looked at per file before giving up on that file.
_MAX_CANDIDATES = 100


def _candidates(path: Path, needle: bytes) -> Iterator[bytes]:
    """The lines of one file holding ``needle``, last first."""
    if is_gzip(path):
        # Line by line: a rotated file can be 100 times its size once decompressed.
        found: deque[bytes] = deque(maxlen=_MAX_CANDIDATES)
        with open_log(path) as f:
            for line in f:
                if needle in line:
                    found.append(line)
        yield from reversed(found)
        return
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = len(m)
            for _ in range(_MAX_CANDIDATES):
                at = m.rfind(needle, 0, end)
                if at < 0:
                    return
                start = m.rfind(b"\n", 0, at) + 1
                stop = m.find(b"\n", at)
                yield bytes(m[start : stop if stop >= 0 else len(m)])
                end = start
