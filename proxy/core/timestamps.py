"""Record timestamps: parsing, the canonical UTC text form and its place in a line. Pure."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

UTC = timezone.utc


def parse_timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- time ------------------------------------------------------------------------------


def iso_ms(ts: float, *, ceil: bool = False) -> str:
    """Canonical record timestamp text for an instant; ``ceil`` rounds up to the next
    millisecond so that, records having millisecond precision, ``rec >= bound`` as
    text is exactly ``rec_time >= ts``."""
    ms = math.ceil(ts * 1000) if ceil else math.floor(ts * 1000)
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


# "2026-11-23T18:15:28.893Z": the only form our writer produces. Such strings sort
# as text in time order, which is what lets a line be skipped before it is parsed.
_CANON_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
CANON_TS_AT = re.compile(rb'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
# The start of every line our writer produced, of each schema version (1 and 2): a
# tuple, as bytes.startswith takes one. All have the same length, so TS_AT is one offset.
LINE_HEAD = (b'{"schema_version":2,"timestamp":"', b'{"schema_version":1,"timestamp":"')
TS_AT = len(LINE_HEAD[0])


def canonical_ts(value: object) -> str | None:
    """A record's timestamp as canonical UTC text, whatever ISO form it was written in."""
    if not isinstance(value, str):
        return None
    if _CANON_TS.fullmatch(value):
        return value
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # the proxy only ever wrote UTC
    return iso_ms(dt.timestamp())


def ts_to_datetime(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))
