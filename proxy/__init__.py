"""llm-cost-proxy: a metering reverse proxy for LLM APIs."""

__version__ = "0.1.0"
