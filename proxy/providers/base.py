"""The small interface every provider family implements.

An adapter is pure: it looks at paths, headers and JSON payloads and returns
facts. It never does I/O, so each one is tested with plain payloads.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import orjson

from proxy.core.estimate import OutputText
from proxy.core.usage import CallInfo, Usage


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a request path is, as far as metering is concerned."""

    kind: str | None  # e.g. "chat", "messages", "generate"; None: not metered
    model: str | None = None  # a model named in the path (Gemini)
    stream: bool = False  # the path itself asks for a stream (Gemini)
    # Costs money although its reply reports no usage we read (images, audio, batches):
    # kind stays None, but budgets must still refuse it, and its record says "cost
    # unknown" so reports give totals as "at least". Free endpoints: Endpoint(None).
    billable: bool = False


_SLASHES = re.compile(r"//+")


def clean_path(path: str) -> str:
    """``path`` with one leading slash, no repeated or trailing ones: ``/v1//chat/completions/``
    reaches the same upstream handler as ``/v1/chat/completions``, so it must meter the same."""
    if "//" in path:
        path = _SLASHES.sub("/", path)
    path = path.rstrip("/")
    return path if path.startswith("/") else "/" + path


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
    # Whether the family's clients skip an SSE comment line, so the proxy may end a
    # stream with the call's cost (docs/providers.md §12), and the line a stream's end
    # marker starts on: a line end, then the marker as group 1 (core.reply_cost).
    stream_comments: bool = False
    stream_end: re.Pattern[bytes] | None = None

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
                return valid_text(model)  # not cut here: the shell marks a cut name as cut
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


# A count above this in any one field is not a bill but garbage (10^30, 1e308): the
# largest context windows are ~10^7 tokens, so no single call comes near it.
MAX_TOKENS = 10**9
# Strings read from a reply (model, ids, tiers, finish reasons) are cut to this length:
# an upstream must not be able to make every record megabytes long.
MAX_TEXT_CHARS = 200
# raw_usage deeper than this is cut: orjson refuses to write beyond ~250 levels, and
# merging cumulative stream usage recurses; real usage objects are 2-3 levels deep.
MAX_RAW_DEPTH = 16
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1  # what orjson can write


class ImplausibleUsage(ValueError):
    """A token count no real reply carries: the whole usage is not believed."""

    def __init__(self, field: str, value: Any) -> None:
        super().__init__(f"implausible usage: {field}={short_repr(value)}")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD. Only the lenient JSON fallback
    (bodies.parse_json) produces them, and a record holding one is written escaped but
    refused by orjson when read back: log readers would drop the call as corrupt."""
    if text.isascii():
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)  # the same object when there is none


def as_text(value: Any) -> str | None:
    """A string field of a reply; anything else (a number for ``model``, an object for
    ``service_tier``) is unreadable, not an error."""
    if isinstance(value, str):
        value = value[:MAX_TEXT_CHARS]
        if not value.isascii():
            value = _LONE_SURROGATE.sub("\ufffd", value)
        return value or None
    return None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_count(value: Any, field: str) -> int:
    """A token count: missing or null is 0; a whole number in [0, MAX_TOKENS] (also as
    a float like 12.0) is taken. Anything else (negative, fractional, a string even
    "12", a bool, NaN, inf, huge) raises ImplausibleUsage: lax parsing would turn such
    garbage into 0 or into negative money."""
    if value is None:
        return 0
    t = type(value)  # not isinstance: bool is an int
    if t is int:
        if 0 <= value <= MAX_TOKENS:
            count: int = value  # t is int (mypy does not narrow through ``t``)
            return count
    elif t is float:
        if 0.0 <= value <= MAX_TOKENS and value.is_integer():  # NaN fails the comparison
            return int(value)
    raise ImplausibleUsage(field, value)


def short_repr(value: Any, limit: int = 40) -> str:
    """A bounded description of any JSON value, safe for deep or huge ones (whose
    plain repr recurses or, for ints beyond 4300 digits, raises)."""
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    if type(value) is int and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}<{value.bit_length()}-bit int>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)  # repr escapes surrogates
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_safe(value: Any) -> Any:
    """``value`` as orjson can always write it, for raw_usage: ints beyond 64 bits and
    non-finite floats become their string form, lone surrogates U+FFFD, containers
    nested past MAX_RAW_DEPTH a marker. Returns ``value`` itself when nothing needs
    changing, which is every real reply: that check runs on every call, so it is a
    loop without a function call per field."""
    return value if _writable(value, 0) else _made_safe(value, 0)


def _writable(value: Any, depth: int) -> bool:
    t = type(value)
    if t is dict:
        if depth >= MAX_RAW_DEPTH:
            return False
        for k, v in value.items():
            if type(k) is not str or not (k.isascii() or _LONE_SURROGATE.search(k) is None):
                return False
            tv = type(v)
            if tv is int:
                if not _INT64_MIN <= v <= _UINT64_MAX:
                    return False
            elif tv is str:
                if not v.isascii() and _LONE_SURROGATE.search(v) is not None:
                    return False
            elif tv is float:
                if v - v != 0.0:  # inf - inf and nan - nan are nan
                    return False
            elif tv is dict or tv is list:
                if not _writable(v, depth + 1):
                    return False
            elif v is not None and tv is not bool:
                return False
        return True
    if t is list:
        return depth < MAX_RAW_DEPTH and all(_writable(v, depth + 1) for v in value)
    if t is str:
        text: str = value  # t is str (mypy does not narrow through ``t``)
        return text.isascii() or _LONE_SURROGATE.search(text) is None
    if t is int:
        number: int = value
        return _INT64_MIN <= number <= _UINT64_MAX
    if t is float:
        real: float = value
        return real - real == 0.0
    return value is None or t is bool


def _made_safe(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str:
        return valid_text(value)
    if t is bool or value is None:
        return value
    if t is int:
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
        try:
            return str(value)
        except ValueError:  # more digits than Python will print
            return short_repr(value)
    if t is float:
        return value if value - value == 0.0 else str(value)
    if t is dict:
        if depth >= MAX_RAW_DEPTH:
            return "{...}"
        out = None
        for k, v in value.items():
            safe = _made_safe(v, depth + 1)
            key = valid_text(k) if type(k) is str else short_repr(k)
            if safe is not v or key is not k:
                if out is None:
                    out = {}
                    for k2, v2 in value.items():  # the entries before this one, unchanged
                        if k2 is k:
                            break
                        out[k2] = v2
                out[key] = safe
            elif out is not None:
                out[k] = v
        return value if out is None else out
    if t is list:
        if depth >= MAX_RAW_DEPTH:
            return "[...]"
        items = None
        for i, v in enumerate(value):
            safe = _made_safe(v, depth + 1)
            if safe is not v:
                if items is None:
                    items = list(value)
                items[i] = safe
        return value if items is None else items
    return short_repr(value)  # not a JSON type at all (a caller's tuple, Decimal…)


def fill_usage(info: CallInfo, raw: Any, build: Callable[[dict[str, Any]], Usage]) -> None:
    """Set ``info``'s usage from a reported usage object: built by ``build`` if every
    count is plausible, else None with ``usage_error`` saying why. ``raw_usage`` keeps
    what was reported either way (made writable), so the record shows the garbage."""
    info.raw_usage = json_safe(raw)
    if not isinstance(raw, dict):
        info.usage = None
        info.usage_error = f"implausible usage: usage={short_repr(raw)}"
        return
    try:
        usage = build(raw)
    except ImplausibleUsage as e:
        info.usage = None
        info.usage_error = str(e)
        return
    # Cache and reasoning counts are parts of the totals (docs/providers.md §8): a part
    # larger than its whole is a reply we cannot price honestly.
    if usage.cache_read_tokens + usage.cache_write_tokens > usage.input_tokens:
        info.usage, info.usage_error = None, "implausible usage: cached tokens exceed input tokens"
    elif usage.reasoning_tokens > usage.output_tokens:
        info.usage, info.usage_error = None, "implausible usage: reasoning tokens exceed output tokens"
    else:
        info.usage, info.usage_error = usage, None


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def merge_usage(current: Any, update: Any, depth: int = 0) -> Any:
    """Streaming usage is cumulative: the last value wins, field by field. Never add.
    A non-object update (garbage) replaces what came before, so fill_usage judges it;
    a null one changes nothing."""
    if update is None:
        return current
    if not isinstance(update, dict) or depth >= MAX_RAW_DEPTH:
        return update
    merged = dict(current) if isinstance(current, dict) else {}
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_usage(merged[key], value, depth + 1)
        else:
            merged[key] = value
    return merged


def error_message(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("type") or error.get("code") or "error"
    if isinstance(error, str):
        return valid_text(error[:300])
    if isinstance(error, (dict, list)):
        # str() of a deeply nested value raises RecursionError; orjson stops at ~250 levels.
        try:
            return orjson.dumps(error)[:300].decode("utf-8", "replace")
        except orjson.JSONEncodeError:
            return short_repr(error)
    return valid_text(short_repr(error, 300))
