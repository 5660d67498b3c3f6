"""Request bodies in and out: read as they arrive, digested for metering (huge ones in
a worker process, handed over through shared memory), and sent upstream in slices."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import aiohttp
from aiohttp import web

from proxy.providers import Endpoint
from proxy.web.bodies import OFFLOAD_BYTES, BodyDigest, digest_here, digest_offloaded
from proxy.web.bodies import digest as digest_body
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body. A huge one is read as it arrives and joined once, in a thread
    (``bytes.join`` releases the interpreter lock for big joins): aiohttp's ``read()``
    copies it whole three times on the event loop (~25 ms a copy for 28 MB)."""
    size = request.content_length
    if size is None or size <= OFFLOAD_BYTES:
        return await request.read()
    if size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    chunks: list[bytes] = []
    got = 0
    while chunk := await request.content.readany():
        got += len(chunk)
        if got > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=got)
        chunks.append(chunk)
    return await asyncio.get_running_loop().run_in_executor(None, b"".join, chunks)


async def digest_request(state: ProxyState, family: str, endpoint: Endpoint, raw: bytes) -> BodyDigest:
    if digest_here(raw):
        return digest_body(family, endpoint, raw)
    spilled = None
    try:
        pool = state.body_pool()
        loop = asyncio.get_running_loop()
        # Handed over through shared memory, written from a thread: pickling the body into
        # the worker's pipe copies it with the interpreter lock held (~40 ms for 28 MB),
        # stalling every other call; a file write releases the lock.
        spilled = await loop.run_in_executor(None, _spill, raw)
        if spilled is not None:
            return await loop.run_in_executor(pool, _digest_spilled, family, endpoint, spilled)
        return await loop.run_in_executor(pool, digest_offloaded, family, endpoint, raw)
    except (OSError, RuntimeError, BrokenProcessPool) as e:
        log.warning("body digest worker unavailable (%s): digesting on the event loop", type(e).__name__)
        return digest_body(family, endpoint, raw)
    finally:
        if spilled is not None:
            try:
                os.unlink(spilled)
            except OSError:
                pass


_SHM = "/dev/shm"


def _spill(raw: bytes) -> str | None:
    """``raw`` in a new file in shared memory (never on disk); None when there is none
    or it is full (the body is then pickled to the worker as before)."""
    if not os.path.isdir(_SHM):
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="lcp-body-", dir=_SHM)  # 0600: the caller's prompt
    except OSError:
        return None
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return path


def _digest_spilled(family: str, endpoint: Endpoint, path: str) -> BodyDigest:
    """The worker-process entry point for a spilled body."""
    with open(path, "rb") as f:
        raw = f.read()
    return digest_offloaded(family, endpoint, raw)


def upload_body(body: bytes) -> Any:
    """The body as sent upstream. A huge one is written in slices: handed over as bytes
    (or as io.BytesIO), aiohttp copies it whole on the event loop (~25 ms a copy for
    28 MB), stalling every other call."""
    if not body:
        return None
    return _SlicedBody(body) if len(body) > OFFLOAD_BYTES else body


class _SlicedBody(aiohttp.payload.Payload):
    """Bytes written to the connection a slice at a time, flow-controlled (each write
    waits for the socket to drain); a Content-Length like plain bytes, and replayable
    if aiohttp retries on a stale pooled connection."""

    _autoclose = True  # memory only, nothing to close
    _SLICE = 1 << 18

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/octet-stream")
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for i in range(0, len(view), self._SLICE):
            await writer.write(view[i : i + self._SLICE])
