"""One adapter per API family; a new family is one module registered here."""

from __future__ import annotations

from .anthropic import AnthropicAdapter
from .base import Adapter, Endpoint, PreparedBody, StreamTap
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    a.family: a for a in (OpenAIAdapter(), AnthropicAdapter(), GeminiAdapter())
}

__all__ = ["ADAPTERS", "Adapter", "Endpoint", "PreparedBody", "StreamTap"]
