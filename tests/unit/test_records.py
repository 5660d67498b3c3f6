"""The record and the redactors, tested directly: null versus 0 costs, exact decimals,
one line per record whatever the strings hold, key redaction across any chunking."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.records import MAX_NAME_CHARS, CallContext, build_record, cap_name, dumps_record, redact
from proxy.core.redaction import REPLACEMENT, StreamRedactor, redact_bytes
from proxy.core.usage import CallInfo, Usage
from proxy.pricing import compute_cost, parse_model_price, select_rates
from proxy.web.headers import redact_headers

WHEN = datetime(2026, 11, 20, tzinfo=timezone.utc)
PRICE = parse_model_price("gpt-4o", {"input": 2.5, "output": 10, "cached_input": 1.25}, "t")


def _ctx(**kw: object) -> CallContext:
    base: dict = {
        "timestamp": WHEN.timestamp(),
        "provider": "openai",
        "family": "openai",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o",
        "metered": True,
    }
    base.update(kw)
    return CallContext(**base)


def _record(ctx: CallContext, info: CallInfo, *, usage: Usage | None, status: int = 200, priced: bool = True) -> dict:
    cost = None
    if usage is not None and priced:
        rates, _ = select_rates(PRICE, usage, WHEN, ())
        cost = compute_cost(usage, rates)
    rec = build_record(
        ctx,
        info,
        usage=usage,
        status=status,
        error=None,
        latency_ms=1.234,
        ttft_ms=None,
        usage_source="provider" if usage else None,
        price=PRICE if cost else None,
        cost=cost,
    )
    line = dumps_record(rec)
    parsed = orjson.loads(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return parsed


def test_unpriced_is_null_never_zero() -> None:
    rec = _record(_ctx(), CallInfo(), usage=Usage(input_tokens=100, output_tokens=10), priced=False)
    assert rec["input_tokens"] == 100
    assert (rec["input_cost"], rec["output_cost"], rec["total_cost"], rec["pricing_source"]) == (None, None, None, None)


def test_unknown_usage_is_null_and_unbilled_calls_are_zero() -> None:
    unknown = _record(_ctx(), CallInfo(), usage=None)
    assert unknown["input_tokens"] is None and unknown["total_cost"] is None
    failed = _record(_ctx(), CallInfo(), usage=None, status=429)
    assert failed["input_tokens"] == 0 and failed["total_cost"] == 0
    free = _record(_ctx(metered=False, endpoint="/v1/models"), CallInfo(), usage=None)
    assert free["total_tokens"] == 0 and free["total_cost"] == 0


def test_billable_endpoint_without_usage_is_at_least_unknown() -> None:
    rec = _record(_ctx(metered=False, billable=True, endpoint="/v1/images/generations"), CallInfo(), usage=None)
    assert rec["total_tokens"] is None and rec["total_cost"] is None


def test_implausible_usage_keeps_its_reason_and_no_cost() -> None:
    info = CallInfo(usage_error="implausible usage: prompt_tokens=-5", raw_usage={"prompt_tokens": -5})
    rec = _record(_ctx(), info, usage=None)
    assert rec["total_cost"] is None and rec["usage_error"] == "implausible usage: prompt_tokens=-5"
    assert rec["raw_usage"] == {"prompt_tokens": -5}


def test_costs_are_exact_decimals_in_the_json_text() -> None:
    usage = Usage(input_tokens=1234, output_tokens=567, cache_read_tokens=1000)
    line = dumps_record(
        build_record(
            _ctx(),
            CallInfo(),
            usage=usage,
            status=200,
            error=None,
            latency_ms=1,
            ttft_ms=None,
            usage_source="provider",
            price=PRICE,
            cost=compute_cost(usage, select_rates(PRICE, usage, WHEN, ())[0]),
        )
    )
    # 234 x 2.5 + 1000 x 1.25 = 1835 per 1M = 0.001835; 567 x 10 per 1M = 0.00567
    assert b'"input_cost":0.001835,' in line and b'"output_cost":0.00567,' in line
    assert b'"total_cost":0.007505,' in line
    rec = json.loads(line, parse_float=Decimal)
    assert rec["input_cost"] + rec["output_cost"] == rec["total_cost"] == Decimal("0.007505")


def test_record_ids_are_unique() -> None:
    ids = {_record(_ctx(), CallInfo(), usage=None)["record_id"] for _ in range(1000)}
    assert len(ids) == 1000


def test_long_names_are_capped_and_never_equal_a_real_name() -> None:
    long = "gpt-4o" + "x" * 4_000_000
    rec = _record(_ctx(model=long, provider="p" * 10_000), CallInfo(response_model=long), usage=None)
    assert len(rec["model"]) < MAX_NAME_CHARS + 30 and rec["model"].startswith("gpt-4o")
    assert rec["model"].endswith(f"…[{len(long)} chars]") and len(rec["provider"]) < MAX_NAME_CHARS + 30
    assert cap_name("gpt-4o") == "gpt-4o" and cap_name(None) is None
    assert cap_name("a" * (MAX_NAME_CHARS + 1)) != "a" * MAX_NAME_CHARS


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(st.characters(exclude_categories=())))
def test_any_strings_give_one_valid_line(model: str, user: str) -> None:
    """Lone surrogates, U+2028/9, NEL, controls: one line for every splitter, the
    value decoded back unchanged (up to the cap)."""
    rec = build_record(
        _ctx(model=model, user_id=user),
        CallInfo(finish_reason=user),
        usage=None,
        status=200,
        error=None,
        latency_ms=0,
        ttft_ms=None,
        usage_source=None,
        price=None,
        cost=None,
    )
    line = dumps_record(rec)
    assert len(line.splitlines()) == 1 and len(line.decode("utf-8").splitlines()) == 1
    back = orjson.loads(line)
    assert back["model"] == cap_name(model)
    assert back["user_id"] == "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in user)


def test_redact_patterns() -> None:
    text = (
        "Incorrect API key provided: sk-abc***wxyz. Also sk-ant-api03-XYZ, AIzaSyA1234567890abcdef, "
        "ya29.a0AfH6SMBx, and the configured one: my-own-secret-value"
    )
    out = redact(text, ("my-own-secret-value", None, "ab"))
    for secret in ("sk-abc***wxyz", "sk-ant-api03-XYZ", "AIzaSyA1234567890abcdef", "ya29.a0AfH6SMBx", "my-own-secret-value"):
        assert secret not in out
    assert out.count("[redacted]") == 5 and "Incorrect API key provided" in out


# API keys are drawn from this alphabet (none holds "[", which "[redacted]" starts with).
SECRETS = st.from_regex(r"[A-Za-z0-9_\-]{8,40}", fullmatch=True).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(SECRETS, st.lists(st.binary(max_size=60), max_size=6), st.data())
def test_stream_redactor_over_any_chunking(secret: bytes, pieces: list[bytes], data: st.DataObject) -> None:
    stream = secret.join(pieces) if pieces else secret
    stream = data.draw(st.sampled_from([stream, secret[:-1] + stream, stream + secret[:-1], stream + secret[:3]]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    r = StreamRedactor(secret)
    out = b"".join(r.feed(c) for c in chunks) + r.flush()
    assert secret not in out
    assert out == redact_bytes(stream, secret)


def test_stream_redactor_releases_a_prefix_that_turns_out_harmless() -> None:
    r = StreamRedactor(b"sk-secret-123")
    assert r.feed(b"data: sk-sec") == b"data: "
    assert r.feed(b"ond\n\n") == b"sk-second\n\n"
    assert r.feed(b"sk-secret-1") == b""
    assert r.feed(b"23 and more") == REPLACEMENT + b" and more"
    assert r.flush() == b""


def test_header_redaction() -> None:
    out = redact_headers([("x-echo", "key=sk-secret-123;"), ("content-type", "application/json")], "sk-secret-123")
    assert out["x-echo"] == "key=[redacted];" and out["content-type"] == "application/json"


def test_lone_surrogates_and_line_breakers_are_escaped() -> None:
    weird = "a\ud800b\u2028c\u2029d\x85e\x1b[2J"
    rec = build_record(
        _ctx(model=weird),
        CallInfo(),
        usage=Usage(input_tokens=1),
        status=200,
        error=None,
        latency_ms=0,
        ttft_ms=None,
        usage_source="provider",
        price=PRICE,
        cost=compute_cost(Usage(input_tokens=1), PRICE.periods[-1].card.rates),
    )
    line = dumps_record(rec)
    assert line.isascii() or b"\xe2\x80\xa8" not in line
    for raw in (b"\xe2\x80\xa8", b"\xe2\x80\xa9", b"\xc2\x85", b"\x1b"):
        assert raw not in line
    assert len(line.decode().splitlines()) == 1
    back = json.loads(line, parse_float=Decimal)
    # The lone surrogate cannot be UTF-8: it becomes U+FFFD, so every reader (orjson
    # included) still reads the line and its cost.
    assert back["model"] == weird.replace("\ud800", "\ufffd") and back["total_cost"] == Decimal("0.0000025")
    assert orjson.loads(line)["model"] == back["model"]
