"""One call's record by its ``record_id`` (``GET /api/calls/{id}``): the recent calls
kept in memory as their lines were written, older ones found in the log's files."""

from __future__ import annotations

import mmap
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


def _line_around(data: bytes | mmap.mmap, at: int) -> bytes:
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return bytes(data[start : end if end >= 0 else len(data)])


def find_record(log_path: Path, record_id: str) -> dict[str, Any] | None:
    """The record with this id in the log and its rotated files, newest first; None if
    no file holds it. A plain file is searched through a memory map, not parsed."""
    needle = b'"record_id":' + orjson.dumps(record_id)
    try:
        files = order_files(log_files([str(log_path)]))
    except FileNotFoundError:
        return None
    for path in reversed(files):
        try:
            line = _search(path, needle)
        except (OSError, ValueError, EOFError, zlib.error):
            continue  # unreadable or torn (a gzip cut short): the other files still count
        if line is not None:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("record_id") == record_id:
                return upgrade_record(rec)
    return None


def _search(path: Path, needle: bytes) -> bytes | None:
    if is_gzip(path):
        with open_log(path) as f:
            data = f.read()
        at = data.rfind(needle)
        return _line_around(data, at) if at >= 0 else None
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.rfind(needle)
            return _line_around(m, at) if at >= 0 else None
