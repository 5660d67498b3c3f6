"""``GET /api/events``: a server-sent event each time records are written, so an open
dashboard refreshes without polling the engine. Events are coalesced: a burst of calls
is one event carrying the latest sequence number."""

from __future__ import annotations

import asyncio

from aiohttp import web

PING_SECONDS = 15.0  # a comment line this often keeps proxies and browsers from timing out


class Changes:
    """A counter of records written and the streams waiting for the next one."""

    def __init__(self) -> None:
        self.seq = 0
        self.closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """The proxy is stopping: every stream ends now, rather than hold up the shutdown
        (which waits for open handlers) until its timeout."""
        self.closed = True
        self._wake()

    def notify(self) -> None:
        """One more record: wake every waiting stream (called on the event loop)."""
        self.seq += 1
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait(self, seen: int, timeout: float) -> bool:
        """Until a record after ``seen`` is written (True) or ``timeout`` passes (False)."""
        if self.seq > seen or self.closed:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters.discard(fut)
        return True


async def stream_events(request: web.Request, changes: Changes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    seen = changes.seq
    await resp.write(f'retry: 5000\nevent: hello\ndata: {{"seq": {seen}}}\n\n'.encode())
    try:
        while not changes.closed:
            if await changes.wait(seen, PING_SECONDS):
                if changes.closed:
                    break
                seen = changes.seq
                await resp.write(f'event: record\ndata: {{"seq": {seen}}}\n\n'.encode())
                await asyncio.sleep(0.25)  # coalesce a burst into one refresh
            else:
                await resp.write(b": ping\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the page was closed
    return resp
