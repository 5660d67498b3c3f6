"""Listening sockets, the event loop and logging set up for ``serve`` and its workers."""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import socket
import sys

from proxy.errors import UsageError

BACKLOG = 128  # aiohttp's own default


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def event_loop(choice: str) -> asyncio.AbstractEventLoop | None:
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


def listen(host: str, port: int, *, reuse_port: bool = False, backlog: int | None = BACKLOG) -> list[socket.socket]:
    """Listening sockets for ``host:port``, made before anything else starts: a port in
    use is one clear line, not a failure after the banner, and ``--port 0`` gets the
    port the banner then names. Connections made during start-up wait in the backlog.

    ``reuse_port``: SO_REUSEPORT, so each of ``serve --workers N`` listens on the port
    with a socket of its own and the kernel spreads connections over them.
    ``backlog=None``: bound, not listening (the supervisor's hold on the port: a socket
    that does not listen is given no connections)."""
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
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            if backlog is not None:
                sock.listen(backlog)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UsageError(_bind_error(host, port, e)) from None
    return socks
