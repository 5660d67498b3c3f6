"""Keep the configured provider key out of everything relayed to a client, and
anything shaped like a key out of the names a client sends (``mask_key_like``).

A provider may echo the key it was called with (an error message, a debug header, an
error event inside a 200 stream). Streams arrive cut at arbitrary points, so the key
can be split across two reads: the redactor holds back the few bytes at the end of a
read that could begin the key, and releases them once the next read shows they don't.
"""

from __future__ import annotations

import re

REPLACEMENT = b"[redacted]"

# What a provider key looks like when a client pastes one where a name goes (x-user-id,
# a tag, a description): a whole word starting with a vendor prefix and long enough to
# be a key, so "risk-assessment" and "task-manager" are left alone.
_KEY_LIKE = re.compile(
    r"\b(?:sk-ant-[A-Za-z0-9_\-]{16,}|(?:sk|rk|pk)-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}|AIza[0-9A-Za-z_\-]{30,}|ya29\.[0-9A-Za-z_\-.]{20,})"
)


def mask_key_like(text: str) -> str:
    """``text`` with anything shaped like a provider key replaced by ``[redacted]``."""
    if "sk-" not in text and "rk-" not in text and "pk-" not in text and "AIza" not in text and "ya29." not in text:
        return text  # the common case, without a regex
    return _KEY_LIKE.sub("[redacted]", text)


class StreamRedactor:
    __slots__ = ("_secret", "_first", "_keep", "_tail")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._first = secret[:1]
        self._keep = len(secret) - 1
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (after anything held back) is safe to send now."""
        data = self._tail + chunk if self._tail else chunk
        if self._secret in data:
            data = data.replace(self._secret, REPLACEMENT)
        held = self._partial(data)
        if held:
            self._tail = data[-held:]
            return data[:-held]
        self._tail = b""
        return data

    def flush(self) -> bytes:
        """The bytes held back at the end of the stream (not the key: it never completed)."""
        tail, self._tail = self._tail, b""
        return tail

    def _partial(self, data: bytes) -> int:
        # The longest suffix of ``data`` that is a proper prefix of the secret.
        secret = self._secret
        i = data.find(self._first, max(0, len(data) - self._keep))
        while i != -1:
            if secret.startswith(data[i:]):
                return len(data) - i
            i = data.find(self._first, i + 1)
        return 0


def redact_bytes(data: bytes, secret: bytes | None) -> bytes:
    if secret and secret in data:
        return data.replace(secret, REPLACEMENT)
    return data
