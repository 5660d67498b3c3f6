"""Incremental parsers for streamed replies: Server-Sent Events and growing JSON arrays.

Network reads do not line up with events, so both parsers buffer only the
incomplete tail between reads: memory stays flat however long the stream is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# WHATWG EventSource framing: a line ends with CRLF, LF or CR, and an event ends at an
# empty line, i.e. at two line terminators in a row, in any mix. The first one must not
# be read as a lone CR when an LF follows, or "a\r\nb" would look like CR + LF (a
# boundary). The second may be a lone CR at the end of the buffer whose LF is still in
# flight: the event is complete either way, and that LF then opens the next block as an
# empty line, which dispatches nothing.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n?|\n)")
_LINE = re.compile(r"\r\n|\r|\n")


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str
    raw: bytes  # the event's bytes as received, terminator included


def parse_event_block(raw: bytes) -> SSEEvent | None:
    """Parse one event block (without its terminating blank line).

    None when the block dispatches nothing: comments only, or no ``data`` field (the
    spec drops an event without data, even a named one). An empty event name is the
    default type, reported as None like a missing one.
    """
    # Fast paths for the shapes every provider sends: one "data:" line, optionally
    # after one "event:" line, with "\n" line ends.
    if b"\r" not in raw:
        nl = raw.find(b"\n")
        if nl < 0 and raw.startswith(b"data: "):
            return SSEEvent(None, raw[6:].decode("utf-8", "replace"), raw)
        if nl > 0 and raw.startswith(b"event: ") and raw.find(b"\n", nl + 1) < 0 and raw.startswith(b"data: ", nl + 1):
            return SSEEvent(raw[7:nl].decode("utf-8", "replace") or None, raw[nl + 7 :].decode("utf-8", "replace"), raw)
    event: str | None = None
    data: list[str] = []
    seen_data = False
    # Split the decoded text, not the bytes: "replace" never yields CR or LF, and the
    # regex (unlike str.splitlines) ends lines at CR, LF and CRLF only.
    for line in _LINE.split(raw.decode("utf-8", "replace")):
        if not line or line[0] == ":":
            continue
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
            seen_data = True
        elif name == "event":
            event = value or None
    if not seen_data:
        return None
    return SSEEvent(event, "\n".join(data), raw)


class SSEParser:
    """Feed bytes, get complete events back.

    ``keep_raw``: fill each event's ``raw`` (its bytes as received), for callers that
    re-frame the stream; ``keep_comments`` (with it): also return the blocks that
    dispatch nothing (``: keep-alive``, blank lines) as events with no name and empty
    data, so that the ``raw`` of everything returned, flush included, adds up to the
    input byte for byte.
    """

    __slots__ = ("_buf", "_scan_from", "_keep_comments", "_keep_raw")

    def __init__(self, keep_comments: bool = False, keep_raw: bool = True) -> None:
        self._buf = bytearray()
        self._scan_from = 0
        self._keep_comments = keep_comments
        self._keep_raw = keep_raw or keep_comments

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += chunk
        events: list[SSEEvent] = []
        start = 0
        # Re-scan a few bytes back: a boundary may straddle two reads (at most "\r\n"
        # of it can sit unmatched at the end of the old buffer).
        pos = max(0, self._scan_from - 3)
        # Most streams use "\n\n" only: bytes.find is far cheaper than the regex.
        plain = b"\r" not in buf
        while True:
            if plain:
                i = buf.find(b"\n\n", pos)
                if i < 0:
                    break
                end, stop = i, i + 2
            else:
                m = _BOUNDARY.search(buf, pos)
                if m is None:
                    break
                end, stop = m.span()
            ev = parse_event_block(bytes(buf[start:end]))
            if ev is not None:
                ev.raw = bytes(buf[start:stop]) if self._keep_raw else b""
                events.append(ev)
            elif self._keep_comments:
                events.append(SSEEvent(None, "", bytes(buf[start:stop])))
            start = pos = stop
        if start:
            del buf[:start]
        self._scan_from = len(buf)
        return events

    def flush(self) -> list[SSEEvent]:
        """An event the stream ended without terminating (servers that close early).

        With ``keep_comments``, whatever else is left (a keep-alive, a last blank line)
        comes back as a comment event, so that re-framing loses no byte.
        """
        buf = self._buf
        if not buf:
            return []
        raw = bytes(buf)
        buf.clear()
        self._scan_from = 0
        ev = parse_event_block(raw)
        if ev is not None:
            if not self._keep_raw:
                ev.raw = b""
            return [ev]
        return [SSEEvent(None, "", raw)] if self._keep_comments else []


_JSON_TOKEN = re.compile(rb'[{}\[\]"\\]')


class JSONArrayStreamParser:
    """Split a streamed top-level JSON array (``[{…},\\n{…}]``) into its elements' bytes.

    Gemini's streamGenerateContent without ``alt=sse`` sends this shape. Only the
    element being received is buffered. Elements are the objects and arrays in the
    top-level array (scalars are skipped); a top-level object instead of an array is
    returned whole as one element, as ``parse_reply`` reads a reply that is not a list.
    """

    __slots__ = ("_buf", "_depth", "_base", "_in_string", "_escape", "_elem_start", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0  # brackets open around the scan position
        self._base = 1  # the depth between elements: 1 in a top-level array, 0 for an object
        self._in_string = False
        self._escape = False
        self._elem_start = -1
        self._pos = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos = self._pos
        if self._escape and pos < len(buf):
            pos += 1
            self._escape = False
        while True:
            m = _JSON_TOKEN.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            i = m.start()
            c = buf[i]
            if self._in_string:
                if c == 0x5C:  # backslash: skip the escaped byte
                    if i + 1 >= len(buf):
                        self._escape = True
                        pos = len(buf)
                        break
                    pos = i + 2
                    continue
                if c == 0x22:
                    self._in_string = False
                pos = i + 1
                continue
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 0:
                    self._base = 1 if c == 0x5B else 0
                self._depth += 1
                if self._depth == self._base + 1:
                    self._elem_start = i
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == self._base and self._elem_start >= 0:
                    out.append(bytes(buf[self._elem_start : i + 1]))
                    self._elem_start = -1
            pos = i + 1
        # Drop everything before the element under construction.
        cut = self._elem_start if self._elem_start >= 0 else pos
        if cut:
            del buf[:cut]
            pos -= cut
            if self._elem_start >= 0:
                self._elem_start = 0
        self._pos = pos
        return out
