"""The request path checks of web/forward.py: ``has_dot_segment`` with its shortcut for
the common path (no dot, nothing encoded) against the full decoding it stands for."""

from __future__ import annotations

import re
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from proxy.web.forward import has_dot_segment

# The pieces dot segments are made of, encoded or not, and ordinary path text.
PIECES = st.sampled_from(["/", "\\", ".", "..", "%2e", "%2E", "%252e", "%5c", "%2f", "%25", "%", "v1", "chat", "e", "2", "a.b"])


def decodes_to_a_dot_segment(path: str) -> bool:
    """The oracle: any of up to four decodings splits into a ``.`` or ``..`` segment (or
    the path is still encoded after four: refused too)."""
    for _ in range(4):
        if any(seg in (".", "..") for seg in re.split(r"[/\\]", path)):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


@given(st.lists(PIECES, max_size=12).map("".join))
def test_has_dot_segment_agrees_with_decoding_every_way(path: str) -> None:
    assert has_dot_segment(path) == decodes_to_a_dot_segment(path)


@given(st.text(alphabet=st.characters(blacklist_characters=".%"), max_size=40))
def test_a_path_without_dots_or_escapes_never_has_a_dot_segment(path: str) -> None:
    assert not has_dot_segment(path)
