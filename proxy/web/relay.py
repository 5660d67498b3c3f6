"""Streamed replies relayed as they arrive, a copy of every event to the adapter's tap;
the last bytes held back until the call's record is written."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.core.records import json_default
from proxy.core.redaction import StreamRedactor
from proxy.core.reply_cost import RECORD_ID_HEADER, comment_line, insert_comment
from proxy.core.sse import JSONArrayStreamParser, SSEParser
from proxy.core.usage import CallInfo
from proxy.providers.base import StreamTap
from proxy.web.calls import Call
from proxy.web.headers import response_headers

# After a stream's final event, how long to wait for the upstream to end it before
# writing the record and sending the rest (normally the end follows at once).
_TAIL_WAIT = 1.0


def tap_result(tap: StreamTap, call: Call) -> CallInfo:
    try:
        info: CallInfo = tap.result()
        return info
    except Exception as e:
        return CallInfo(usage_error=f"unreadable stream: {type(e).__name__}")


class _Relay:
    """Feeds each chunk to the stream's parser and tap; returns the bytes to relay.
    A tap that raises loses its metering for the call, never the client's bytes."""

    __slots__ = ("parser", "tap", "sse", "filtering", "broken")

    def __init__(self, tap: StreamTap, sse: bool, filtering: bool) -> None:
        # When re-framing, comment blocks (keep-alives) must be re-emitted too.
        self.parser: Any = SSEParser(keep_comments=filtering, keep_raw=filtering) if sse else JSONArrayStreamParser()
        self.tap, self.sse, self.filtering = tap, sse, filtering
        self.broken: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        tap = self.tap
        if self.filtering:
            out = []
            for ev in self.parser.feed(chunk):
                keep = True
                try:
                    keep = tap.on_event(ev.event, ev.data)
                except Exception as e:
                    self.broken = type(e).__name__
                if keep:
                    out.append(ev.raw)
            return b"".join(out)
        try:
            if self.sse:
                for ev in self.parser.feed(chunk):
                    tap.on_event(ev.event, ev.data)
            else:
                for element in self.parser.feed(chunk):
                    tap.on_element(element)
        except Exception as e:
            self.broken = type(e).__name__
        return chunk

    def flush(self) -> bytes:
        if not self.sse:
            return b""
        out = []
        for ev in self.parser.flush():
            keep = True
            try:
                keep = self.tap.on_event(ev.event, ev.data)
            except Exception as e:
                self.broken = type(e).__name__
            if keep and self.filtering:
                out.append(ev.raw)
        return b"".join(out)


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: Call,
    tap: StreamTap,
    sse: bool,
    hide_usage_chunk: bool,
) -> web.StreamResponse:
    """Pass the stream through as it arrives; the tap reads a copy of every event.

    Once the stream's final event is in, what is left is held until the upstream ends
    the stream, the record is written, and only then do the last bytes go out: a client
    never holds a complete reply whose record could still be lost."""
    secret = call.provider.api_key
    response = web.StreamResponse(status=upstream.status, headers=response_headers(upstream, secret))
    replies = call.state.config.replies
    if replies.cost_headers and call.state.writer is not None:
        response.headers[RECORD_ID_HEADER] = call.record_id
    # The cost goes in a comment line near the end, for clients that skip comments.
    comment = sse and replies.stream_comment and call.adapter.stream_comments and call.state.writer is not None
    relay = _Relay(tap, sse, sse and hide_usage_chunk)
    redactor = StreamRedactor(secret.encode()) if secret else None
    content = upstream.content
    held: list[bytes] | None = None
    line_start = True  # the bytes sent so far end a line (where a comment may begin)
    try:
        while True:
            if held is None or content.is_eof():
                # Usually the upstream's end arrives with its final event: nothing to
                # wait for, and no timer to pay for on every stream.
                chunk = await content.readany()
            else:
                try:
                    chunk = await asyncio.wait_for(content.readany(), _TAIL_WAIT)
                except asyncio.TimeoutError:
                    # An upstream that lingers after its final event: record, release, go on.
                    await _record_stream(call, tap, relay)
                    await response.write(_with_cost(call, b"".join(held), comment, line_start))
                    held = None
                    continue
            if not chunk:
                break
            first = call.ttft is None
            if first:
                call.ttft = time.perf_counter()
            # Read the chunk before relaying it: if the client leaves on exactly the
            # chunk that carries the usage, the usage is still ours.
            out = relay.feed(chunk)
            if redactor is not None:
                out = redactor.feed(out)
            if first:
                # Headers go out with the first bytes: an upstream that stalls or breaks
                # before sending any still gets the client a clean 504/502, not a 200
                # followed by a second status line inside the body. Sent once the first
                # chunk is read (prepare sends them at once): the bytes follow at once.
                await response.prepare(request)
            if held is not None:
                held.append(out)
            elif tap.complete and not call.finished:
                held = [out]
            elif out:
                await response.write(out)
                line_start = out[-1:] in (b"\n", b"\r")
        tail = relay.flush()
        if redactor is not None:
            tail = redactor.feed(tail) + redactor.flush()
        if not tap.complete and upstream.status < 400:
            call.error = "upstream stream ended before its final event"
        if not response.prepared:
            await response.prepare(request)
        await _record_stream(call, tap, relay)
        if held is not None:
            # The comment goes in the last bytes: before the end marker when they hold it.
            await response.write(_with_cost(call, b"".join(held) + tail, comment, line_start))
        elif tail:
            await response.write(tail)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        call.error = "client disconnected mid-stream"
    except aiohttp.ClientPayloadError:
        if not response.prepared:
            raise  # nothing relayed yet: the caller answers 502
        call.error = "upstream closed the stream early"
        # Pass the cut on: ending our reply cleanly would tell the client the stream was
        # complete. Dropping the connection leaves its body unterminated, as upstream's was.
        if request.transport is not None:
            request.transport.abort()
    return response


def _with_cost(call: Call, last: bytes, comment: bool, line_start: bool) -> bytes:
    """The stream's last bytes, with the call's cost line when the stream is whole."""
    if not comment or call.record is None:
        return last
    line = comment_line(call.record, json_default)
    return insert_comment(last, line, call.adapter.stream_end, line_start)


async def _record_stream(call: Call, tap: StreamTap, relay: _Relay) -> None:
    if call.finished:
        return
    info = tap_result(tap, call)
    if relay.broken and info.usage_error is None:
        info = CallInfo(usage_error=f"unreadable stream event: {relay.broken}", request_id=info.request_id)
    call.info = info
    await call.written()
