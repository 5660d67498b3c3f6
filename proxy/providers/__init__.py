"""One adapter per API family; a new family is one module registered here."""

from __future__ import annotations

from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import Adapter, Endpoint, PreparedBody, StreamTap
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {a.family: a for a in (OpenAIAdapter(), AnthropicAdapter(), GeminiAdapter())}

__all__ = ["ADAPTERS", "Adapter", "Endpoint", "PreparedBody", "StreamTap"]
