"""OpenAI and every OpenAI-compatible server: Chat, Completions, Embeddings, Responses."""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.core.estimate import OutputText
from proxy.core.usage import CallInfo, Usage
from proxy.providers.base import (
    Adapter,
    Endpoint,
    PreparedBody,
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
    429: "rate_limit_error",
    502: "upstream_unreachable",
    504: "upstream_timeout",
}

_RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_RESPONSES_LIFECYCLE = frozenset(_RESPONSES_TERMINAL + ("response.created", "response.in_progress", "response.queued", "error"))


def chat_usage(raw: dict[str, Any]) -> Usage:
    """Chat and legacy Completions ``usage`` (also Embeddings, which has only prompt tokens).
    Raises ImplausibleUsage for a count no real reply carries (see base.as_count)."""
    prompt = as_count(raw.get("prompt_tokens"), "prompt_tokens")
    completion = as_count(raw.get("completion_tokens"), "completion_tokens")
    total = as_count(raw.get("total_tokens"), "total_tokens")
    # Compatible servers (Gemini's) have left thinking out of completion_tokens while
    # counting it in total_tokens: the gap is output billed at the output rate.
    output = max(completion, total - prompt) if total else completion
    details = as_dict(raw.get("prompt_tokens_details"))
    cached = as_count(details.get("cached_tokens"), "prompt_tokens_details.cached_tokens") or as_count(
        raw.get("cached_tokens"), "cached_tokens"
    )
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=as_count(details.get("cache_write_tokens"), "prompt_tokens_details.cache_write_tokens"),
        reasoning_tokens=as_count(dig(raw, "completion_tokens_details", "reasoning_tokens"), "completion_tokens_details.reasoning_tokens"),
    )


def responses_usage(raw: dict[str, Any]) -> Usage:
    details = as_dict(raw.get("input_tokens_details"))
    return Usage(
        input_tokens=as_count(raw.get("input_tokens"), "input_tokens"),
        output_tokens=as_count(raw.get("output_tokens"), "output_tokens"),
        cache_read_tokens=as_count(details.get("cached_tokens"), "input_tokens_details.cached_tokens"),
        cache_write_tokens=as_count(details.get("cache_write_tokens"), "input_tokens_details.cache_write_tokens"),
        reasoning_tokens=as_count(dig(raw, "output_tokens_details", "reasoning_tokens"), "output_tokens_details.reasoning_tokens"),
    )


def _read_response_object(resp: dict[str, Any], info: CallInfo) -> None:
    """Fill ``info`` from a Responses API ``response`` object."""
    info.request_id = as_text(resp.get("id")) or info.request_id
    info.response_model = as_text(resp.get("model")) or info.response_model
    info.service_tier = as_text(resp.get("service_tier")) or info.service_tier
    status = as_text(resp.get("status"))
    reason = as_text(dig(resp, "incomplete_details", "reason"))
    info.finish_reason = reason or status or info.finish_reason
    if resp.get("error"):
        info.error = error_message(resp["error"])
    raw = resp.get("usage")
    if raw is not None:  # null until the response finishes
        fill_usage(info, raw, responses_usage)
        output = resp.get("output")
        if info.usage is not None and isinstance(output, list):
            searches = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")
            info.usage.web_search_requests = searches


_CHAT, _COMPLETIONS = Endpoint("chat"), Endpoint("completions")
_EMBEDDINGS, _RESPONSES = Endpoint("embeddings"), Endpoint("responses")
_FREE, _BILLABLE_ENDPOINT = Endpoint(None), Endpoint(None, billable=True)
# POSTs that cost money but whose replies carry no usage we read (the creating call of
# a batch or fine-tune; sub-paths such as /batches/{id}/cancel are free).
_BILLABLE = tuple(
    "/" + p
    for p in (
        "images/generations",
        "images/edits",
        "images/variations",
        "audio/speech",
        "audio/transcriptions",
        "audio/translations",
        "batches",
        "fine_tuning/jobs",
        "videos",
    )
)


class OpenAIAdapter(Adapter):
    family = "openai"
    key_headers = ("authorization",)
    # The SDKs skip ":" lines (SSE comments); chat and completions streams end with [DONE].
    stream_comments = True
    stream_end = re.compile(rb"\n(data: ?\[DONE\])")

    def endpoint(self, path: str, method: str) -> Endpoint:
        if method != "POST":
            return Endpoint(None)
        p = clean_path(path)
        if p.endswith("/chat/completions"):
            return _CHAT
        if p.endswith("/completions"):
            return _COMPLETIONS
        if p.endswith("/embeddings"):
            return _EMBEDDINGS
        if p.endswith("/responses"):
            return _RESPONSES
        if p.endswith(_BILLABLE):
            return _BILLABLE_ENDPOINT
        return _FREE

    def auth_header(self, api_key: str) -> tuple[str, str]:
        return "Authorization", f"Bearer {api_key}"

    def request_user(self, body: Any) -> str | None:
        if isinstance(body, dict) and isinstance(body.get("user"), str):
            return valid_text(body["user"]) or None
        return None

    def prepare(self, endpoint: Endpoint, body: Any, stream: bool) -> PreparedBody | None:
        # Without stream_options.include_usage a streamed Chat/Completions reply carries
        # no usage at all; ask for it, and hide the extra chunk from clients that did not.
        if not stream or endpoint.kind not in ("chat", "completions") or not isinstance(body, dict):
            return None
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return None
        if options is not None and not isinstance(options, dict):
            return None  # malformed: let the provider answer it
        new_body = dict(body)
        new_body["stream_options"] = {**(options or {}), "include_usage": True}
        return PreparedBody(new_body, hide_usage_chunk=True)

    def parse_reply(self, endpoint: Endpoint, payload: Any) -> CallInfo:
        info = CallInfo()
        if not isinstance(payload, dict):
            return info
        if endpoint.kind == "responses":
            _read_response_object(payload, info)
            return info
        info.request_id = as_text(payload.get("id"))
        info.response_model = as_text(payload.get("model"))
        info.service_tier = as_text(payload.get("service_tier"))
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            info.finish_reason = as_text(choices[0].get("finish_reason"))
        if payload.get("error"):
            info.error = error_message(payload["error"])
        raw = payload.get("usage")
        if raw is not None:
            fill_usage(info, raw, chat_usage)
        elif isinstance(choices, list):
            # A compatible server that reports no usage: keep the text to estimate from.
            info.output_text = text = OutputText()
            for choice in choices:
                if isinstance(choice, dict):
                    message = choice.get("message")
                    _choice_text(message if isinstance(message, dict) else choice, text)
        return info

    def stream_tap(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamTap:
        if endpoint.kind == "responses":
            return _ResponsesTap()
        return _ChatTap(hide_usage_chunk)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "api_error"),
                "param": None,
                "code": _ERROR_TYPES.get(status),
            }
        }


def _choice_text(part: dict[str, Any], text: OutputText) -> None:
    """Text of a message, a stream delta or a legacy completion choice."""
    text.add(part.get("content"))
    text.add(part.get("text"))
    text.add(part.get("reasoning_content"))
    calls = part.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                fn = as_dict(call.get("function"))
                text.add(fn.get("name"))
                text.add(fn.get("arguments"))


class _ChatTap(StreamTap):
    __slots__ = ("info", "text", "complete", "_raw", "_hide")

    def __init__(self, hide_usage_chunk: bool) -> None:
        super().__init__()
        self._raw: Any = None
        self._hide = hide_usage_chunk

    def on_event(self, event: str | None, data: str) -> bool:
        if not data:
            return True
        if data.startswith("[DONE]"):
            self.complete = True
            return True
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        info = self.info
        if info.request_id is None:
            info.request_id = as_text(chunk.get("id"))
        info.response_model = as_text(chunk.get("model")) or info.response_model
        info.service_tier = as_text(chunk.get("service_tier")) or info.service_tier
        if chunk.get("error"):
            info.error = error_message(chunk["error"])
            self.complete = True  # an error chunk ends the stream: no [DONE] follows
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    info.finish_reason = as_text(choice.get("finish_reason")) or info.finish_reason
                    delta = choice.get("delta")
                    _choice_text(delta if isinstance(delta, dict) else choice, self.text)
        usage = chunk.get("usage")
        if usage is not None:
            self._raw = merge_usage(self._raw, usage)
            if self._hide and not choices and isinstance(usage, dict):
                return False
        return True

    def result(self) -> CallInfo:
        if self._raw is not None:
            fill_usage(self.info, self._raw, chat_usage)
        return self.info


class _ResponsesTap(StreamTap):
    __slots__ = ("info", "text", "complete")

    def on_event(self, event: str | None, data: str) -> bool:
        if event is not None and event.endswith(".delta"):
            # Text deltas only matter if the stream never reaches its terminal event.
            try:
                delta = orjson.loads(data).get("delta")
            except (orjson.JSONDecodeError, AttributeError):
                return True
            self.text.add(delta)
            return True
        if event is not None and event not in _RESPONSES_LIFECYCLE:
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(payload, dict):
            return True
        kind = as_text(payload.get("type")) or event
        if kind == "error":
            self.info.error = error_message(payload)
        if kind in _RESPONSES_TERMINAL or kind == "error":
            self.complete = True
        resp = payload.get("response")
        if isinstance(resp, dict):
            _read_response_object(resp, self.info)
        return True

    def result(self) -> CallInfo:
        return self.info
