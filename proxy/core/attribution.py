"""Who made a call and what for: user, team, session and tags. Pure functions only.

Sources, first one that gives a value wins:

* ``user_id``: the proxy key's owner, the ``x-user-id`` header, the request body
  (OpenAI ``user``, Anthropic ``metadata.user_id``), else ``key:<fingerprint>`` of
  the key the client presented.
* ``team``: the proxy key's owner.
* ``session_id``: the ``x-session-id`` header.
* ``tags``: ``x-feature``, ``x-category``, ``x-project`` (as tags ``feature``,
  ``category``, ``project``) and any ``x-tag-NAME: value``.

Everything a client sends is cleaned before it reaches a record: no control
characters, line or paragraph separators, bidi overrides or lone surrogates
(nothing can break a JSON line or make a log line lie), whitespace collapsed, at
most ``MAX_VALUE_CHARS`` characters, and a value that a spreadsheet would read as a
formula (``=``, ``+``, ``-``, ``@``) gets a leading ``'`` so a CSV export stays data.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from proxy.core.redaction import mask_key_like

MAX_VALUE_CHARS = 128
MAX_TAGS = 20
TAG_NAME = re.compile(r"[a-z0-9_-]{1,40}")

# Headers named after a tag: ``x-feature: search`` is the tag ``feature=search``.
TAG_HEADERS = (("x-feature", "feature"), ("x-category", "category"), ("x-project", "project"))
TAG_PREFIX = "x-tag-"
# Every header the proxy reads for itself; none of them is forwarded upstream.
PROXY_HEADERS = frozenset({"x-user-id", "x-session-id", "x-budget-override", *(h for h, _ in TAG_HEADERS)})

_FORMULA_START = ("=", "+", "-", "@")
# Bidirectional overrides and isolates can make a value display as something else.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_SAFE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


def is_proxy_header(lower_name: str) -> bool:
    """True for a (lower-case) header name the proxy consumes and must not forward."""
    return lower_name in PROXY_HEADERS or lower_name.startswith(TAG_PREFIX)


def clean_value(value: object) -> str | None:
    """A client-sent string made safe for a JSON line, a log line and a CSV cell;
    None when nothing is left."""
    if not isinstance(value, str):
        return None
    if len(value) <= MAX_VALUE_CHARS and _SAFE.fullmatch(value):
        text = value  # the common case: printable ASCII, single spaces
    else:
        out = []
        for ch in value[: MAX_VALUE_CHARS * 4]:
            cat = unicodedata.category(ch)
            if ch.isspace() or cat in ("Cc", "Zl", "Zp"):
                out.append(" ")
            elif cat == "Cs" or ch in _BIDI:
                continue  # lone surrogates (not encodable) and direction tricks
            else:
                out.append(ch)
        text = " ".join("".join(out).split())
    if not text:
        return None
    if text.startswith(_FORMULA_START):
        text = "'" + text
    # A key pasted as a user id or tag must not reach the log (docs/budgets.md, attribution).
    text = mask_key_like(text)
    return text[:MAX_VALUE_CHARS].rstrip() or None


def clean_tag_name(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    name = name.strip().lower()
    return name if TAG_NAME.fullmatch(name) else None


@dataclass(frozen=True, slots=True)
class Owner:
    """What a proxy key says about whoever holds it."""

    user: str | None = None
    team: str | None = None


@dataclass(slots=True)
class Attribution:
    user_id: str | None = None
    team: str | None = None
    session_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def header_tags(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Tags from request headers, in precedence order, at most ``MAX_TAGS``."""
    pairs = list(headers)
    named = {name.lower(): value for name, value in reversed(pairs)}  # first occurrence wins
    tags: dict[str, str] = {}
    for header, tag in TAG_HEADERS:
        value = clean_value(named.get(header))
        if value is not None:
            tags[tag] = value
    for name, value in pairs:
        if len(tags) >= MAX_TAGS:
            break
        low = name.lower()
        if not low.startswith(TAG_PREFIX):
            continue
        header_tag = clean_tag_name(low[len(TAG_PREFIX) :])
        if header_tag is None or header_tag in tags:
            continue
        cleaned = clean_value(value)
        if cleaned is not None:
            tags[header_tag] = cleaned
    return tags


def attribute(
    headers: Mapping[str, str],
    body_user: str | None = None,
    owner: Owner | None = None,
    key_id: str | None = None,
) -> Attribution:
    """``headers`` is a case-insensitive mapping with ``.items()`` (aiohttp's CIMultiDict)."""
    user = None
    if owner is not None:
        user = clean_value(owner.user)
    if user is None:
        user = clean_value(headers.get("x-user-id"))
    if user is None:
        user = clean_value(body_user)
    if user is None and key_id:
        user = f"key:{key_id}"
    return Attribution(
        user_id=user,
        team=clean_value(owner.team) if owner is not None else None,
        session_id=clean_value(headers.get("x-session-id")),
        tags=header_tags(headers.items()),
    )
