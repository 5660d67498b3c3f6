"""Without auth or budgets nothing before forwarding needs to know who is calling, so the
proxy attributes a call as it records it (web/forward.py _check_body), after a stream's
first byte. However the call ends, its record still says whose it was."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.support.config import CLIENT_OPENAI_KEY, make_config
from tests.support.ports import free_port
from tests.support.provider_replies import openai_chat

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "user": "body-user"}
HEADERS = {
    "Authorization": f"Bearer {CLIENT_OPENAI_KEY}",
    "x-user-id": "u-7",
    "x-session-id": "s-1",
    "x-feature": "search",
    "x-tag-team-area": "billing",
}


def assert_attributed(rec: dict) -> None:
    assert rec["user_id"] == "u-7"  # the header wins over the body's user
    assert rec["session_id"] == "s-1"
    assert rec["tags"] == {"feature": "search", "team-area": "billing"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_that_succeeds_is_attributed(stream, mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={**BODY, "stream": stream}, headers=HEADERS) as r:
        assert r.status == 200
        await r.read()
    [rec] = await proxy.records()
    assert rec["status"] == 200 and rec["is_streaming"] is stream and rec["total_cost"] is not None
    assert_attributed(rec)
    [sent] = mock.requests
    assert not {"x-user-id", "x-session-id", "x-feature", "x-tag-team-area"} & {h.lower() for h in sent.headers}


async def test_a_call_whose_upstream_is_unreachable_is_attributed(start_proxy, http):
    proxy = await start_proxy(make_config(f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    async with http.post(f"{proxy.url}/openai/v1/chat/completions", json=BODY, headers=HEADERS) as r:
        assert r.status == 502
    [rec] = await proxy.records()
    assert rec["status"] == 502
    assert_attributed(rec)


async def test_a_call_the_client_gives_up_on_is_attributed(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=5))
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            f"{proxy.url}/openai/v1/chat/completions", json=BODY, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=0.3)
        ) as r:
            await r.read()
    [rec] = await proxy.records()
    assert rec["status"] == 499
    assert_attributed(rec)


async def test_a_stream_cut_by_its_client_is_attributed(mock, proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock, first_gap=3))
    r = await http.post(f"{proxy.url}/openai/v1/chat/completions", json={**BODY, "stream": True}, headers=HEADERS)
    assert b"chat.completion.chunk" in await r.content.readuntil(b"\n\n")
    r.close()
    await asyncio.wait_for(mock.disconnected.wait(), 3)
    [rec] = await proxy.records()
    assert rec["status"] == 200 and "disconnect" in rec["error"]
    assert_attributed(rec)
