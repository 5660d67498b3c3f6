"""Record-derived text made safe to show a person.

Model names, tags, user ids and error messages come from clients and providers. In a
terminal an ESC sequence in one clears the screen or rewrites what the lines above
said, a bidi override shows text reversed, and U+2028/U+2029 or a C1 NEL break a line
where a table expects none. Every human-readable output (text reports, console
lines) passes such strings through ``printable``; machine outputs (JSON, CSV) keep
the values as logged, since those are data, not display.
"""

from __future__ import annotations

REPLACEMENT = "?"

_UNSAFE = [
    *range(0x00, 0x20),  # C0 controls: ESC, BEL, CR, LF, TAB, NUL...
    0x7F,  # DEL
    *range(0x80, 0xA0),  # C1 controls: CSI (0x9B) starts an escape sequence alone; NEL breaks a line
    0x2028,
    0x2029,  # line and paragraph separators
    0x200E,
    0x200F,
    0x061C,  # LRM, RLM, ALM
    *range(0x202A, 0x202F),  # LRE, RLE, PDF, LRO, RLO
    *range(0x2066, 0x206A),  # LRI, RLI, FSI, PDI
    # Lone surrogates (a lenient JSON parse yields them) cannot be encoded to print.
    *range(0xD800, 0xE000),
]
_TABLE = dict.fromkeys(_UNSAFE, REPLACEMENT)


def printable(text: str | None, limit: int = 200) -> str:
    """``text`` with every control, line-separator and bidi character replaced by "?"
    and cut to ``limit`` characters (the last one "…" when cut); None gives ""."""
    if text is None or limit <= 0:
        return ""
    if not isinstance(text, str):
        text = str(text)
    if len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text.translate(_TABLE)
