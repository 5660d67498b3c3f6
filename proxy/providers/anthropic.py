"""Anthropic Messages API."""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.core.usage import CallInfo, Usage
from proxy.providers.base import (
    Adapter,
    Endpoint,
    StreamTap,
    as_count,
    as_dict,
    as_text,
    clean_path,
    dig,
    error_message,
    fill_usage,
    merge_usage,
    valid_text,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def messages_usage(raw: dict[str, Any]) -> Usage:
    """Anthropic reports uncached input, cache writes and cache reads as disjoint counts."""
    uncached = as_count(raw.get("input_tokens"), "input_tokens")
    write = as_count(raw.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    read = as_count(raw.get("cache_read_input_tokens"), "cache_read_input_tokens")
    ttl = as_dict(raw.get("cache_creation"))
    write_1h = as_count(ttl.get("ephemeral_1h_input_tokens"), "cache_creation.ephemeral_1h_input_tokens")
    return Usage(
        input_tokens=uncached + write + read,
        output_tokens=as_count(raw.get("output_tokens"), "output_tokens"),
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),
        reasoning_tokens=as_count(dig(raw, "output_tokens_details", "thinking_tokens"), "output_tokens_details.thinking_tokens"),
        web_search_requests=as_count(dig(raw, "server_tool_use", "web_search_requests"), "server_tool_use.web_search_requests"),
    )


def _fill(info: CallInfo, raw: Any) -> None:
    fill_usage(info, raw, messages_usage)
    if isinstance(raw, dict):
        info.service_tier = as_text(raw.get("service_tier")) or info.service_tier
        info.speed = as_text(raw.get("speed")) or info.speed


_MESSAGES, _BATCHES, _FREE = Endpoint("messages"), Endpoint(None, billable=True), Endpoint(None)


class AnthropicAdapter(Adapter):
    family = "anthropic"
    key_headers = ("x-api-key", "authorization")
    # The SDKs skip ":" lines (SSE comments); a stream ends with its message_stop event.
    stream_comments = True
    stream_end = re.compile(rb"\n(event: ?message_stop\r?\n)")

    def endpoint(self, path: str, method: str) -> Endpoint:
        if method != "POST":
            return _FREE
        p = clean_path(path)
        if p.endswith("/v1/messages"):
            return _MESSAGES
        # Message Batches bill at half price later, with no usage in this reply; its
        # sub-paths (/cancel, results) and /v1/messages/count_tokens are free.
        if p.endswith("/v1/messages/batches"):
            return _BATCHES
        return _FREE

    def auth_header(self, api_key: str) -> tuple[str, str]:
        return "x-api-key", api_key

    def request_user(self, body: Any) -> str | None:
        user = dig(body, "metadata", "user_id")
        return valid_text(user) if isinstance(user, str) and user else None

    def parse_reply(self, endpoint: Endpoint, payload: Any) -> CallInfo:
        info = CallInfo()
        if not isinstance(payload, dict):
            return info
        if payload.get("type") == "error":
            info.error = error_message(payload.get("error"))
            return info
        info.request_id = as_text(payload.get("id"))
        info.response_model = as_text(payload.get("model"))
        info.finish_reason = as_text(payload.get("stop_reason"))
        raw = payload.get("usage")
        if raw is not None:
            _fill(info, raw)
        return info

    def stream_tap(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamTap:
        return _MessagesTap()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


class _MessagesTap(StreamTap):
    __slots__ = ("info", "text", "complete", "_raw")

    def __init__(self) -> None:
        super().__init__()
        self._raw: Any = None

    def on_event(self, event: str | None, data: str) -> bool:
        if event in ("ping", "content_block_start", "content_block_stop"):
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(payload, dict):
            return True
        kind = payload.get("type")
        if kind == "content_block_delta":
            delta = as_dict(payload.get("delta"))
            self.text.add(delta.get("text") or delta.get("partial_json") or delta.get("thinking"))
        elif kind == "message_start":
            message = as_dict(payload.get("message"))
            self.info.request_id = as_text(message.get("id"))
            self.info.response_model = as_text(message.get("model"))
            # message_start carries the input side and a placeholder output count
            # that the first message_delta replaces.
            self._raw = merge_usage(None, message.get("usage"))
        elif kind == "message_delta":
            # Each message_delta repeats cumulative totals: overwrite, never add.
            self._raw = merge_usage(self._raw, payload.get("usage"))
            self.info.finish_reason = as_text(dig(payload, "delta", "stop_reason")) or self.info.finish_reason
        elif kind == "error":
            self.info.error = error_message(payload.get("error"))
            self.complete = True
        elif kind == "message_stop":
            self.complete = True
        return True

    def result(self) -> CallInfo:
        if self._raw is not None:
            _fill(self.info, self._raw)
        return self.info
