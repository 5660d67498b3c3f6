"""The worst case of a call, as reserved against budgets: output caps in every spelling a
provider accepts, the output an uncapped call may produce (config.yml, else the catalog's
context window, else the default), and the settings behind them. Pure functions only:
the budget path through the proxy is in test_budgets.py."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.catalog import context_window
from proxy.config import model_output_limit, parse_budgets, parse_config, pricebook_for
from proxy.core.money import cost_units
from proxy.core.policy import max_output_tokens, unpriced_refusal_message, worst_case_usage
from proxy.errors import ConfigError
from proxy.pricing import price_call

DEFAULT = 4096
PATH = "/etc/proxy/config.yml"


def cfg(models: dict[str, Any] | None = None, catalog: bool = True, **root: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "providers": {"openai": {"base_url": "https://api.openai.com", "models": models or {}}},
        "catalog": {"enabled": catalog},
    }
    data.update(root)
    return data


# --- output caps ------------------------------------------------------------------------

# Every place a cap can be written: (outer key or None for the top level, cap key).
CAP_SPELLINGS = [
    (None, "max_tokens"),
    (None, "max_completion_tokens"),
    (None, "max_output_tokens"),
    ("generationConfig", "maxOutputTokens"),
    ("generationConfig", "max_output_tokens"),
    ("generation_config", "maxOutputTokens"),
    ("generation_config", "max_output_tokens"),
]
CHOICE_SPELLINGS = [
    (None, "n"),
    (None, "best_of"),
    ("generationConfig", "candidateCount"),
    ("generationConfig", "candidate_count"),
    ("generation_config", "candidateCount"),
    ("generation_config", "candidate_count"),
]


def put(body: dict[str, Any], outer: str | None, key: str, value: Any) -> dict[str, Any]:
    (body.setdefault(outer, {}) if outer else body)[key] = value
    return body


@pytest.mark.parametrize("outer,key", CAP_SPELLINGS)
@pytest.mark.parametrize("value", [1000, 1000.0, "1000", " 1000 ", "1000.0", "+1000", "\t1000\n"])
def test_every_cap_spelling_and_numeric_form(outer, key, value):
    assert max_output_tokens(put({}, outer, key, value), "chat", DEFAULT) == 1000


@pytest.mark.parametrize("outer,key", CHOICE_SPELLINGS)
@pytest.mark.parametrize("value", [3, 3.0, "3", " 3 "])
def test_every_choice_spelling_multiplies_the_cap(outer, key, value):
    body = put({"max_tokens": 100}, outer, key, value)
    assert max_output_tokens(body, "generate", DEFAULT) == 300


@pytest.mark.parametrize(
    "body,expected",
    [
        # Several spellings: the provider may honour any, so the largest.
        ({"max_tokens": 100, "max_completion_tokens": 900}, 900),
        ({"max_completion_tokens": 900, "max_tokens": 100}, 900),
        ({"max_tokens": 100, "generationConfig": {"maxOutputTokens": "2000"}}, 2000),
        ({"generationConfig": {"maxOutputTokens": 10}, "generation_config": {"max_output_tokens": 20}}, 20),
        ({"generationConfig": {"maxOutputTokens": 30, "max_output_tokens": 20}}, 30),
        # Garbage is not a cap: the others (or the default) apply.
        ({"max_tokens": -5}, DEFAULT),
        ({"max_tokens": -5, "max_completion_tokens": 50}, 50),
        ({"max_tokens": "lots"}, DEFAULT),
        ({"max_tokens": "1e3"}, DEFAULT),
        ({"max_tokens": "1000.5"}, DEFAULT),
        ({"max_tokens": 1000.5}, DEFAULT),
        ({"max_tokens": float("nan")}, DEFAULT),
        ({"max_tokens": float("inf")}, DEFAULT),
        ({"max_tokens": "-1000"}, DEFAULT),
        ({"max_tokens": "١٠٠"}, DEFAULT),  # Arabic-Indic digits: isdigit() says yes, providers no
        ({"max_tokens": "²"}, DEFAULT),
        ({"max_tokens": ""}, DEFAULT),
        ({"max_tokens": None}, DEFAULT),
        ({"max_tokens": True}, DEFAULT),
        ({"max_tokens": [100]}, DEFAULT),
        ({"max_tokens": {"value": 100}}, DEFAULT),
        ({"max_tokens": 10**18}, DEFAULT),  # no provider takes that many
        ({"max_tokens": "9" * 5000}, DEFAULT),
        ({"generationConfig": "fast"}, DEFAULT),
        ({"generationConfig": {"maxOutputTokens": "x"}, "generation_config": {"maxOutputTokens": 70}}, 70),
        # A cap of 0 is a cap.
        ({"max_tokens": 0}, 0),
        ({"max_tokens": "0"}, 0),
    ],
)
def test_several_spellings_and_garbage(body, expected):
    assert max_output_tokens(body, "chat", DEFAULT) == expected


@pytest.mark.parametrize(
    "body,expected",
    [
        ({"max_tokens": 10, "n": 2, "best_of": 5}, 50),  # best_of >= n: every candidate is billed
        ({"max_tokens": 10, "n": 4, "generationConfig": {"candidateCount": 2}}, 40),
        ({"max_tokens": 10, "n": 1000}, 1280),  # at most 128 choices
        ({"max_tokens": 10, "n": "1000"}, 1280),
        ({"max_tokens": 10, "n": 0}, 10),  # rejected upstream; never a $0 reservation
        ({"max_tokens": 10, "n": -3}, 10),
        ({"max_tokens": 10, "n": "two"}, 10),
        ({"max_tokens": 10, "n": 2.5}, 10),
        ({"n": 3}, 3 * DEFAULT),  # uncapped: every choice can reach the default
    ],
)
def test_choices(body, expected):
    assert max_output_tokens(body, "chat", DEFAULT) == expected


@pytest.mark.parametrize("body", [{"input": "x"}, {"input": "x", "max_tokens": 500, "n": 3}, None, "x"])
def test_embeddings_produce_no_output(body):
    assert max_output_tokens(body, "embeddings", DEFAULT) == 0


@pytest.mark.parametrize("body", [None, [], "text", 42, b"{}"])
def test_a_body_that_is_not_an_object_gets_the_default(body):
    assert max_output_tokens(body, "chat", DEFAULT) == DEFAULT


def _forms(n: int) -> st.SearchStrategy[Any]:
    """Every way a provider accepts the whole number ``n``."""
    text = str(n)
    return st.sampled_from([n, float(n), text, f" {text} ", f"{text}.0", f"+{text}", f"\n{text}\t"])


caps = st.integers(min_value=0, max_value=2**31 - 1)
choices = st.integers(min_value=1, max_value=300)
_WHOLE_TEXT = re.compile(r"\s*\+?[0-9]+(\.0*)?\s*")
garbage = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=10**18),
    st.floats().filter(lambda f: not (math.isfinite(f) and 0 <= f < 10**18 and f.is_integer())),
    st.text().filter(lambda s: not _WHOLE_TEXT.fullmatch(s)),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    spelled=st.lists(st.tuples(st.sampled_from(CAP_SPELLINGS), caps), max_size=len(CAP_SPELLINGS), unique_by=lambda t: t[0]),
    choice=st.none() | st.tuples(st.sampled_from(CHOICE_SPELLINGS), choices),
    data=st.data(),
)
def test_the_largest_spelled_cap_times_the_choices(spelled, choice, data):
    body: dict[str, Any] = {"messages": []}
    for (outer, key), value in spelled:
        put(body, outer, key, data.draw(_forms(value)))
    if choice is not None:
        (outer, key), n = choice
        put(body, outer, key, data.draw(_forms(n)))
    cap = max((v for _, v in spelled), default=DEFAULT)
    n = min(choice[1], 128) if choice is not None else 1
    assert max_output_tokens(body, "chat", DEFAULT) == cap * n


@settings(max_examples=300, deadline=None)
@given(
    real=st.none() | caps,
    junk=st.lists(st.tuples(st.sampled_from(CAP_SPELLINGS + CHOICE_SPELLINGS), garbage), max_size=6),
)
def test_garbage_never_changes_the_result(real, junk):
    clean: dict[str, Any] = {} if real is None else {"max_tokens": real}
    dirty: dict[str, Any] = dict(clean)
    for (outer, key), value in junk:
        if (outer, key) == (None, "max_tokens"):
            continue
        put(dirty, outer, key, value)
    assert max_output_tokens(dirty, "chat", DEFAULT) == max_output_tokens(clean, "chat", DEFAULT)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "n",
                    "best_of",
                    "max_tokens",
                    "max_output_tokens",
                    "generationConfig",
                    "generation_config",
                    "maxOutputTokens",
                    "candidateCount",
                    "candidate_count",
                    "max_completion_tokens",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=json_values, kind=st.sampled_from(["chat", "responses", "messages", "generate", "completions", None]))
def test_any_json_body_gives_a_non_negative_bounded_count(body, kind):
    out = max_output_tokens(body, kind, DEFAULT)
    assert isinstance(out, int) and 0 <= out <= max(DEFAULT, 10**18) * 128


# --- what an uncapped call reserves -----------------------------------------------------


def test_worst_case_uses_the_model_limit_only_when_the_request_has_no_cap():
    assert worst_case_usage({"messages": []}, b"{}", "chat", 100, DEFAULT, 16384).output_tokens == 16384
    assert worst_case_usage({"messages": [], "n": 2}, b"{}", "chat", 100, DEFAULT, 16384).output_tokens == 32768
    assert worst_case_usage({"max_tokens": 50}, b"{}", "chat", 100, DEFAULT, 16384).output_tokens == 50
    # Unknown model limit: the configured default.
    assert worst_case_usage({"messages": []}, b"{}", "chat", 100, DEFAULT, None).output_tokens == DEFAULT
    assert worst_case_usage({"messages": []}, b"{}", "chat", 100, DEFAULT).output_tokens == DEFAULT
    # A window already filled by the input leaves no output to reserve.
    assert worst_case_usage({"messages": []}, b"{}", "chat", 100, DEFAULT, 0).output_tokens == 0
    assert worst_case_usage({"input": "x"}, b"{}", "embeddings", 100, DEFAULT, 16384).output_tokens == 0
    u = worst_case_usage({"messages": []}, b"{}", "chat", 123, DEFAULT, 7)
    assert (u.input_tokens, u.cache_write_tokens, u.cache_read_tokens) == (123, 0, 0)


def test_context_window_of_real_catalog_models():
    assert context_window("openai", "gpt-4o") == 128_000
    assert context_window("openai", "gpt-4o-2024-08-06") == 128_000  # a dated snapshot
    assert context_window("gemini", "gemini-2.5-flash") == 1_048_576  # a family: its catalog provider
    assert context_window("google", "gemini-2.5-flash") == 1_048_576  # a catalog provider id
    assert context_window("azure-east", "gpt-4o", "openai") == 128_000  # our name, the catalog's family
    assert context_window("openai", "no-such-model-xyz") is None
    assert context_window("nowhere", "gpt-4o") is None  # no catalog provider to look in
    assert context_window("openai", "") is None
    assert context_window("google", "gemini-2.5-pro") is None  # listed without a window (0.2.3)


def test_model_output_limit_prefers_config_then_the_catalog_window():
    config = parse_config(
        cfg(
            {
                "gpt-4o": {"pricing": {"input": 2.5, "output": 10}, "max_output_tokens": 16384},
                "o4-mini": {"pricing": {"input": 1.1, "output": 4.4}},
            },
            aliases={"fast": "gpt-4o"},
        )
    )

    def limit(model: str | None, tokens: int = 1000) -> int | None:
        return model_output_limit(config, "openai", "openai", model, tokens)

    assert limit("gpt-4o") == 16384
    assert limit("GPT-4o-2024-08-06") == 16384  # resolved as a price lookup would be
    assert limit("fast") == 16384  # an alias
    assert limit("o4-mini", 1000) == 200_000 - 1000  # the catalog: what the window leaves
    assert limit("o4-mini", 0) == 200_000
    assert limit("o4-mini", 250_000) == 0  # input over the window (the provider refuses it)
    assert limit("o4-mini", -5) == 200_000
    assert limit("no-such-model-xyz") is None  # the caller falls back to the default
    assert limit(None) is None and limit("") is None
    # A provider config.yml does not list: the catalog by its family, if there is one.
    assert model_output_limit(config, "unconfigured", "openai", "o4-mini", 0) == 200_000
    assert model_output_limit(config, "unconfigured", None, "o4-mini", 0) is None


def test_the_catalog_switch_also_keeps_its_windows_out():
    config = parse_config(cfg({"gpt-4o": {"max_output_tokens": 16384}}, catalog=False))
    assert model_output_limit(config, "openai", "openai", "gpt-4o", 10) == 16384
    assert model_output_limit(config, "openai", "openai", "o4-mini", 10) is None


def test_an_uncapped_call_reserves_the_models_real_maximum_at_its_price():
    """The pieces the server strings together, for an uncapped gpt-4o chat call with
    1000 input tokens: catalog window 128000, so 127000 output tokens."""
    config = parse_config(cfg({"gpt-4o": {"pricing": {"input": 2.5, "output": 10}}}))
    book = pricebook_for(config)

    def worst(model: str, body: dict[str, Any]) -> Decimal | None:
        limit = model_output_limit(config, "openai", "openai", model, 1000)
        usage = worst_case_usage(body, b"{}", "chat", 1000, DEFAULT, limit)
        priced = price_call(
            book,
            provider="openai",
            family="openai",
            model=model,
            response_model=None,
            usage=usage,
            when=datetime(2026, 1, 1, tzinfo=timezone.utc),
        )
        return priced.cost.total_cost if priced.cost is not None else None

    assert worst("gpt-4o", {"messages": []}) == Decimal("0.0025") + Decimal("1.27")
    assert worst("gpt-4o", {"messages": [], "max_tokens": 100}) == Decimal("0.0025") + Decimal("0.001")
    assert cost_units(worst("gpt-4o", {"messages": []})) == 12_725_000_000


# --- config: models.<model>.max_output_tokens ---------------------------------------------


def test_max_output_tokens_setting_is_parsed():
    config = parse_config(
        cfg({"GPT-4o": {"pricing": {"input": 2.5, "output": 10}, "max_output_tokens": 16384}, "my-model": {"max_output_tokens": 8192}}),
        PATH,
    )
    prov = config.providers["openai"]
    assert dict(prov.max_output) == {"gpt-4o": 16384, "my-model": 8192}
    # An entry with only a limit sets no price: the catalog (or nothing) prices it.
    assert "GPT-4o" in prov.models and "my-model" not in prov.models


@pytest.mark.parametrize("value", [0, -1, 1.5, 16384.0, "16384", True, None, [16384], {"tokens": 1}])
def test_bad_max_output_tokens_names_the_key(value):
    with pytest.raises(ConfigError) as e:
        parse_config(cfg({"gpt-4o": {"pricing": {"input": 2.5, "output": 10}, "max_output_tokens": value}}), PATH)
    assert (e.value.path, e.value.key) == (PATH, "providers.openai.models.gpt-4o.max_output_tokens")
    assert "whole number of tokens" in e.value.reason and repr(value) in e.value.reason


@pytest.mark.parametrize(
    "spec,key",
    [
        ({"pricing": {"input": 1, "output": 2}, "max_output_token": 100}, "providers.openai.models.gpt-4o.max_output_token"),
        ({"max_output": 100}, "providers.openai.models.gpt-4o.max_output"),
        ({}, "providers.openai.models.gpt-4o.pricing"),  # neither a price nor a limit
        ({"max_output_tokens": 100, "pricing": {"input": 1, "outptu": 2}}, "providers.openai.models.gpt-4o.pricing.outptu"),
    ],
)
def test_model_entry_errors_name_the_key(spec, key):
    with pytest.raises(ConfigError) as e:
        parse_config(cfg({"gpt-4o": spec}), PATH)
    assert (e.value.path, e.value.key) == (PATH, key) and e.value.reason


# --- budgets.allow_unpriced -------------------------------------------------------------


def test_allow_unpriced_setting():
    assert parse_budgets({"limits": []}, PATH).allow_unpriced is False
    assert parse_budgets({"allow_unpriced": True}, PATH).allow_unpriced is True
    assert parse_budgets({"allow_unpriced": False}, PATH).allow_unpriced is False
    assert parse_config(cfg(budgets={"allow_unpriced": True})).budgets.allow_unpriced is True


@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_bad_allow_unpriced_names_the_key(value):
    with pytest.raises(ConfigError) as e:
        parse_budgets({"allow_unpriced": value}, PATH)
    assert (e.value.path, e.value.key) == (PATH, "budgets.allow_unpriced") and repr(value) in e.value.reason


def test_unpriced_refusal_message_says_which_model_and_how_to_price_it():
    msg = unpriced_refusal_message("openai", "my-finetune")
    assert msg.startswith("Model 'my-finetune' on provider 'openai' has no price")
    assert "providers.openai.models.my-finetune.pricing in config.yml" in msg
    assert "catalog: {enabled: true}" in msg and "budgets.allow_unpriced: true" in msg
    assert "\n" not in msg  # one line: it travels in an error body and a log line
    anon = unpriced_refusal_message("local", None)
    assert anon.startswith("This call to provider 'local' names no model")
    assert "providers.local.models.<model>.pricing" in anon and "budgets.allow_unpriced: true" in anon
