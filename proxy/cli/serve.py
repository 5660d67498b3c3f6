"""``python -m proxy serve`` (the default command): run the cost-tracking proxy."""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import socket
import sys
from pathlib import Path

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import config_option, log_file_option
from proxy.config import Config, client_base_path, load_config
from proxy.errors import ConfigError, UsageError
from proxy.web.app import create_app, run_app

log = logging.getLogger("proxy")
BACKLOG = 128  # aiohttp's own default


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


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another proxy running?): stop it or pass --port N"
    where = f"cannot listen on {host}:{port}: {e.strerror or e}"
    if e.errno == errno.EACCES and 0 < port < 1024:
        return f"{where} (ports below 1024 need privileges): pass --port N"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where} (not an address of this machine): pass --host ADDRESS"
    return where


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port``, made before anything else starts: a port in
    use is one clear line, not a failure after the banner, and ``--port 0`` gets the
    port the banner then names. Connections made during start-up wait in the backlog."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}: {e.strerror}") from None
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    if port == 0:
        addresses = addresses[:1]  # one random port, not a different one per address
    socks: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does on POSIX
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UsageError(_bind_error(host, port, e)) from None
    return socks


def _log_error(log_file: str, e: OSError) -> str:
    reason = e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        # mkdir of a parent that is a file says "File exists": name the file instead.
        for parent in Path(log_file).parents:
            if parent.exists() and not parent.is_dir():
                reason = f"{parent} is a file, not a directory"
                break
    return f"cannot open the cost log {log_file}: {reason}"


def _keys_error(config: Config, e: ConfigError) -> ConfigError | UsageError:
    """A keys file that cannot be read, said as the keys file (auth.keys_file)."""
    if config.auth is None or e.path != str(config.auth.keys_file):
        return e
    inner = f"{e.key}: {e.reason}" if e.key else e.reason
    return UsageError(f"keys file {e.path} (auth.keys_file in {config.path}): {inner}")


def banner(config: Config, base: str, log_file: str) -> list[str]:
    """The lines serve prints at start-up: where it listens, where calls are logged,
    and per provider the base URL a client's SDK takes."""
    where = f"logging to {log_file}" if config.cost_tracking else None
    lines = [f"llm-cost-proxy on {base}, {where}" if where else f"llm-cost-proxy on {base} (cost tracking off: no log is written)"]
    for name, p in config.providers.items():
        lines.append(f"  {name:<12} {base}{client_base_path(p)} -> {p.base_url} ({p.type}, {len(p.models)} priced models)")
    return lines


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="the config file")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=9002, show_default=True, help="port to listen on (0: any free port)")
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
    event_loop = _event_loop(loop)
    socks = listen(host, port)
    try:
        _setup_logging(verbose)
        try:
            app = create_app(cfg, log_file, host=host)
        except OSError as e:
            raise UsageError(_log_error(log_file, e)) from None
        except ConfigError as e:
            raise _keys_error(cfg, e) from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    base = f"http://{_url_host(host)}:{socks[0].getsockname()[1]}"
    for line in banner(cfg, base, log_file):
        log.info("%s", line)
    run_app(app, loop=event_loop, sockets=socks, shutdown_timeout=cfg.shutdown_timeout)
    return 0
