"""``storage.follow.LogFollower`` on a real file written in arbitrary pieces (as other
processes' appends reach a reader): every record once, in order, whole lines only;
across a rotation, a copytruncate, a torn fragment and repeated lines."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.storage.follow import LogFollower
from tests.support import synthlog

RECORDS = [synthlog.dumps({**r, "record_id": f"r{i:04d}"}) for i, r in enumerate(synthlog.records(40, mix=synthlog.REALISTIC, seed=3))]
IDS = [orjson.loads(line)["record_id"] for line in RECORDS]


def _ids(batch: list) -> list[str]:
    return [rec["record_id"] for rec, _ in batch]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=sum(map(len, RECORDS))), max_size=30), n=st.integers(1, len(RECORDS)))
def test_pieces_give_each_record_once_in_order(tmp_path: Path, cuts: list[int], n: int) -> None:
    path = tmp_path / f"log-{os.urandom(4).hex()}.jsonl"
    path.touch()
    data = b"".join(RECORDS[:n])
    follower = LogFollower(path)
    seen: list[str] = []
    at = 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        _append(path, data[at:cut])
        at = cut
        batch = follower.read()
        assert all(line.endswith(b"\n") for _, line in batch)
        seen += _ids(batch)
        # Never past a line still being written.
        assert follower.offset <= at and data[: follower.offset].count(b"\n") == len(seen)
    assert seen == IDS[:n]
    follower.close()


def test_it_starts_where_it_is_told_and_stops_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(RECORDS[:10]))
    st_ = path.stat()
    start = len(b"".join(RECORDS[:3]))
    f = LogFollower(path, start, (st_.st_dev, st_.st_ino))
    assert _ids(f.read(until=len(b"".join(RECORDS[:7])))) == IDS[3:7]
    assert _ids(f.read()) == IDS[7:10]
    # Another file's identity: from the end, not from an offset that means nothing here.
    g = LogFollower(path, start, (st_.st_dev, st_.st_ino + 1))
    assert g.read() == [] and g.offset == st_.st_size


def test_rotation_copytruncate_torn_lines_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(RECORDS[0])
    f = LogFollower(path)
    _append(path, RECORDS[1] + RECORDS[1] + b'{"torn": \n' + RECORDS[2])
    assert _ids(f.read()) == IDS[1:3]  # the repeat counted once, the fragment skipped
    assert f.bad[0] == 1
    # Rotated: the old file's last lines, then the new file's from its start.
    _append(path, RECORDS[3])
    path.rename(tmp_path / "log.jsonl.1")
    path.write_bytes(RECORDS[4])
    assert _ids(f.read()) == IDS[3:5]
    # Truncated in place (logrotate's copytruncate), then written anew.
    with open(path, "r+b") as fh:
        fh.truncate(0)
    _append(path, RECORDS[5])
    assert _ids(f.read()) == IDS[5:6]
    # A missing log is waited for.
    missing = LogFollower(tmp_path / "later.jsonl")
    assert missing.read() == []
    (tmp_path / "later.jsonl").write_bytes(RECORDS[6])
    assert _ids(missing.read()) == IDS[6:7]
