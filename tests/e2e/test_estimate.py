"""Calls that end without reported usage still get tokens and a cost, marked estimated.

Expected counts come from the o200k vocabulary through bpe_openai directly, plus the
documented chat framing (3 tokens a message, each value encoded, 3 for the reply), not from proxy code.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import bpe_openai
import openai

from tests.support.config import CLIENT_OPENAI_KEY
from tests.support.mock_upstream import sse, stream_reply

O200K = bpe_openai.get_encoding("o200k_base")
PROMPT = "Summarise the plot of Hamlet in two sentences, please."
PIECES = ["Hamlet, prince of Denmark,", " seeks revenge on his uncle", " for his father's murder."]


def tokens(text: str) -> int:
    return len(O200K.encode(text))


def chunk(content: str | None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-e1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }


def gpt4o_cost(inp: int, out: int) -> Decimal:
    return (inp * Decimal("2.50") + out * Decimal("10.00")) / Decimal(1_000_000)


# OpenAI's count of one user message: 3 of framing, the role and the content encoded
# separately, 3 priming the reply (the cookbook's num_tokens_from_messages).
EXPECTED_INPUT = 3 + tokens("user") + tokens(PROMPT) + 3


async def test_client_abort_mid_stream_is_estimated_from_request_and_relayed_text(mock, proxy):
    # The upstream would go on for a long time; the client leaves after three chunks.
    events = sse([(None, chunk(p)) for p in PIECES])
    mock.on("/v1/chat/completions", stream_reply(mock, [*events, 30.0, *sse([(None, "[DONE]")])]))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}], stream=True)
    got = []
    async for c in stream:
        got.append(c.choices[0].delta.content)
        if len(got) == len(PIECES):
            break
    await stream.close()
    await asyncio.wait_for(mock.disconnected.wait(), 5)  # the upstream call was closed too
    [rec] = await proxy.records()
    assert got == PIECES
    assert rec["usage_source"] == "estimated" and "disconnect" in rec["error"]
    assert rec["output_tokens"] == tokens("".join(PIECES))
    assert rec["input_tokens"] == EXPECTED_INPUT
    assert Decimal(str(rec["total_cost"])) == gpt4o_cost(rec["input_tokens"], rec["output_tokens"])
    assert rec["pricing_source"] == "config"


async def test_server_that_ignores_include_usage_is_estimated(mock, proxy):
    # An OpenAI-compatible server that never sends the usage chunk we asked for.
    body = sse([(None, chunk(p)) for p in PIECES] + [(None, chunk(None, "stop")), (None, "[DONE]")])
    mock.on("/compat/v1/chat/completions", stream_reply(mock, body))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/compat/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    [rec] = await proxy.records()
    assert text == "".join(PIECES)
    assert mock.requests[0].json["stream_options"] == {"include_usage": True}
    assert (rec["status"], rec["error"], rec["usage_source"]) == (200, None, "estimated")
    assert rec["output_tokens"] == tokens(text) and rec["input_tokens"] == EXPECTED_INPUT
    expected = (rec["input_tokens"] * Decimal("0.15") + rec["output_tokens"] * Decimal("0.60")) / Decimal(1_000_000)
    assert Decimal(str(rec["total_cost"])) == expected


async def test_anthropic_stream_cut_after_message_start_keeps_reported_input(mock, http, proxy):
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_cut",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-haiku-4-5-20251001",
            "usage": {"input_tokens": 100, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000, "output_tokens": 1},
        },
    }
    deltas = [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}) for p in PIECES
    ]
    # The upstream closes the connection without message_delta / message_stop.
    mock.on("/v1/messages", stream_reply(mock, sse([("message_start", start), *deltas])))
    async with http.post(
        f"{proxy.url}/anthropic/v1/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": PROMPT}]},
        headers={"x-api-key": "sk-ant-x"},
    ) as r:
        await r.read()
    [rec] = await proxy.records()
    assert rec["input_tokens"] == 2100 and rec["cache_read_tokens"] == 2000  # as reported
    assert rec["output_tokens"] == tokens("".join(PIECES)) and rec["usage_source"] == "estimated"
    expected = (100 * Decimal(1) + 2000 * Decimal("0.10") + rec["output_tokens"] * Decimal(5)) / Decimal(1_000_000)
    assert Decimal(str(rec["total_cost"])) == expected
