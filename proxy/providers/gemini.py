"""Google Gemini API (AI Studio and Vertex ``usageMetadata``)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import orjson

from ..estimate import OutputText
from ..usage import CallInfo, Usage
from .base import Adapter, Endpoint, StreamTap, as_int, error_message, merge_usage

_METHOD = re.compile(r"models/([^/:]+):(generateContent|streamGenerateContent)$")

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_usage(raw: dict[str, Any]) -> Usage:
    """Thoughts are billed as output but left out of candidatesTokenCount; tool-use
    prompt tokens are input but left out of promptTokenCount."""
    thoughts = as_int(raw.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=as_int(raw.get("promptTokenCount")) + as_int(raw.get("toolUsePromptTokenCount")),
        output_tokens=as_int(raw.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=as_int(raw.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _read_chunk(payload: dict[str, Any], info: CallInfo, raw: dict[str, Any] | None) -> dict[str, Any] | None:
    info.response_model = payload.get("modelVersion") or info.response_model
    info.request_id = payload.get("responseId") or info.request_id
    candidates = payload.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        info.finish_reason = candidates[0].get("finishReason") or info.finish_reason
        if info.output_text is not None:
            for cand in candidates:
                for part in (cand.get("content") or {}).get("parts") or () if isinstance(cand, dict) else ():
                    if isinstance(part, dict):
                        info.output_text.add(part.get("text"))
    if payload.get("error"):
        info.error = error_message(payload["error"])
    meta = payload.get("usageMetadata")
    # Some chunks have no usageMetadata; that must not reset what came before.
    if isinstance(meta, dict) and meta:
        raw = merge_usage(raw, meta)
        info.service_tier = meta.get("trafficType") or info.service_tier
    return raw


class GeminiAdapter(Adapter):
    family = "gemini"
    key_headers = ("x-goog-api-key", "authorization")

    def endpoint(self, path: str, method: str) -> Endpoint:
        m = _METHOD.search(path)
        if method != "POST" or m is None:
            return Endpoint(None)
        return Endpoint("generate", model=m.group(1), stream=m.group(2) == "streamGenerateContent")

    def auth_header(self, api_key: str) -> tuple[str, str]:
        return "x-goog-api-key", api_key

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return super().client_key(headers, query) or query.get("key") or None

    def parse_reply(self, endpoint: Endpoint, payload: Any) -> CallInfo:
        info = CallInfo(output_text=OutputText())
        # A streamed reply read whole (no alt=sse) is a JSON array of chunks.
        chunks = payload if isinstance(payload, list) else [payload]
        raw = None
        for chunk in chunks:
            if isinstance(chunk, dict):
                raw = _read_chunk(chunk, info, raw)
        if raw is not None:
            info.raw_usage = raw
            info.usage = gemini_usage(raw)
        return info

    def stream_tap(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamTap:
        return _GenerateTap()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}


class _GenerateTap(StreamTap):
    __slots__ = ("info", "text", "complete", "_raw")

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, Any] | None = None

    def _take(self, data: str | bytes) -> None:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(payload, dict):
            self._raw = _read_chunk(payload, self.info, self._raw)
            # No end-of-stream event: the chunk with a finishReason is the last one.
            self.complete = self.complete or self.info.finish_reason is not None or "error" in payload

    def on_event(self, event: str | None, data: str) -> bool:
        if data:
            self._take(data)
        return True

    def on_element(self, element: bytes) -> None:
        self._take(element)

    def result(self) -> CallInfo:
        if self._raw is not None:
            self.info.raw_usage = self._raw
            self.info.usage = gemini_usage(self._raw)
        return self.info
