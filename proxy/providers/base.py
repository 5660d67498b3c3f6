"""The small interface every provider family implements.

An adapter is pure: it looks at paths, headers and JSON payloads and returns
facts. It never does I/O, so each one is tested with plain payloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

from ..estimate import OutputText
from ..usage import CallInfo


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a request path is, as far as metering is concerned."""

    kind: str | None  # e.g. "chat", "messages", "generate"; None: not metered
    model: str | None = None  # a model named in the path (Gemini)
    stream: bool = False  # the path itself asks for a stream (Gemini)


@dataclass(frozen=True, slots=True)
class PreparedBody:
    """The request body to send upstream, when the adapter had to change it."""

    body: dict[str, Any]
    # The client did not ask for the usage chunk we asked for: drop it from its stream.
    hide_usage_chunk: bool = False


class StreamTap(ABC):
    """Follows one streamed reply, event by event, and keeps the latest usage."""

    def __init__(self) -> None:
        self.info = CallInfo()
        # What the client received, in case the stream ends before reporting usage.
        self.text = self.info.output_text = OutputText()
        # Set once the family's final event arrived; a stream that ends without it was cut.
        self.complete = False

    @abstractmethod
    def on_event(self, event: str | None, data: str) -> bool:
        """Take one SSE event; return False if the client must not receive it."""

    def on_element(self, element: bytes) -> None:
        """Take one element of a streamed JSON array (Gemini without alt=sse)."""

    @abstractmethod
    def result(self) -> CallInfo:
        """What is known now; callable at any time, also after an abort."""


class Adapter(ABC):
    family: str
    # Headers that may carry the client's credential, lower-case.
    key_headers: tuple[str, ...]

    @abstractmethod
    def endpoint(self, path: str, method: str) -> Endpoint:
        """Classify ``path`` (the part after ``/{provider}/``)."""

    @abstractmethod
    def auth_header(self, api_key: str) -> tuple[str, str]:
        """The header this family uses to send ``api_key`` upstream."""

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        for name in self.key_headers:
            value = headers.get(name)
            if value:
                if value[:7].lower() == "bearer ":
                    value = value[7:].strip()
                return value or None
        return None

    def wants_stream(self, endpoint: Endpoint, body: Any) -> bool:
        return endpoint.stream or (isinstance(body, dict) and body.get("stream") is True)

    def requested_model(self, endpoint: Endpoint, body: Any) -> str | None:
        if endpoint.model:
            return endpoint.model
        if isinstance(body, dict):
            model = body.get("model")
            if isinstance(model, str):
                return model
        return None

    def request_user(self, body: Any) -> str | None:
        """A user id the client put in the request body, if the family has one."""
        return None

    def prepare(self, endpoint: Endpoint, body: Any, stream: bool) -> PreparedBody | None:
        """Change the request body before it goes upstream; None: send it unchanged."""
        return None

    @abstractmethod
    def parse_reply(self, endpoint: Endpoint, payload: Any) -> CallInfo:
        """Read usage and metadata from a complete (non-streamed) JSON reply."""

    @abstractmethod
    def stream_tap(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamTap:
        """A fresh tap for one streamed reply."""

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """An error payload in this family's own shape."""


def as_int(value: Any) -> int:
    """Token counts may be missing, null or (from lax servers) floats or strings."""
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def merge_usage(current: dict[str, Any] | None, update: Any) -> dict[str, Any] | None:
    """Streaming usage is cumulative: the last value wins, field by field. Never add."""
    if not isinstance(update, dict):
        return current
    merged = dict(current) if current else {}
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_usage(merged[key], value)
        else:
            merged[key] = value
    return merged


def error_message(error: Any) -> str:
    if isinstance(error, dict):
        msg = error.get("message") or error.get("type") or error.get("code") or "error"
        return str(msg)[:300]
    return str(error)[:300]
