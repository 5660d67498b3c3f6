"""``GET /api/calls/{id}``'s search of the log (storage/lookup.py): the live file and its
rotated siblings, plain and gzip, newest first; a miss is None."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from proxy.storage.lookup import RecentRecords, find_record
from tests.support.records import gpt4o_call


def _lines(start: int, n: int, t0: float) -> list[dict]:
    return [gpt4o_call(t0 + i, record_id=f"id{start + i:04d}", user_id=f"u{start + i}") for i in range(n)]


def test_a_record_is_found_in_the_live_file_or_a_rotated_one_plain_or_gzip(tmp_path: Path) -> None:
    log = tmp_path / "cost.jsonl"
    t0 = time.time() - 3 * 86400
    oldest, older, live = _lines(0, 50, t0), _lines(50, 50, t0 + 86400), _lines(100, 50, t0 + 2 * 86400)
    with gzip.open(tmp_path / "cost.jsonl.2.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in oldest)
    (tmp_path / "cost.jsonl.1").write_text("".join(json.dumps(r) + "\n" for r in older))
    log.write_text("".join(json.dumps(r) + "\n" for r in live) + '{"torn": ')
    for rec in (oldest[3], older[49], live[0], live[49]):
        found = find_record(log, rec["record_id"])
        assert found is not None and found["user_id"] == rec["user_id"]
    assert find_record(log, "id9999") is None
    assert find_record(tmp_path / "missing.jsonl", "id0001") is None


def test_recent_records_keep_the_last_ones_only() -> None:
    recent = RecentRecords(size=3)
    for i in range(5):
        recent.add({"record_id": f"r{i}"}, f"line{i}".encode())
    assert [recent.get(f"r{i}") for i in range(5)] == [None, None, b"line2", b"line3", b"line4"]
