"""Every level of config.yml refuses a key it does not know, naming the file, the key's
path and the closest known key; the shipped config.yml with any one key misspelt fails."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.config import client_base_path, load_sections, parse_config
from proxy.errors import ConfigError
from tests.support import ROOT

SHIPPED = yaml.safe_load((ROOT / "config.yml").read_text())
OPENAI = {"base_url": "http://127.0.0.1:1"}
PRICE = {"input": 1, "output": 2}


def base() -> dict[str, Any]:
    return {"providers": {"openai": copy.deepcopy(OPENAI)}}


def error_of(data: Any, path: str = "bad.yml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, path)
    return info.value


# (the config, the key path refused, the suggestion); one per level config.py parses.
CASES = [
    ({**base(), "alises": {"x": "gpt-4o"}}, "alises", "did you mean 'aliases'?"),
    ({"providers": {"openai": {**OPENAI, "api_kye": "sk-x"}}}, "providers.openai.api_kye", "did you mean 'api_key'?"),
    ({**base(), "server": {"read_timout": 5}}, "server.read_timout", "did you mean 'read_timeout'?"),
    ({**base(), "features": {"cost_trackin": {"enabled": True}}}, "features.cost_trackin", "did you mean 'cost_tracking'?"),
    ({**base(), "features": {"cost_tracking": {"enable": False}}}, "features.cost_tracking.enable", "did you mean 'enabled'?"),
    ({**base(), "catalog": {"enabeld": False}}, "catalog.enabeld", "did you mean 'enabled'?"),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricng": PRICE}}}}},
        "providers.openai.models.m.pricng",
        "did you mean 'pricing'?",
    ),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricing": {**PRICE, "cached_inpt": 1}}}}}},
        "providers.openai.models.m.pricing.cached_inpt",
        "did you mean 'cached_input'?",
    ),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricing": [{**PRICE, "untl": "2025-01-01"}, PRICE]}}}}},
        "providers.openai.models.m.pricing[0].untl",
        "did you mean 'until'?",
    ),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricing": {**PRICE, "tiers": [{"above": 9, "outpt": 3}]}}}}}},
        "providers.openai.models.m.pricing.tiers[0].outpt",
        "did you mean 'output'?",
    ),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricing": {**PRICE, "service_tiers": {"flex": {"inptu": 1}}}}}}}},
        "providers.openai.models.m.pricing.service_tiers.flex.inptu",
        "did you mean 'input'?",
    ),
    (
        {"providers": {"openai": {**OPENAI, "models": {"m": {"pricing": {**PRICE, "service_tiers": {"priorty": {"input": 2}}}}}}}},
        "providers.openai.models.m.pricing.service_tiers.priorty",
        "did you mean 'priority'?",
    ),
    ({**base(), "budgets": {"warn_a": 0.5}}, "budgets.warn_a", "did you mean 'warn_at'?"),
    (
        {**base(), "budgets": {"limits": [{"scope": "global", "period": "daily", "usd": 1, "peroid": "x"}]}},
        "budgets.limits[0].peroid",
        "did you mean 'period'?",
    ),
    ({"providers": {"openai": {**OPENAI, "api_key": "sk-x"}}, "auth": {"keys_fil": "k.yml"}}, "auth.keys_fil", "did you mean 'keys_file'?"),
]


@pytest.mark.parametrize("data,key,hint", CASES, ids=[c[1] for c in CASES])
def test_an_unknown_key_at_any_level_names_the_file_path_and_closest_key(data: dict, key: str, hint: str) -> None:
    e = error_of(data)
    assert (e.path, e.key) == ("bad.yml", key)
    assert e.reason == f"unknown {'service tier' if key.endswith('priorty') else 'key'}; {hint}"
    assert str(e) == f"bad.yml: {key}: {e.reason}"


def test_nothing_close_lists_the_known_keys() -> None:
    e = error_of({**base(), "server": {"zzz": 1}})
    assert e.key == "server.zzz"
    assert e.reason == "unknown key; known keys: connect_timeout, max_body_mb, read_timeout, shutdown_timeout"
    e = error_of({"providers": {"openai": {**OPENAI, "qqqq": 1}}})
    assert e.reason == "unknown key; known keys: aliases, api_key, base_url, models, type"


def test_a_misspelt_api_key_is_refused_rather_than_passing_the_clients_key() -> None:
    e = error_of({"providers": {"openai": {**OPENAI, "API_KEY": "${OPENAI_API_KEY}"}}})
    assert e.key == "providers.openai.API_KEY" and "did you mean 'api_key'?" in e.reason
    assert "OPENAI_API_KEY" not in e.reason  # the value (a key, maybe) is never echoed


def test_names_the_user_chooses_are_not_keys() -> None:
    # Provider, model, alias names and list positions are the user's own.
    cfg = parse_config(
        {
            "aliases": {"my-own-name": "gpt-4o"},
            "providers": {
                "my-vllm": {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "models": {"any-model-name": {"pricing": PRICE}}},
                "openai": {**OPENAI, "aliases": {"short": "gpt-4o"}},
            },
        }
    )
    assert set(cfg.providers) == {"my-vllm", "openai"} and cfg.aliases == {"my-own-name": "gpt-4o"}


def test_keys_and_budgets_commands_refuse_an_unknown_top_level_key(tmp_path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("budget:\n  limits: []\n")
    with pytest.raises(ConfigError) as info:
        load_sections(str(path))
    assert info.value.key == "budget" and "did you mean 'budgets'?" in info.value.reason


# --- the shipped config.yml, one key misspelt ------------------------------------------------

# Levels whose keys are names the user picks, not settings (provider, model and alias
# names): a misspelling there is a different name, not an error.
FREE = {("providers",), ("providers", "*", "models"), ("aliases",), ("providers", "*", "aliases")}


def _free(parents: tuple[str, ...]) -> bool:
    return any(len(p) == len(parents) and all(a in ("*", b) for a, b in zip(p, parents)) for p in FREE)


def setting_keys(node: Any, parents: tuple[str, ...] = (), path: str = "") -> Iterator[tuple[tuple[Any, ...], str]]:
    """(the way to the key through the data, its dotted path) for every setting key."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            if not _free(parents):
                yield (k,), here
            yield from (((k, *way), p) for way, p in setting_keys(v, (*parents, str(k)), here))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from (((i, *way), p) for way, p in setting_keys(v, parents, f"{path}[{i}]"))


SETTINGS = list(setting_keys(SHIPPED))


def misspell(word: str, op: int, at: int, letter: str) -> str:
    at %= len(word)
    if op == 0:  # a letter dropped
        return word[:at] + word[at + 1 :]
    if op == 1:  # two letters swapped
        at = min(at, len(word) - 2)
        return word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    if op == 2:  # a letter doubled
        return word[:at] + word[at] + word[at:]
    return word[:at] + letter + word[at:]  # a letter added


def test_the_property_reaches_every_depth() -> None:
    paths = [p for _, p in SETTINGS]
    assert {"features", "features.cost_tracking.enabled", "server.read_timeout", "providers.openai.api_key"} <= set(paths)
    assert "providers.openai.models.gpt-4o.pricing.service_tiers.priority.cached_input" in paths
    assert "providers.gemini.models.gemini-2.5-pro.pricing.tiers[0].above" in paths
    assert "providers.openai.models.o3.pricing[0].until" in paths
    assert "providers.openai" not in paths and "aliases.sonnet" not in paths


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(SETTINGS) - 1),
    op=st.integers(0, 3),
    at=st.integers(0, 40),
    letter=st.sampled_from("abcdefghijklmnopqrstuvwxyz_"),
)
def test_the_shipped_config_with_one_key_misspelt_is_refused(index: int, op: int, at: int, letter: str) -> None:
    way, path = SETTINGS[index]
    data = copy.deepcopy(SHIPPED)
    parent = data
    for step in way[:-1]:
        parent = parent[step]
    old = way[-1]
    new = misspell(old, op, at, letter)
    # Not a misspelling: the same word, another key that exists here, another tier's name.
    assume(new != old and new not in parent and new not in ("flex", "priority", "batch", "fast", "scale"))
    # Keep the order of the keys: the misspelt one is checked where the original was.
    items = [(new if k == old else k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)
    e = error_of(data, "config.yml")
    expected = path[: len(path) - len(old)] + new
    assert (e.path, e.key) == ("config.yml", expected), str(e)
    assert e.reason.startswith("unknown ")


def test_the_shipped_config_itself_is_accepted() -> None:
    cfg = parse_config(copy.deepcopy(SHIPPED), "config.yml")
    assert {"gpt4o", "gpt4mini", "claude-sonnet-3.5", "claude-haiku-3"} <= set(cfg.aliases)


# --- the base URL a client's SDK takes ---------------------------------------------------------


@pytest.mark.parametrize(
    "name,spec,path",
    [
        ("openai", {"base_url": "https://api.openai.com"}, "/openai/v1"),
        ("groq", {"type": "openai", "base_url": "https://api.groq.com/openai"}, "/groq/v1"),
        ("local", {"type": "openai", "base_url": "http://localhost:11434/v1"}, "/local"),
        ("local2", {"type": "openai", "base_url": "http://localhost:11434/v1/"}, "/local2"),
        ("anthropic", {"base_url": "https://api.anthropic.com"}, "/anthropic"),
        ("gemini", {"base_url": "https://generativelanguage.googleapis.com"}, "/gemini"),
    ],
)
def test_client_base_path(name: str, spec: dict, path: str) -> None:
    cfg = parse_config({"providers": {name: spec}})
    assert client_base_path(cfg.providers[name]) == path
