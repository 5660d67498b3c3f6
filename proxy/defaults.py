"""Default values the proxy and its tools share; imports nothing from proxy (nor aiohttp)."""

from __future__ import annotations

import importlib.metadata
import os

DEFAULT_LOG = "logs/cost-tracking.jsonl"


def default_log_path() -> str:
    """The JSONL log: ``$COST_TRACKING_FILE``, else ``DEFAULT_LOG``."""
    return os.environ.get("COST_TRACKING_FILE") or DEFAULT_LOG


def version() -> str:
    """The installed package's version (``--version``, the ``GET /`` page)."""
    try:
        return importlib.metadata.version("llm-cost-proxy")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
