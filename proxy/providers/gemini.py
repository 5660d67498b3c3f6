"""Google Gemini API (AI Studio and Vertex ``usageMetadata``)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import orjson

from proxy.core.estimate import OutputText
from proxy.core.usage import CallInfo, Usage
from proxy.providers.base import (
    Adapter,
    Endpoint,
    StreamTap,
    as_count,
    as_dict,
    as_list,
    as_text,
    clean_path,
    error_message,
    fill_usage,
    merge_usage,
)

# models/NAME:method, also tunedModels/NAME:method and Vertex's
# projects/…/publishers/google/models/NAME:method.
_METHOD = re.compile(r"(?:^|/)(models|tunedModels)/([^/:]+):([A-Za-z]+)$")
# Methods that cost money but whose replies report no usage we read (batches, Imagen
# and Veo's predict); countTokens and the rest are free.
_BILLABLE = frozenset({"batchGenerateContent", "batchEmbedContents", "asyncBatchEmbedContent", "predict", "predictLongRunning"})

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
    thoughts = as_count(raw.get("thoughtsTokenCount"), "thoughtsTokenCount")
    return Usage(
        input_tokens=as_count(raw.get("promptTokenCount"), "promptTokenCount")
        + as_count(raw.get("toolUsePromptTokenCount"), "toolUsePromptTokenCount"),
        output_tokens=as_count(raw.get("candidatesTokenCount"), "candidatesTokenCount") + thoughts,
        cache_read_tokens=as_count(raw.get("cachedContentTokenCount"), "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def _read_chunk(payload: dict[str, Any], info: CallInfo, raw: Any) -> Any:
    info.response_model = as_text(payload.get("modelVersion")) or info.response_model
    info.request_id = as_text(payload.get("responseId")) or info.request_id
    candidates = payload.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        info.finish_reason = as_text(candidates[0].get("finishReason")) or info.finish_reason
        if info.output_text is not None:
            for cand in candidates:
                if isinstance(cand, dict):
                    for part in as_list(as_dict(cand.get("content")).get("parts")):
                        if isinstance(part, dict):
                            info.output_text.add(part.get("text"))
    if payload.get("error"):
        info.error = error_message(payload["error"])
    meta = payload.get("usageMetadata")
    # Some chunks have no usageMetadata, or an empty one; that must not reset what came before.
    if meta:
        raw = merge_usage(raw, meta)
        if isinstance(meta, dict):
            info.service_tier = as_text(meta.get("trafficType")) or info.service_tier
    return raw


_FREE = Endpoint(None)


class GeminiAdapter(Adapter):
    family = "gemini"
    key_headers = ("x-goog-api-key", "authorization")
    # No cost comment at a stream's end: google-genai reads every SSE line that is not
    # "data:" as JSON and fails on one (docs/providers.md §12). Its clients use /api/calls/{id}.
    stream_comments = False

    def endpoint(self, path: str, method: str) -> Endpoint:
        if method != "POST":
            return _FREE
        m = _METHOD.search(clean_path(path))
        if m is None:
            return _FREE
        collection, name, verb = m.groups()
        # A tuned model keeps its collection in the name: it must never be priced as
        # (or pass an allowlist as) a base model that happens to share its name.
        model = name if collection == "models" else f"{collection}/{name}"
        if verb == "generateContent":
            return Endpoint("generate", model=model)
        if verb == "streamGenerateContent":
            return Endpoint("generate", model=model, stream=True)
        if verb == "embedContent":
            # Input only, like OpenAI's embeddings (and budgets reserve no output for
            # this kind). Vertex's EmbedContentResponse carries usageMetadata with
            # promptTokenCount (same meaning as docs/providers.md §5.2), read like a
            # generate reply's. A reply without it (the Gemini API's has carried only
            # the vector) stays usage-less, so the proxy estimates it from the request
            # text as it does any metered reply that reports nothing.
            return Endpoint("embeddings", model=model)
        if verb in _BILLABLE:
            return Endpoint(None, model=model, billable=True)
        return _FREE

    def auth_header(self, api_key: str) -> tuple[str, str]:
        return "x-goog-api-key", api_key

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return super().client_key(headers, query) or query.get("key") or None

    def parse_reply(self, endpoint: Endpoint, payload: Any) -> CallInfo:
        # An embedding has no output text to estimate from.
        info = CallInfo(output_text=OutputText() if endpoint.kind != "embeddings" else None)
        # A streamed reply read whole (no alt=sse) is a JSON array of chunks.
        chunks = payload if isinstance(payload, list) else [payload]
        raw = None
        for chunk in chunks:
            if isinstance(chunk, dict):
                raw = _read_chunk(chunk, info, raw)
        if raw is not None:
            fill_usage(info, raw, gemini_usage)
        return info

    def stream_tap(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamTap:
        return _GenerateTap()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}


class _GenerateTap(StreamTap):
    __slots__ = ("info", "text", "complete", "_raw")

    def __init__(self) -> None:
        super().__init__()
        self._raw: Any = None

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
            fill_usage(self.info, self._raw, gemini_usage)
        return self.info
