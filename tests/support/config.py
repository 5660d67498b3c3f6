"""The keys and prices of the standard test config, and the config itself: every
provider family twice (client key passes through / the proxy's own key), plus an
OpenAI-compatible server under its own name."""

from __future__ import annotations

from typing import Any

CLIENT_OPENAI_KEY = "sk-test-client-0123456789abcdefXYZ"
CLIENT_ANTHROPIC_KEY = "sk-ant-test-client-0123456789abcdef"
CLIENT_GEMINI_KEY = "AIzaTestClientKey0123456789abcdef"
PROXY_OPENAI_KEY = "sk-proxy-configured-9876543210fedcba"
PROXY_ANTHROPIC_KEY = "sk-ant-proxy-configured-9876543210"
PROXY_GEMINI_KEY = "AIzaProxyConfiguredKey9876543210"
ALL_KEYS = (CLIENT_OPENAI_KEY, CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, PROXY_OPENAI_KEY, PROXY_ANTHROPIC_KEY, PROXY_GEMINI_KEY)

# USD per 1M tokens, from docs/providers.md §7 (the same as config.yml).
OPENAI_MODELS = {
    "gpt-4o": {"pricing": {"input": 2.50, "output": 10.00, "cached_input": 1.25}},
    "gpt-5": {
        "pricing": {
            "input": 1.25,
            "output": 10.00,
            "cached_input": 0.125,
            "service_tiers": {"flex": {"input": 0.625, "output": 5.00, "cached_input": 0.0625}},
        }
    },
    "o4-mini": {"pricing": {"input": 1.10, "output": 4.40, "cached_input": 0.275}},
    "text-embedding-3-small": {"pricing": {"input": 0.02, "output": 0}},
    "gpt-3.5-turbo-instruct": {"pricing": {"input": 1.50, "output": 2.00}},
}
ANTHROPIC_MODELS = {
    "claude-sonnet-4-5": {
        "pricing": {"input": 3.00, "output": 15.00, "cached_input": 0.30, "cache_write": 3.75, "cache_write_1h": 6.00, "web_search": 10}
    },
    "claude-haiku-4-5": {
        "pricing": {"input": 1.00, "output": 5.00, "cached_input": 0.10, "cache_write": 1.25, "cache_write_1h": 2.00, "web_search": 10}
    },
    "claude-opus-4-1": {
        "pricing": {"input": 15.00, "output": 75.00, "cached_input": 1.50, "cache_write": 18.75, "cache_write_1h": 30.00, "web_search": 10}
    },
}
GEMINI_MODELS = {
    "gemini-2.5-flash": {"pricing": {"input": 0.30, "output": 2.50, "cached_input": 0.03}},
    "gemini-2.5-pro": {
        "pricing": {
            "input": 1.25,
            "output": 10.00,
            "cached_input": 0.125,
            "tiers": [{"above": 200000, "input": 2.50, "output": 15.00, "cached_input": 0.25}],
        }
    },
}


def make_config(upstream: str, server: dict | None = None, catalog: bool = False, **extra_providers: dict) -> dict:
    """Every family twice: without api_key (client key passes) and with one (``*-keyed``).
    The genai-prices catalog is off unless asked for: only the prices below apply."""
    providers: dict[str, Any] = {
        "openai": {"base_url": upstream, "models": OPENAI_MODELS},
        "openai-keyed": {"type": "openai", "base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
        "anthropic": {"base_url": upstream, "models": ANTHROPIC_MODELS},
        "anthropic-keyed": {"type": "anthropic", "base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
        "gemini": {"base_url": upstream, "models": GEMINI_MODELS},
        "gemini-keyed": {"type": "gemini", "base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
        # An OpenAI-compatible server under its own name and price table.
        "compat": {
            "type": "openai",
            "base_url": upstream + "/compat",
            "models": {"gpt-4o-mini": {"pricing": {"input": 0.15, "output": 0.60, "cached_input": 0.075}}},
        },
    }
    providers.update(extra_providers)
    cfg: dict[str, Any] = {"providers": providers, "catalog": {"enabled": catalog}}
    if server:
        cfg["server"] = server
    return cfg
