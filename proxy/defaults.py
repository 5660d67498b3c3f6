"""Default values the proxy and its tools share; imports nothing from proxy (nor aiohttp)."""

from __future__ import annotations

import os

DEFAULT_LOG = "logs/cost-tracking.jsonl"


def default_log_path() -> str:
    """The JSONL log: ``$COST_TRACKING_FILE``, else ``DEFAULT_LOG``."""
    return os.environ.get("COST_TRACKING_FILE") or DEFAULT_LOG
