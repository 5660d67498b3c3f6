"""Command line: ``python -m proxy`` serves; ``python -m proxy COMMAND`` runs a tool."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from proxy.config import load_config
from proxy.defaults import default_log_path
from proxy.errors import ConfigError
from proxy.web.app import create_app, run_app

log = logging.getLogger("proxy")

# Subcommands register here: name -> (help, function(argv) -> exit code).
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}


def command(name: str, help: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    def register(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        COMMANDS[name] = (help, fn)
        return fn

    return register


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="Run the cost-tracking proxy.",
        epilog="Tools: " + ", ".join(f"{n} ({h})" for n, (h, _) in sorted(COMMANDS.items())),
    )
    parser.add_argument("--config", default="config.yml", help="config file (default: ./config.yml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9002, help="port (default: 9002)")
    parser.add_argument("--log-file", default=None, help="JSONL log (default: $COST_TRACKING_FILE or logs/cost-tracking.jsonl)")
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (auto), or the standard one",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    log_path = args.log_file or default_log_path()
    try:
        app = create_app(config, log_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot open the cost log {log_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    log.info("llm-cost-proxy on %s, logging to %s%s", base, log_path, "" if config.cost_tracking else " (cost tracking off)")
    for name, p in config.providers.items():
        suffix = "/v1" if p.type == "openai" else ""
        log.info("  %-12s %s/%s%s -> %s (%s, %d priced models)", name, base, name, suffix, p.base_url, p.type, len(p.models))
    loop = None
    if args.loop != "asyncio":
        try:
            import uvloop  # optional: a faster event loop, the `fast` extra
        except ImportError:
            if args.loop == "uvloop":
                print("error: --loop uvloop: uvloop is not installed (pip install uvloop)", file=sys.stderr)
                return 2
        else:
            loop = uvloop.new_event_loop()
    run_app(app, loop=loop, host=args.host, port=args.port, shutdown_timeout=config.shutdown_timeout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Importing a tool's module registers its command; kept out of `serve`'s start-up path.
    for name in ("budgets", "keys", "pricing_commands", "report", "reprice"):
        importlib.import_module(f"proxy.cli.{name}" if name in ("budgets", "keys") else f"proxy.{name}")
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][1](argv[1:])
    return serve(argv)
