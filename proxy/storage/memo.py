"""``SegmentMemo``: scan results of whole indexed segments kept in memory by a long-lived
reader (the analytics API's worker), for queries the roll-up index cannot answer (by
user, session or tag; latency; the most expensive requests; savings).

An indexed segment (storage/index.py) is a byte range of whole lines whose CRC-32 the
index has checked. The engine's result for a segment that lies wholly inside a report's
window does not depend on the window, only on the segment's bytes and on the query's
other terms (``Query.memo_key``). So the first run of a query shape reads every segment,
and later runs of the same shape, with any window, read only the segments the window
cuts and the log's unindexed tail; the answer is the one a full read gives."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from proxy.engine.cube import ScanResult

SegmentKey = tuple[str, int, int, int, int, str]  # path, device, inode, a, b, CRC-32


class SegmentMemo:
    """Per query shape, the result of each segment, for the ``max_shapes`` shapes used
    most recently (each shape's results are about the size of its whole-log cube)."""

    def __init__(self, max_shapes: int = 48) -> None:
        self.max_shapes = max_shapes
        self._shapes: OrderedDict[Hashable, dict[SegmentKey, ScanResult]] = OrderedDict()
        self._pinned: dict[Hashable, Any] = {}  # objects a shape names by identity (a price book)
        self.misses = 0  # whole segments read for the memo
        self._verified: dict[str, tuple[int, int, int, frozenset[tuple[int, int, str]]]] = {}
        self._audits: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: Hashable, pin: Any = None) -> dict[SegmentKey, ScanResult]:
        got = self._shapes.get(key)
        if got is None:
            got = self._shapes[key] = {}
            # Keeping what the key names by id() alive: its id is not reused while the key is.
            self._pinned[key] = pin
            while len(self._shapes) > self.max_shapes:
                old, _ = self._shapes.popitem(last=False)
                self._pinned.pop(old, None)
        else:
            self._shapes.move_to_end(key)
        return got

    # -- a growing log's index, trusted between audits --
    #
    # The index re-hashes every segment of a log whose stat changed (storage/index.py),
    # which for a log a proxy appends to is every query: a second per gigabyte. This
    # reader has hashed the segments itself, and our tools never change a log's old bytes
    # in place (rotation and `reprice --in-place` make a new file; writers append). So
    # while the file is the same one (device and inode) and has not shrunk, the segments
    # this reader verified are trusted, and each query re-hashes one of them in turn: a
    # change made in place by something else is found within as many queries as the log
    # has segments, and then the whole index is checked as before.

    # Segments another process added to the index since (the proxy's upkeep, with several
    # workers sharing a log, or a report) are not trusted: they are checked, once.

    def unchecked(self, path: str, stat: list[int], segments: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Of ``segments``, those this reader has not verified itself; None when it
        trusts none of them (another file, or one that shrank, or never seen)."""
        seen = self._verified.get(path)
        if seen is None or seen[:2] != (stat[0], stat[1]) or stat[2] < seen[2]:
            return None
        return [s for s in segments if (s["a"], s["b"], s["crc32"]) not in seen[3]]

    def trusted(self, path: str, stat: list[int], segments: list[dict[str, Any]]) -> bool:
        return self.unchecked(path, stat, segments) == []

    def audit(self, path: str, segments: list[dict[str, Any]]) -> dict[str, Any]:
        """The segment to re-hash this time, each in turn."""
        n = self._audits.get(path, 0)
        self._audits[path] = n + 1
        return segments[n % len(segments)]

    def remember(self, path: str, stat: list[int], segments: list[dict[str, Any]]) -> None:
        """``segments`` of ``path`` were just hashed (or built) by this reader."""
        self._verified[path] = (stat[0], stat[1], stat[2], frozenset((s["a"], s["b"], s["crc32"]) for s in segments))

    def forget(self, path: str) -> None:
        self._verified.pop(path, None)
