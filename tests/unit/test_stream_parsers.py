"""Property tests of the stream parsers: any chunking and any mix of line endings must
give what a whole-stream reading gives (WHATWG EventSource rules for SSE, json.loads
for streamed JSON arrays), and SSE re-framing must keep the stream byte for byte."""

from __future__ import annotations

import json
import random
from typing import Iterable, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.sse import JSONArrayStreamParser, SSEEvent, SSEParser, parse_event_block
from proxy.providers import ADAPTERS

TERMINATORS = ("\n", "\r\n", "\r")
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the reference: WHATWG "interpreting an event stream", over the whole stream ------


def reference_events(stream: bytes) -> list[tuple[str | None, str]]:
    """(event type, data) of every dispatched event, the default type as None.

    One deliberate extension, the proxy's flush: an event the stream ends without
    terminating is still dispatched (the spec discards it), because a server that
    closes early may have sent the usage in it.
    """
    text = stream.decode("utf-8", "replace")
    lines: list[str] = []
    line_start = i = 0
    while i < len(text):
        if text[i] in "\r\n":
            lines.append(text[line_start:i])
            if text[i] == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1  # CRLF is one terminator
            line_start = i + 1
        i += 1
    if line_start < len(text):
        lines.append(text[line_start:])
    lines.append("")  # the flush extension: end of stream dispatches like an empty line

    out: list[tuple[str | None, str]] = []
    data_buffer, event_type = "", ""
    for line in lines:
        if line == "":
            if data_buffer:
                out.append((event_type or None, data_buffer[:-1]))
            data_buffer, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "data":
            data_buffer += value + "\n"
        elif name == "event":
            event_type = value
        # id, retry and unknown fields do not change what is dispatched
    return out


def test_reference_parser_on_the_spec_examples():
    assert reference_events(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [(None, "YHOO\n+2\n10")]
    spec = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    assert reference_events(spec) == [(None, "first event"), (None, "second event"), (None, " third event")]
    assert reference_events(b"data\n\ndata\ndata\n\n") == [(None, ""), (None, "\n")]
    assert reference_events(b"data:test\n\ndata: test\n\n") == [(None, "test"), (None, "test")]
    assert reference_events(b"event: add\ndata: 73857293\n\nevent: remove\n\n") == [("add", "73857293")]
    assert reference_events(b"data: a\r\rdata: b\r\n\r\n") == [(None, "a"), (None, "b")]
    assert reference_events(b"data: a\r\ndata: b") == [(None, "a\nb")]


# --- generating streams ----------------------------------------------------------------

# Characters a line parser could trip on: field separators, spaces, and the code points
# str.splitlines() would wrongly end a line at.
# The Unicode category of lone surrogates; typed, as mypy cannot infer the literal
# through hypothesis's decorated st.characters().
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_TRICKY = st.sampled_from([" ", ":", "a", "é", "€", "😀", "\u2028", "\x85", "\x0b", "\x0c", "\x1c", "\x00", "\ufeff", "\t"])
# Lists of characters, not st.text(): text() merges its alphabet into code point ranges
# and would almost never draw the few characters above.
TEXT = st.lists(_TRICKY | st.characters(blacklist_categories=SURROGATES, blacklist_characters="\r\n"), max_size=10).map("".join)
SEP = st.sampled_from([":", ": ", ":  "])


def _field(name: str, value: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[str]:
    return st.builds(lambda sep, v: name + sep + v, SEP, value) | st.just(name)


DATA_LINE = _field("data")
LINE = st.one_of(
    DATA_LINE,
    _field("event"),
    st.builds(lambda t: ":" + t, TEXT) | st.just(": keep-alive"),
    _field("id"),
    _field("retry", st.integers(0, 10**6).map(str)),
    st.builds(lambda n, t: n + ": " + t, st.sampled_from(["foo", "Data", "data ", " data", "events", "DATA"]), TEXT),
)
# What providers send (a name, then data lines) next to anything the grammar allows.
TYPICAL_BLOCK = st.builds(
    lambda name, data, extra: ([f"event: {name}"] if name is not None else []) + data + extra,
    st.none() | TEXT,
    st.lists(DATA_LINE, min_size=1, max_size=3),
    st.lists(LINE, max_size=1),
)
BLOCK = TYPICAL_BLOCK | st.lists(LINE, min_size=1, max_size=4)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Blocks of lines, each line and each blank line ended by a random terminator."""
    term = st.sampled_from(TERMINATORS)
    out: list[str] = []
    for lines in draw(st.lists(BLOCK, max_size=6)):
        for line in lines:
            out.append(line + draw(term))
        out.extend(draw(term) for _ in range(draw(st.sampled_from([1, 1, 1, 1, 2, 3]))))
    ending = draw(st.sampled_from(["terminated", "unterminated event", "unterminated line", "blank tail"]))
    if ending != "terminated":
        lines = draw(BLOCK)
        out.extend(line + draw(term) for line in lines[:-1])
        out.append(lines[-1] + (draw(term) if ending == "unterminated event" else ""))
        if ending == "blank tail":
            out.append(draw(st.sampled_from(["\n", "\r", " ", "\r\n"])))
    return "".join(out).encode()


def chunkings(stream: bytes, sizes: list[int]) -> Iterable[tuple[str, list[bytes]]]:
    yield "whole", [stream]
    yield "1-byte", [stream[i : i + 1] for i in range(len(stream))]
    # Every CRLF split between two reads: the CR alone must not be taken for a terminator.
    cuts = [0] + [i + 1 for i in range(len(stream) - 1) if stream[i : i + 2] == b"\r\n"] + [len(stream)]
    yield "crlf-split", [stream[a:b] for a, b in zip(cuts, cuts[1:])]
    chunks, i, k = [], 0, 0
    while i < len(stream):
        chunks.append(stream[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    yield "random", chunks


def run_sse(chunks: Iterable[bytes], **kwargs: bool) -> list[SSEEvent]:
    parser = SSEParser(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.flush()


def pairs(events: Iterable[SSEEvent]) -> list[tuple[str | None, str]]:
    return [(e.event, e.data) for e in events]


SIZES = st.lists(st.integers(1, 9), min_size=1, max_size=8)


# --- SSE properties --------------------------------------------------------------------


@PROPS
@given(stream=sse_streams(), sizes=SIZES)
def test_sse_any_chunking_parses_as_the_spec_reads_the_whole_stream(stream, sizes):
    expected = reference_events(stream)
    for how, chunks in chunkings(stream, sizes):
        assert pairs(run_sse(chunks)) == expected, how
        lean = run_sse(chunks, keep_raw=False)
        assert pairs(lean) == expected and all(e.raw == b"" for e in lean), how


@PROPS
@given(stream=sse_streams(), sizes=SIZES, rng=st.randoms(use_true_random=False))
def test_sse_reframing_is_byte_exact_and_each_raw_stands_alone(stream, sizes, rng):
    expected = reference_events(stream)
    for how, chunks in chunkings(stream, sizes):
        framed = run_sse(chunks, keep_comments=True)
        assert b"".join(e.raw for e in framed) == stream, how
        # Each raw re-parses to exactly its own event (or to nothing for a comment or
        # blank block): what the proxy forwards means what upstream meant.
        alone = [run_sse([e.raw]) for e in framed]
        assert all(len(a) <= 1 for a in alone), how
        assert all(pairs(a) == pairs([e]) for a, e in zip(alone, framed) if a), how
        assert [p for a in alone for p in pairs(a)] == expected, how
        # Leaving events out (the hidden usage chunk) must not change the others.
        kept = [(e, a) for e, a in zip(framed, alone) if rng.random() < 0.7]
        assert pairs(run_sse([b"".join(e.raw for e, _ in kept)])) == [p for _, a in kept for p in pairs(a)], how


@PROPS
@given(lines=st.lists(LINE, min_size=1, max_size=6), terms=st.lists(st.sampled_from(TERMINATORS), min_size=6, max_size=6))
def test_parse_event_block_splits_mixed_line_endings(lines, terms):
    block = "".join(line + t for line, t in zip(lines[:-1], terms)) + lines[-1]
    raw = block.encode()
    ev = parse_event_block(raw)
    expected = reference_events(raw + b"\n\n")
    assert ([] if ev is None else pairs([ev])) == expected
    if ev is not None:
        assert ev.raw == raw


# --- SSE regressions: boundaries that mix line endings -----------------------------------


@pytest.mark.parametrize("boundary", [b"\n\r\n", b"\r\n\r", b"\n\r", b"\r\n\n", b"\r\r\n", b"\r\n\r\n", b"\r\r", b"\n\n"])
@pytest.mark.parametrize("piece", [None, 1, 2, 3])
def test_sse_mixed_boundary_ends_the_event(boundary, piece):
    raw = b"event: a\ndata: 1" + boundary + b"data: 2" + boundary + b"data: [DONE]" + boundary
    chunks = [raw] if piece is None else [raw[i : i + piece] for i in range(0, len(raw), piece)]
    assert pairs(run_sse(chunks)) == [("a", "1"), (None, "2"), (None, "[DONE]")]
    framed = run_sse(chunks, keep_comments=True)
    assert b"".join(e.raw for e in framed) == raw


def test_sse_newline_crlf_boundary_keeps_the_openai_usage_chunk():
    # The symptom: with "\n\r\n" between events everything merged into one
    # event whose data was not JSON, so the usage chunk was never read.
    openai = ADAPTERS["openai"]
    ep = openai.endpoint("/v1/chat/completions", "POST")
    chunks = [
        {"id": "c1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
        {"id": "c1", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}},
    ]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\r\n" for c in chunks) + b"data: [DONE]\n\r\n"
    tap = openai.stream_tap(ep, True)
    parser = SSEParser(keep_comments=True)
    forwarded = [ev.raw for ev in parser.feed(raw) + parser.flush() if tap.on_event(ev.event, ev.data)]
    info = tap.result()
    assert (info.usage.input_tokens, info.usage.output_tokens, info.finish_reason) == (12, 2, "stop")
    assert tap.complete
    assert pairs(run_sse([b"".join(forwarded)])) == [(None, json.dumps(chunks[0])), (None, "[DONE]")]


def test_sse_crlf_is_one_terminator_even_split_between_reads():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # CR then LF is one line end, not an empty line
    assert pairs(parser.feed(b"data: b\r\n\r")) == [(None, "a\nb")]
    # The LF completing that CRLF opens the next block as an empty line: no event.
    assert parser.feed(b"\n") == []
    assert pairs(parser.feed(b"data: c\r\r")) == [(None, "c")]
    assert parser.flush() == []


def test_sse_named_event_without_data_dispatches_nothing():
    assert pairs(run_sse([b"event: ping\n\nevent:\ndata: x\n\n"])) == [(None, "x")]
    assert pairs(run_sse([b"event: ping\n\n"], keep_comments=True)) == [(None, "")]  # kept for re-framing only


def test_sse_flush_keeps_a_blank_tail_for_reframing():
    framed = run_sse([b"data: a\n\n", b"\r"], keep_comments=True)
    assert b"".join(e.raw for e in framed) == b"data: a\n\n\r"
    assert run_sse([b"data: a\n\n", b" \n"]) == run_sse([b"data: a\n\n"])


# --- JSON arrays -------------------------------------------------------------------------

JSON_TEXT = st.lists(st.sampled_from('"\\[]{},:/u 0\n\t\x00é😀\u2028') | st.characters(blacklist_categories=SURROGATES), max_size=8).map(
    "".join
)
JSON_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(JSON_TEXT, kids, max_size=4),
    max_leaves=12,
)
ELEMENT = st.dictionaries(JSON_TEXT, JSON_VALUE, max_size=4) | st.lists(JSON_VALUE, max_size=3)
WHITESPACE = ["", "", "", " ", "\n", "\r\n", "\t", "  \n  "]


def dump(value: object, rng: random.Random, ascii_only: bool) -> str:
    """JSON with random whitespace between all tokens."""

    def ws() -> str:
        return rng.choice(WHITESPACE)

    if isinstance(value, dict):
        items = (
            ws() + json.dumps(k, ensure_ascii=ascii_only) + ws() + ":" + ws() + dump(v, rng, ascii_only) + ws() for k, v in value.items()
        )
        return "{" + ",".join(items) + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + dump(v, rng, ascii_only) + ws() for v in value) + ws() + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def run_json(chunks: Iterable[bytes]) -> list[bytes]:
    parser = JSONArrayStreamParser()
    out: list[bytes] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def json_chunkings(raw: bytes, sizes: list[int]) -> Iterable[tuple[str, list[bytes]]]:
    yield from chunkings(raw, sizes)
    # An escape split from the byte it escapes.
    cuts = [0] + [i + 1 for i in range(len(raw)) if raw[i] == 0x5C] + [len(raw)]
    yield "after-backslash", [raw[a:b] for a, b in zip(cuts, cuts[1:])]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elements=st.lists(ELEMENT, max_size=5), rng=st.randoms(use_true_random=False), ascii_only=st.booleans(), sizes=SIZES)
def test_json_array_any_chunking_yields_the_elements(elements, rng, ascii_only, sizes):
    raw = (rng.choice(WHITESPACE) + dump(elements, rng, ascii_only) + rng.choice(WHITESPACE)).encode()
    expected = json.loads(raw)
    for how, chunks in json_chunkings(raw, sizes):
        out = run_json(chunks)
        assert [json.loads(o) for o in out] == expected, how
        assert all(o[:1] in (b"{", b"[") and o[-1:] in (b"}", b"]") for o in out), how


def test_json_array_escape_at_the_end_of_a_read():
    raw = b'[{"a": "x\\"]}\\\\", "b": [1, {"c": "\\u005c"}]}, [{"d": "]"}]]'
    for cut in range(1, len(raw)):
        assert [json.loads(o) for o in run_json([raw[:cut], raw[cut:]])] == json.loads(raw), cut


def test_json_top_level_object_is_one_element():
    raw = b'{"candidates": [{"content": {"parts": [{"text": "}"}]}}], "usageMetadata": {"totalTokenCount": 3}}'
    assert run_json([raw[i : i + 1] for i in range(len(raw))]) == [raw]
