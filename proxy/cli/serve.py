"""``python -m proxy serve`` (the default command): run the cost-tracking proxy."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import config_option, log_file_option
from proxy.config import load_config
from proxy.errors import UsageError
from proxy.web.app import create_app, run_app

log = logging.getLogger("proxy")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _event_loop(choice: str) -> asyncio.AbstractEventLoop | None:
    """uvloop when asked for or (auto) when installed; None: asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")  # optional: the `fast` extra
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="the config file")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=9002, show_default=True, help="port to listen on")
@log_file_option(help="the JSONL cost log to append to")
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="event loop: uvloop when installed (auto), or the standard one",
)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def serve(config: str, host: str, port: int, log_file: str, loop: str, verbose: bool) -> int:
    """Run the cost-tracking proxy."""
    cfg = load_config(config)
    _setup_logging(verbose)
    try:
        app = create_app(cfg, log_file)
    except OSError as e:
        raise UsageError(f"cannot open the cost log {log_file}: {e.strerror or e}") from None
    event_loop = _event_loop(loop)
    base = f"http://{host}:{port}"
    log.info("llm-cost-proxy on %s, logging to %s%s", base, log_file, "" if cfg.cost_tracking else " (cost tracking off)")
    for name, p in cfg.providers.items():
        suffix = "/v1" if p.type == "openai" else ""
        log.info("  %-12s %s/%s%s -> %s (%s, %d priced models)", name, base, name, suffix, p.base_url, p.type, len(p.models))
    run_app(app, loop=event_loop, host=host, port=port, shutdown_timeout=cfg.shutdown_timeout)
    return 0
