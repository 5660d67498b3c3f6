"""No JSON an upstream sends may break metering (docs/providers.md: "any optional field
may be missing or null", and upstreams are not always the real vendors).

Property tests over reply payloads and stream events of all three families, arbitrary
JSON and real reply shapes with random fields replaced by garbage: no exception escapes
the adapters, pricing or record building; every record is one valid JSON line; no cost
is negative; a usage the adapter did not believe is never priced. Then explicit
examples, the endpoint classification table, and the proxy end to end for the case
that used to turn an upstream 200 into a 500.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import fields
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal, Sequence

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from proxy.config import parse_config, pricebook_for
from proxy.core.records import CallContext, build_record, dumps_record
from proxy.core.usage import CallInfo, Usage
from proxy.pricing import PriceBook, price_call
from proxy.providers import ADAPTERS, Endpoint
from proxy.providers.base import MAX_TEXT_CHARS, MAX_TOKENS, error_message, json_safe, merge_usage
from proxy.web.bodies import UnreadableBody, parse_json
from tests.support.config import CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import dumps, raw_reply, sse, stream_reply, without_cost_comment
from tests.support.provider_replies import (
    FLASH_USAGE,
    GPT4O_USAGE,
    O4MINI_USAGE,
    SONNET_USAGE,
    anthropic_message,
    anthropic_stream_events,
    chat_chunks,
    chat_completion,
    gemini_response,
    gemini_stream_chunks,
    response_object,
    responses_stream_events,
)
from tests.support.records import TOKEN_FIELDS

FAMILIES = ("openai", "anthropic", "gemini")
WHEN = datetime(2026, 11, 22, tzinfo=timezone.utc)
COST_FIELDS = ("input_cost", "output_cost", "total_cost")
# Anthropic input is the sum of three counts, each at most MAX_TOKENS.
MAX_FIELD = 3 * MAX_TOKENS

# family -> path -> whether the reply can be a stream
PATHS: dict[str, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"),
    "anthropic": ("/v1/messages",),
    "gemini": (
        "/v1beta/models/gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        "/v1beta/models/gemini-embedding-001:embedContent",
        "/v1beta/tunedModels/my-tuned:generateContent",
    ),
}
# Models that resolve to a price (config.yml-like table, or the catalog) and ones that do not.
MODEL_NAMES = (
    "gpt-4o",
    "gpt-4o-2024-08-06",
    "gpt-5",
    "o4-mini",
    "text-embedding-3-small",
    "gpt-4o-mini",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-opus-4-1",
    "claude-3-5-haiku-latest",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.0-flash",
    "gemini-embedding-001",
    "models/gemini-2.5-pro",
    "no-such-model",
    "",
)


# --- strategies ------------------------------------------------------------------------

# Lone surrogates too: the proxy's lenient JSON fallback (bodies.parse_json) lets them through.
# Typed: mypy cannot infer the category literal through hypothesis's decorated st.characters().
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_TEXT = st.text(st.characters(exclude_categories=SURROGATES), max_size=12) | st.sampled_from(
    [
        "",
        "\n",
        "\u2028",
        "a\u2029b",
        "x\x85y",
        "\ud800",
        "a\udfffb",
        "\U0001f600",
        "x" * (MAX_TEXT_CHARS + 50),
        "flex",
        "priority",
        "batch",
        "fast",
        "default",
        "standard",
        "STOP",
        "ON_DEMAND_FLEX",
        "error",
        "12",
        "-5",
        "1e308",
        "NaN",
        *MODEL_NAMES,
    ]
)
_INTS = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 12, MAX_TOKENS, MAX_TOKENS + 1, 2**63, 2**64, 10**30, -(10**30), 10**400])
_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, -0.0, 0.5, 1.5, 12.0, -12.0, 1e9, 1e9 + 1, math.nan, math.inf, -math.inf]
)
_SCALARS = st.none() | st.booleans() | _INTS | _FLOATS | _TEXT
# Keys the adapters read, so that arbitrary objects reach their code paths.
_KNOWN_KEYS = (
    "id",
    "model",
    "object",
    "choices",
    "message",
    "delta",
    "content",
    "text",
    "parts",
    "tool_calls",
    "function",
    "name",
    "arguments",
    "finish_reason",
    "usage",
    "service_tier",
    "error",
    "message",
    "type",
    "code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens_details",
    "reasoning_tokens",
    "response",
    "status",
    "output",
    "incomplete_details",
    "reason",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "ephemeral_1h_input_tokens",
    "server_tool_use",
    "web_search_requests",
    "speed",
    "stop_reason",
    "candidates",
    "finishReason",
    "usageMetadata",
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
    "trafficType",
    "modelVersion",
    "responseId",
    "embedding",
)
_KEYS = st.sampled_from(_KNOWN_KEYS) | st.text(max_size=6)
JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)
# What goes where a token count belongs: mostly garbage, sometimes a fine count.
COUNTS: st.SearchStrategy[Any] = (
    _INTS | _FLOATS | st.none() | st.booleans() | st.sampled_from(["12", "", "1e3"]) | st.just([]) | st.just({})
)


def _reply_shapes(family: str, path: str) -> list[Any]:
    """Real reply shapes (tests/mock_upstream.py) for one endpoint."""
    if family == "openai":
        if path.endswith("chat/completions"):
            usage = {**GPT4O_USAGE, "prompt_tokens_details": {"cached_tokens": 8000, "cache_write_tokens": 100}}
            return [chat_completion(), chat_completion("gpt-5", usage), {**chat_completion(), "usage": None}]
        if path.endswith("/completions"):
            return [
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": "gpt-3.5-turbo-instruct",
                    "choices": [{"index": 0, "text": " world", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
            ]
        if path.endswith("embeddings"):
            return [
                {
                    "object": "list",
                    "model": "text-embedding-3-small",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456]}],
                    "usage": {"prompt_tokens": 1000, "total_tokens": 1000},
                }
            ]
        resp = response_object()
        resp["output"].append({"type": "web_search_call", "id": "ws_1", "status": "completed"})
        return [resp, response_object(status="incomplete", incomplete="max_output_tokens")]
    if family == "anthropic":
        usage = {
            **SONNET_USAGE,
            "speed": "fast",
            "server_tool_use": {"web_search_requests": 2},
            "output_tokens_details": {"thinking_tokens": 100},
        }
        return [
            anthropic_message(),
            anthropic_message("claude-opus-4-1", usage),
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ]
    if path.endswith("embedContent"):
        return [
            {"embedding": {"values": [0.1, 0.2]}, "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}},
            {"embedding": {"values": [0.1]}},
        ]
    return [
        gemini_response(usage={**FLASH_USAGE, "toolUsePromptTokenCount": 50, "trafficType": "ON_DEMAND_FLEX"}),
        gemini_response("gemini-2.5-pro", {"promptTokenCount": 250000, "candidatesTokenCount": 1000, "thoughtsTokenCount": 2000}),
        gemini_stream_chunks(),
    ]  # a stream read whole (no alt=sse) is one JSON array


def _stream_shapes(family: str, path: str) -> list[Sequence[tuple[str | None, Any]]]:
    """Real streams as (event name, payload) lists."""
    if family == "openai":
        if path.endswith("responses"):
            return [
                responses_stream_events(),
                responses_stream_events("response.incomplete", incomplete="max_output_tokens"),
                responses_stream_events("response.failed"),
            ]
        chunks = chat_chunks("gpt-4o-mini-2024-07-18", ["Hel", "lo"], GPT4O_USAGE, include_usage=True)
        return [[*((None, c) for c in chunks), (None, "[DONE]")]]
    if family == "anthropic":
        return [anthropic_stream_events(), anthropic_stream_events(error=True)]
    return [[(None, c) for c in gemini_stream_chunks()]]


def _containers(doc: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) place inside ``doc``."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            _containers(v, out)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            _containers(v, out)
    return out


@st.composite
def garbled(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` (a real shape) with a few fields replaced by garbage, made counts, or removed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        places = _containers(doc, [])
        # Token counts are a small share of a reply's fields: aim at them half the time.
        counts = [(c, k) for c, k in places if type(c[k]) is int]
        if counts:
            if draw(st.booleans()):
                places = counts
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(("json", "count", "count", "null", "delete")))
        if action == "delete":
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
        elif action == "null":
            container[key] = None
        else:
            container[key] = draw(JSON if action == "json" else COUNTS)
    return doc


def wire(value: Any) -> str:
    """JSON text as a lax upstream could send it: stdlib json writes ints beyond 64 bits,
    NaN and Infinity (which orjson then refuses: the adapters' not-JSON path)."""
    return json.dumps(value)


@st.composite
def reply_case(draw: st.DrawFn, family: str, garble: bool) -> tuple[str, Any]:
    path = draw(st.sampled_from(PATHS[family]))
    if garble:
        payload = draw(garbled(draw(st.sampled_from(_reply_shapes(family, path)))))
    else:
        payload = draw(JSON)
    return path, payload


_EVENT_NAMES = st.sampled_from(
    [
        None,
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_delta",
        "ping",
        "error",
        "response.created",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "response.output_text.delta",
        "response.in_progress",
        "x.delta",
        "unknown",
    ]
)


@st.composite
def stream_case(draw: st.DrawFn, family: str, garble: bool) -> tuple[str, list[tuple[str | None, str]]]:
    path = draw(st.sampled_from([p for p in PATHS[family] if family != "openai" or "embeddings" not in p]))
    if garble:
        shape = [list(ev) for ev in draw(st.sampled_from(_stream_shapes(family, path)))]  # tuples cannot be garbled
        events = draw(garbled(shape))
        if not isinstance(events, list):
            events = [events]
        out = []
        for ev in events:
            if isinstance(ev, (list, tuple)) and len(ev) == 2:
                name, payload = ev
                name = name if isinstance(name, str) or name is None else draw(_EVENT_NAMES)
            else:
                name, payload = draw(_EVENT_NAMES), ev
            out.append((name, payload if isinstance(payload, str) else wire(payload)))
        return path, out
    data = st.one_of(JSON.map(wire), _TEXT, st.just("[DONE]"))
    return path, draw(st.lists(st.tuples(_EVENT_NAMES, data), max_size=8))


# --- the pipeline, as proxy/web/calls.py's Call.finish runs it ------------------------


@lru_cache(maxsize=2)
def pricebook(catalog: bool) -> PriceBook:
    return pricebook_for(parse_config(make_config("http://127.0.0.1:1", catalog=catalog), "fuzz.yml"))


def check_info(info: CallInfo) -> None:
    """What every adapter result must look like, whatever the reply was."""
    assert isinstance(info, CallInfo)
    for name in ("response_model", "request_id", "finish_reason", "service_tier", "speed"):
        value = getattr(info, name)
        assert value is None or (isinstance(value, str) and 0 < len(value) <= MAX_TEXT_CHARS), (name, value)
    assert info.error is None or isinstance(info.error, str)
    if info.usage is not None:
        assert info.usage_error is None
        for f in fields(Usage):
            v = getattr(info.usage, f.name)
            assert type(v) is int and 0 <= v <= MAX_FIELD, (f.name, v)
    if info.usage_error is not None:
        assert info.usage is None
        assert info.usage_error.startswith("implausible usage: ") and len(info.usage_error) < 120
    orjson.dumps(info.raw_usage)  # json_safe: always writable


def meter(family: str, endpoint: Endpoint, info: CallInfo, *, catalog: bool, model: str | None, stream: bool = False) -> dict[str, Any]:
    """Price ``info`` and write its record as the proxy does; returns the parsed line."""
    check_info(info)
    ctx = CallContext(
        timestamp=WHEN.timestamp(),
        provider=family,
        family=family,
        endpoint="/fuzz",
        model=model,
        is_streaming=stream,
        metered=endpoint.kind is not None,
        billable=endpoint.billable,
    )
    usage, price, cost, variant = info.usage, None, None, None
    if usage is not None:
        priced = price_call(
            pricebook(catalog),
            provider=family,
            family=family,
            model=model,
            response_model=info.response_model,
            usage=usage,
            when=WHEN,
            service_tier=info.service_tier,
            speed=info.speed,
        )
        price, cost, variant = priced.price, priced.cost, priced.variant
        if cost is not None:
            assert cost.input_cost >= 0 and cost.output_cost >= 0, cost
    record = build_record(
        ctx,
        info,
        usage=usage,
        status=200,
        error=info.error,
        latency_ms=1.5,
        ttft_ms=None,
        usage_source="provider" if usage is not None else None,
        price=price,
        cost=cost,
        price_variant=variant,
    )
    if currently_in_test_context():  # pytest --hypothesis-show-statistics: what the inputs reached
        event(f"{family}: " + ("implausible" if info.usage_error else "priced" if cost else "unpriced" if usage else "no usage"))
    line = dumps_record(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line.splitlines()) == 1
    assert len(line.decode("utf-8").splitlines()) == 1, line  # U+2028, U+2029, U+0085 too
    rec = orjson.loads(line)
    assert isinstance(rec, dict)
    for f in COST_FIELDS:
        assert rec[f] is None or rec[f] >= 0, (f, rec[f])
    for f in TOKEN_FIELDS:
        assert rec[f] is None or (type(rec[f]) is int and 0 <= rec[f] <= 2 * MAX_FIELD), (f, rec[f])
    if info.usage_error is not None:
        assert all(rec[f] is None for f in COST_FIELDS), rec
        assert rec["usage_error"] == info.usage_error  # the short reason reaches the record
    return rec


def run_stream(family: str, path: str, events: list[tuple[str | None, str]], hide: bool) -> tuple[Endpoint, CallInfo]:
    adapter = ADAPTERS[family]
    endpoint = adapter.endpoint(path, "POST")
    tap = adapter.stream_tap(endpoint, hide)
    for name, data in events:
        assert tap.on_event(name, data) in (True, False)
        if family == "gemini":
            tap.on_element(data.encode("utf-8", "surrogatepass"))  # any bytes, valid UTF-8 or not
        check_info(tap.result())  # callable at any time, also mid-stream
    return endpoint, tap.result()


_FUZZ = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- properties ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@_FUZZ
@given(data=st.data(), catalog=st.booleans(), model=st.sampled_from(MODEL_NAMES))
def test_any_json_reply_is_metered_without_error(family, data, catalog, model):
    path, payload = data.draw(reply_case(family, garble=False))
    adapter = ADAPTERS[family]
    endpoint = adapter.endpoint(path, "POST")
    meter(family, endpoint, adapter.parse_reply(endpoint, payload), catalog=catalog, model=model or None)


@pytest.mark.parametrize("family", FAMILIES)
@_FUZZ
@given(data=st.data(), catalog=st.booleans(), model=st.sampled_from(MODEL_NAMES))
def test_almost_right_reply_is_metered_without_error(family, data, catalog, model):
    path, payload = data.draw(reply_case(family, garble=True))
    adapter = ADAPTERS[family]
    endpoint = adapter.endpoint(path, "POST")
    meter(family, endpoint, adapter.parse_reply(endpoint, payload), catalog=catalog, model=model or None)
    # As the proxy reads it: orjson (ints beyond 64 bits become floats), else the lenient
    # stdlib fallback (NaN, Infinity, huge ints, lone surrogates).
    try:
        wired = parse_json(wire(payload).encode("utf-8", "surrogatepass"))
    except UnreadableBody:
        return
    meter(family, endpoint, adapter.parse_reply(endpoint, wired), catalog=catalog, model=model or None)


@pytest.mark.parametrize("family", FAMILIES)
@_FUZZ
@given(data=st.data(), catalog=st.booleans(), hide=st.booleans(), model=st.sampled_from(MODEL_NAMES))
def test_any_stream_events_are_metered_without_error(family, data, catalog, hide, model):
    path, events = data.draw(stream_case(family, garble=False))
    endpoint, info = run_stream(family, path, events, hide)
    meter(family, endpoint, info, catalog=catalog, model=model or None, stream=True)


@pytest.mark.parametrize("family", FAMILIES)
@_FUZZ
@given(data=st.data(), catalog=st.booleans(), hide=st.booleans(), model=st.sampled_from(MODEL_NAMES))
def test_almost_right_stream_is_metered_without_error(family, data, catalog, hide, model):
    path, events = data.draw(stream_case(family, garble=True))
    endpoint, info = run_stream(family, path, events, hide)
    meter(family, endpoint, info, catalog=catalog, model=model or None, stream=True)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None)
@given(payload=JSON)
def test_free_and_billable_endpoints_survive_any_reply(family, payload):
    # The proxy does not parse these replies, but an adapter must not care which endpoint it is given.
    adapter = ADAPTERS[family]
    for endpoint in (Endpoint(None), Endpoint(None, billable=True)):
        check_info(adapter.parse_reply(endpoint, payload))
        tap = adapter.stream_tap(endpoint, False)
        tap.on_event(None, wire(payload))
        check_info(tap.result())


# --- explicit examples -----------------------------------------------------------------

openai, anthropic, gemini = ADAPTERS["openai"], ADAPTERS["anthropic"], ADAPTERS["gemini"]
CHAT = openai.endpoint("/v1/chat/completions", "POST")
MESSAGES = anthropic.endpoint("/v1/messages", "POST")
GENERATE = gemini.endpoint("/v1beta/models/gemini-2.5-flash:generateContent", "POST")


def test_non_string_model_in_a_200_chat_reply_is_priced_by_the_requested_model():
    info = openai.parse_reply(CHAT, {**chat_completion(), "model": 4, "id": ["x"], "service_tier": {"tier": "flex"}})
    assert (info.response_model, info.request_id, info.service_tier) == (None, None, None)
    assert info.usage is not None and info.usage.input_tokens == 10000
    rec = meter("openai", CHAT, info, catalog=False, model="gpt-4o")
    assert Decimal(str(rec["total_cost"])) == Decimal("0.02")


@pytest.mark.parametrize("model", [12.5, True, {"name": "gemini"}, ["gemini-2.5-flash"]])
def test_non_string_model_version_is_dropped(model):
    info = gemini.parse_reply(GENERATE, {**gemini_response(usage=FLASH_USAGE), "modelVersion": model, "responseId": 7})
    assert (info.response_model, info.request_id) == (None, None)
    rec = meter("gemini", GENERATE, info, catalog=False, model=GENERATE.model)
    assert Decimal(str(rec["total_cost"])) == Decimal("0.0034")


def test_object_service_tier_and_speed_are_ignored():
    usage = {**SONNET_USAGE, "service_tier": {"x": 1}, "speed": ["fast"]}
    info = anthropic.parse_reply(MESSAGES, anthropic_message(usage=usage))
    assert (info.service_tier, info.speed) == (None, None) and info.usage is not None


def test_long_strings_are_capped():
    info = openai.parse_reply(CHAT, {**chat_completion(), "model": "m" * 5000, "id": "i" * 5000})
    assert len(info.response_model) == len(info.request_id) == MAX_TEXT_CHARS


BAD_COUNTS = [
    (-5, "prompt_tokens=-5"),
    (1.5, "prompt_tokens=1.5"),
    ("12", "prompt_tokens='12'"),
    (True, "prompt_tokens=True"),
    (10**30, "prompt_tokens=1000000000000000000000000000000"),
    (1e308, "prompt_tokens=1e+308"),
    (math.nan, "prompt_tokens=nan"),
    (math.inf, "prompt_tokens=inf"),
    (MAX_TOKENS + 1, f"prompt_tokens={MAX_TOKENS + 1}"),
    ([1], "prompt_tokens=[...]"),
    ({"n": 1}, "prompt_tokens={...}"),
]


@pytest.mark.parametrize("count, reason", BAD_COUNTS)
def test_implausible_chat_count_leaves_the_call_unpriced(count, reason):
    info = openai.parse_reply(CHAT, chat_completion(usage={**GPT4O_USAGE, "prompt_tokens": count}))
    assert info.usage is None and info.usage_error == f"implausible usage: {reason}"
    assert info.response_model == "gpt-4o-2024-08-06"  # what could be read is kept
    assert info.raw_usage["completion_tokens"] == 500
    rec = meter("openai", CHAT, info, catalog=True, model="gpt-4o")
    assert rec["total_cost"] is None


def test_huge_counts_stay_in_raw_usage_as_text():
    info = openai.parse_reply(
        CHAT, chat_completion(usage={"prompt_tokens": 10**30, "completion_tokens": math.inf, "completion_tokens_details": {"x": -(10**25)}})
    )
    assert info.usage is None
    assert info.raw_usage == {"prompt_tokens": str(10**30), "completion_tokens": "inf", "completion_tokens_details": {"x": str(-(10**25))}}
    rec = meter("openai", CHAT, info, catalog=False, model="gpt-4o")
    assert rec["raw_usage"]["prompt_tokens"] == "1000000000000000000000000000000"


def test_integral_float_counts_are_whole_numbers():
    info = openai.parse_reply(CHAT, chat_completion(usage={"prompt_tokens": 12.0, "completion_tokens": 3.0, "total_tokens": -0.0}))
    assert info.usage_error is None and (info.usage.input_tokens, info.usage.output_tokens) == (12, 3)
    assert type(info.usage.input_tokens) is int


@pytest.mark.parametrize("field", ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"])
def test_negative_anthropic_counts_are_never_negative_money(field):
    info = anthropic.parse_reply(MESSAGES, anthropic_message(usage={**SONNET_USAGE, field: -100000}))
    assert info.usage is None and info.usage_error == f"implausible usage: {field}=-100000"
    assert meter("anthropic", MESSAGES, info, catalog=True, model="claude-sonnet-4-5")["total_cost"] is None


def test_nested_anthropic_and_gemini_counts_are_checked_too():
    usage = {**SONNET_USAGE, "cache_creation": {"ephemeral_1h_input_tokens": "2000"}}
    info = anthropic.parse_reply(MESSAGES, anthropic_message(usage=usage))
    assert info.usage_error == "implausible usage: cache_creation.ephemeral_1h_input_tokens='2000'"
    info = gemini.parse_reply(GENERATE, gemini_response(usage={**FLASH_USAGE, "thoughtsTokenCount": 7.25}))
    assert info.usage_error == "implausible usage: thoughtsTokenCount=7.25"


def test_usage_that_is_not_an_object_is_implausible_not_estimated():
    for bad in ("lots", 12, [GPT4O_USAGE], True):
        info = openai.parse_reply(CHAT, chat_completion(usage=bad))
        assert info.usage is None and info.usage_error and info.output_text is None, bad


def test_lists_and_strings_where_objects_go():
    chat = chat_completion(usage=GPT4O_USAGE)
    chat["usage"] = {**GPT4O_USAGE, "prompt_tokens_details": [8000], "completion_tokens_details": "x"}
    info = openai.parse_reply(CHAT, chat)
    assert info.usage.cache_read_tokens == 0 and info.usage.input_tokens == 10000
    no_usage = {"choices": [{"message": ["hi"], "tool_calls": 3}, {"message": {"tool_calls": [{"function": ["f"]}]}}]}
    assert openai.parse_reply(CHAT, no_usage).usage is None
    info = anthropic.parse_reply(MESSAGES, anthropic_message(usage={**SONNET_USAGE, "cache_creation": [1, 2]}))
    assert info.usage.cache_write_1h_tokens == 0
    info = gemini.parse_reply(
        GENERATE, {"candidates": [{"content": ["x"]}, {"content": {"parts": "abc"}}, "c"], "usageMetadata": {"promptTokenCount": 3}}
    )
    assert info.usage.input_tokens == 3


def test_stream_events_with_wrong_shapes():
    tap = anthropic.stream_tap(MESSAGES, False)
    for name, payload in (
        ("message_start", {"type": "message_start", "message": ["m"]}),
        ("content_block_delta", {"type": "content_block_delta", "delta": "text"}),
        ("message_delta", {"type": "message_delta", "delta": [], "usage": {"output_tokens": 5}}),
        ("message_stop", {"type": "message_stop"}),
    ):
        tap.on_event(name, dumps(payload))
    info = tap.result()
    assert info.usage.output_tokens == 5 and info.response_model is None
    tap = openai.stream_tap(CHAT, True)
    assert tap.on_event(None, dumps({"model": 1, "choices": [{"delta": ["x"], "finish_reason": {"r": 1}}]}))
    assert tap.on_event(None, dumps({"choices": "no", "usage": None}))
    info = tap.result()
    assert info.usage is None and info.usage_error is None and info.finish_reason is None


def test_implausible_stream_usage_on_result():
    events = anthropic_stream_events()
    events[-2] = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": -3}})
    _, info = run_stream("anthropic", "/v1/messages", [(n, dumps(p)) for n, p in events], False)
    assert info.usage is None and info.usage_error == "implausible usage: output_tokens=-3"
    assert info.raw_usage["output_tokens"] == -3 and info.finish_reason == "end_turn"
    # Gemini: the last chunk's garbage wins over the good running totals before it.
    chunks = gemini_stream_chunks()
    chunks[-1]["usageMetadata"] = {**FLASH_USAGE, "candidatesTokenCount": "300"}
    _, info = run_stream("gemini", PATHS["gemini"][1], [(None, dumps(c)) for c in chunks], False)
    assert info.usage_error == "implausible usage: candidatesTokenCount='300'"
    # OpenAI: a usage chunk that is not an object.
    chunks = chat_chunks("gpt-4o", ["a"], GPT4O_USAGE, include_usage=True)
    chunks[-1]["usage"] = [1, 2]
    _, info = run_stream("openai", "/v1/chat/completions", [(None, dumps(c)) for c in chunks], True)
    assert info.usage_error == "implausible usage: usage=[...]"


def test_responses_stream_with_implausible_final_usage():
    events = responses_stream_events(usage={**O4MINI_USAGE, "output_tokens": 1e30})
    _, info = run_stream("openai", "/v1/responses", [(n, dumps(p)) for n, p in events], False)
    assert info.usage is None and info.usage_error == "implausible usage: output_tokens=1e+30"
    assert info.finish_reason == "completed" and info.request_id == "resp_9"


def test_deeply_nested_usage_is_still_written():
    deep = orjson.loads(b"[" * 1000 + b"]" * 1000)  # as deep as orjson reads
    info = openai.parse_reply(CHAT, chat_completion(usage={**GPT4O_USAGE, "extra": deep}))
    assert info.usage is not None
    meter("openai", CHAT, info, catalog=False, model="gpt-4o")
    # Cumulative merging of two deep objects must not recurse without bound either.
    usage = '{"output_tokens":2,"x":' + '{"a":' * 1000 + "1" + "}" * 1000 + "}"
    tap = anthropic.stream_tap(MESSAGES, False)
    tap.on_event("message_start", '{"type":"message_start","message":{"usage":%s}}' % usage)
    for _ in range(2):
        tap.on_event("message_delta", '{"type":"message_delta","usage":%s}' % usage)
    info = tap.result()
    assert info.usage is not None and info.usage.output_tokens == 2
    meter("anthropic", MESSAGES, info, catalog=False, model="claude-haiku-4-5", stream=True)


def test_error_messages_from_any_json():
    assert error_message({"message": "Overloaded"}) == "Overloaded"
    assert error_message({"code": 503}) == "503"
    assert error_message({"message": {"text": "x"}}) == '{"text":"x"}'
    assert error_message(orjson.loads(b"[" * 1000 + b"]" * 1000)) == "[...]"
    assert error_message(10**5000) == "<16610-bit int>"
    assert len(error_message("e" * 1000)) == 300


def test_json_safe_keeps_real_usage_as_is():
    assert json_safe(FLASH_USAGE) is FLASH_USAGE  # no copy on the hot path
    assert json_safe({"a": [1, {"b": math.nan}]}) == {"a": [1, {"b": "nan"}]}
    assert merge_usage({"a": 1}, None) == {"a": 1}
    assert merge_usage({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("text", ["gpt-4o\u2028", "a\u2029b", "x\x85y"])
def test_unicode_line_separators_stay_on_one_line(text):
    info = openai.parse_reply(CHAT, {**chat_completion(), "model": text, "id": text})
    rec = meter("openai", CHAT, info, catalog=False, model=text)
    assert rec["response_model"] == text


def test_lone_surrogates_from_the_lenient_parser_become_replacement_characters():
    raw = (
        b'{"model": "gpt-4o\\ud800", "id": "\\udc00x", "usage": {"prompt_tokens": 1, "\\ud83d": "\\ude00"},'
        b' "error": {"message": "bad \\udfff"}}'
    )
    payload = parse_json(raw)  # orjson refuses this; the stdlib fallback does not
    info = openai.parse_reply(CHAT, payload)
    assert (info.response_model, info.request_id, info.error) == ("gpt-4o\ufffd", "\ufffdx", "bad \ufffd")
    assert info.raw_usage == {"prompt_tokens": 1, "\ufffd": "\ufffd"}
    assert openai.requested_model(CHAT, {"model": "m\ud800"}) == "m\ufffd"
    assert openai.request_user({"user": "\udc00"}) == "\ufffd"
    meter("openai", CHAT, info, catalog=False, model="gpt-4o")  # orjson reads the line back


# --- endpoint classification ---------------------------------------------------------

# (family, method, path, kind, billable, model, stream)
ENDPOINTS = [
    ("openai", "POST", "/v1/chat/completions", "chat", False, None, False),
    ("openai", "POST", "/v1//chat/completions/", "chat", False, None, False),
    ("openai", "POST", "/openai/deployments/d/chat/completions", "chat", False, None, False),
    ("openai", "POST", "/v1/completions", "completions", False, None, False),
    ("openai", "POST", "/v1/embeddings", "embeddings", False, None, False),
    ("openai", "POST", "/v1/responses", "responses", False, None, False),
    ("openai", "GET", "/v1/chat/completions", None, False, None, False),
    ("openai", "GET", "/v1/models", None, False, None, False),
    ("openai", "POST", "/v1/images/generations", None, True, None, False),
    ("openai", "POST", "/v1/images/edits", None, True, None, False),
    ("openai", "POST", "/v1/images/variations/", None, True, None, False),
    ("openai", "POST", "/v1/audio/speech", None, True, None, False),
    ("openai", "POST", "/v1/audio/transcriptions", None, True, None, False),
    ("openai", "POST", "/v1/audio/translations", None, True, None, False),
    ("openai", "POST", "/v1/batches", None, True, None, False),
    ("openai", "POST", "/v1/batches/batch_1/cancel", None, False, None, False),
    ("openai", "POST", "/v1/fine_tuning/jobs", None, True, None, False),
    ("openai", "POST", "/v1/videos", None, True, None, False),
    ("openai", "POST", "/v1/files", None, False, None, False),
    ("openai", "POST", "/v1/moderations", None, False, None, False),
    ("anthropic", "POST", "/v1/messages", "messages", False, None, False),
    ("anthropic", "POST", "//v1/messages//", "messages", False, None, False),
    ("anthropic", "POST", "/v1/messages/count_tokens", None, False, None, False),
    ("anthropic", "POST", "/v1/messages/batches", None, True, None, False),
    ("anthropic", "POST", "/v1/messages/batches/msgbatch_1/cancel", None, False, None, False),
    ("anthropic", "GET", "/v1/messages/batches", None, False, None, False),
    ("anthropic", "GET", "/v1/models", None, False, None, False),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", "generate", False, "gemini-2.5-flash", False),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "generate", False, "gemini-2.5-pro", True),
    ("gemini", "POST", "/v1beta//models/gemini-2.5-pro:streamGenerateContent/", "generate", False, "gemini-2.5-pro", True),
    ("gemini", "POST", "/v1beta/tunedModels/my-model-7:generateContent", "generate", False, "tunedModels/my-model-7", False),
    ("gemini", "POST", "/v1beta/tunedModels/my-model-7:streamGenerateContent", "generate", False, "tunedModels/my-model-7", True),
    (
        "gemini",
        "POST",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent",
        "generate",
        False,
        "gemini-2.5-flash",
        False,
    ),
    ("gemini", "POST", "/v1beta/models/gemini-embedding-001:embedContent", "embeddings", False, "gemini-embedding-001", False),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", None, False, None, False),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", None, True, "gemini-2.5-flash", False),
    ("gemini", "POST", "/v1beta/models/gemini-embedding-001:batchEmbedContents", None, True, "gemini-embedding-001", False),
    ("gemini", "POST", "/v1beta/models/gemini-embedding-001:asyncBatchEmbedContent", None, True, "gemini-embedding-001", False),
    ("gemini", "POST", "/v1beta/models/imagen-4.0-generate-001:predict", None, True, "imagen-4.0-generate-001", False),
    ("gemini", "POST", "/v1beta/models/veo-3.0-generate-001:predictLongRunning", None, True, "veo-3.0-generate-001", False),
    ("gemini", "GET", "/v1beta/models/gemini-2.5-flash:generateContent", None, False, None, False),
    ("gemini", "GET", "/v1beta/models", None, False, None, False),
    ("gemini", "POST", "/v1beta/cachedContents", None, False, None, False),
]


@pytest.mark.parametrize("family, method, path, kind, billable, model, stream", ENDPOINTS)
def test_endpoint_classification(family, method, path, kind, billable, model, stream):
    ep = ADAPTERS[family].endpoint(path, method)
    assert (ep.kind, ep.billable, ep.model, ep.stream) == (kind, billable, model, stream)
    if kind is not None or not billable:
        assert not ep.billable
    if kind is None and not billable:
        assert ep == Endpoint(None)  # free endpoints stay the plain not-metered value


def test_gemini_embed_content_is_metered_from_usage_metadata():
    ep = gemini.endpoint("/v1beta/models/gemini-embedding-001:embedContent", "POST")
    info = gemini.parse_reply(ep, {"embedding": {"values": [0.1]}, "usageMetadata": {"promptTokenCount": 1000, "totalTokenCount": 1000}})
    assert (info.usage.input_tokens, info.usage.output_tokens) == (1000, 0)
    # Older replies have no usage: left for the proxy's estimate from the request text.
    info = gemini.parse_reply(ep, {"embedding": {"values": [0.1]}})
    assert info.usage is None and info.usage_error is None and info.output_text is None


# --- end to end: the client gets the upstream's bytes, the log gets a record ---------------


async def test_non_string_model_reply_reaches_the_client_unchanged_and_is_recorded(mock, proxy, http):
    body = orjson.dumps({**chat_completion(), "model": 4, "service_tier": {"t": 1}})
    mock.on("/v1/chat/completions", raw_reply(body, content_type="application/json"))
    async with http.post(
        f"{proxy.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o", "messages": []},
        headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"},
    ) as r:
        assert r.status == 200 and await r.read() == body
    [rec] = await proxy.records()
    assert (rec["status"], rec["response_model"], rec["service_tier"], rec["input_tokens"]) == (200, None, None, 10000)
    assert rec["total_cost"] is not None and Decimal(str(rec["total_cost"])) == Decimal("0.02")


async def test_non_string_model_stream_reaches_the_client_unchanged_and_is_recorded(mock, proxy, http):
    chunks = chat_chunks(4, ["Hel", "lo"], GPT4O_USAGE, include_usage=True)  # type: ignore[arg-type]
    for c in chunks:
        c["id"] = {"x": 1}
    pieces = sse([*((None, c) for c in chunks), (None, "[DONE]")])
    mock.on("/v1/chat/completions", stream_reply(mock, pieces))
    req = {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(
        f"{proxy.url}/openai/v1/chat/completions", json=req, headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}"}
    ) as r:
        assert r.status == 200 and without_cost_comment(await r.read(), None) == b"".join(pieces)
    [rec] = await proxy.records()
    assert (rec["response_model"], rec["request_id"], rec["input_tokens"], rec["error"]) == (None, None, 10000, None)
    assert Decimal(str(rec["total_cost"])) == Decimal("0.02")
