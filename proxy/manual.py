"""Records of calls made outside the proxy (``python -m proxy log``, ``POST /api/usage``):
one record like those the proxy writes, priced the same way, checked the same way.

Token counts mean what they mean in every record (docs/records.md): the input count is
all input, cache reads included, as OpenAI's ``prompt_tokens`` is; the cached count says
how many of those were cache reads (billed at the cache rate), so it cannot exceed it.
Messages name the inputs as the caller knows them: ``--cached-tokens`` on the command
line, ``cached_tokens`` in the API's JSON (``names``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from proxy.config import Config, ProviderConfig, load_config, pricebook_for
from proxy.core.attribution import MAX_TAGS, clean_tag_name, clean_value
from proxy.core.records import CallContext, build_record, dumps_record
from proxy.core.text import printable
from proxy.core.usage import CallInfo, Usage
from proxy.engine.totals import well_typed
from proxy.errors import UsageError
from proxy.pricing import PriceBook, name_candidates, normalize_model, price_call
from proxy.providers import ADAPTERS

# How each input is named in messages: as a command-line option, or as a JSON field.
CLI_NAMES = {
    n: f"--{n.replace('_', '-')}"
    for n in ("model", "input_tokens", "output_tokens", "cached_tokens", "metadata", "category", "description")
}
JSON_NAMES = {n: n for n in CLI_NAMES}

# Record fields that a tag of the same name would stand in for when reports filter or
# group (engine.query.tag_value): metadata may not name them.
_SHADOWING = frozenset({"team", "session_id", "session"})


@dataclass(frozen=True)
class Provider:
    name: str  # the record's provider: a configured provider's name, else the family's
    family: str  # the record's provider_type
    why: str  # how it was chosen, for the confirmation line


def family_of(model: str) -> str:
    """The API family a model name belongs to when nothing else says: the tracker's models
    were Claude and GPT, and these prefixes are how the vendors name theirs."""
    name = normalize_model(model)
    if name.startswith("claude"):
        return "anthropic"
    if name.startswith("gemini"):
        return "gemini"
    return "openai"


def _aliases(config: Config, prov: ProviderConfig | None) -> dict[str, str]:
    merged = {**config.aliases, **(prov.aliases if prov is not None else {})}
    return {normalize_model(k): v for k, v in merged.items()}


def choose_provider(config: Config, book: PriceBook, model: str, given: str | None) -> Provider:
    """--provider, else the first configured provider that prices the model in config.yml,
    else by the model's family (a configured provider of that family if there is one)."""
    if given:
        prov = config.providers.get(given)
        if prov is not None:
            return Provider(given, prov.type, "as given")
        family = given if given in ADAPTERS else family_of(model)
        return Provider(given, family, "as given; not in the config")
    for name, prov in config.providers.items():
        priced = book.model_names(name)
        if any(c in priced for c in name_candidates(model, _aliases(config, prov))):
            return Provider(name, prov.type, "it prices this model in the config")
    family = family_of(model)
    for name, prov in config.providers.items():
        if prov.type == family:
            return Provider(name, family, f"the configured {family} provider, from the model's name")
    return Provider(family, family, "from the model's name")


def resolve_model(model: str, aliases: Mapping[str, str]) -> str:
    """The name an alias stands for (``sonnet`` -> ``claude-3-5-sonnet-20241022``), alias
    chains followed a few steps (as prices resolve them); the name itself otherwise."""
    current = model.strip()
    for _ in range(4):
        target = aliases.get(normalize_model(current))
        if target is None or normalize_model(target) == normalize_model(current):
            break
        current = target
    return current


class _Object(list[tuple[str, Any]]):
    """A JSON object as its pairs, in order and with any repeated key kept."""


def _reject_constant(name: str, names: Mapping[str, str]) -> Any:
    raise UsageError(f"{names['metadata']}: {name} is not a JSON number", "metadata")


def _json_type(value: Any) -> str:
    if isinstance(value, _Object):
        return "object"
    return {list: "array", str: "string", bool: "boolean"}.get(type(value), "number" if value is not None else "null")


def parse_metadata(text: str | None, names: Mapping[str, str] = CLI_NAMES) -> dict[str, str]:
    """``--metadata`` JSON: an object of scalars, kept as tags (strings, like every tag:
    a number as it was written, a boolean as ``true``/``false``; null leaves the tag out).
    Names follow the tag rule (lower-case letters, digits, ``_`` and ``-``); values are
    cleaned as a header's are."""
    if text is None:
        return {}
    try:
        # Numbers kept as their text: 0.1 stays "0.1" and a 30-digit id stays whole.
        data = json.loads(
            text, parse_float=str, parse_int=str, parse_constant=lambda c: _reject_constant(c, names), object_pairs_hook=_Object
        )
    except json.JSONDecodeError as e:
        raise UsageError(f"{names['metadata']}: not JSON ({e})", "metadata") from None
    if not isinstance(data, _Object):
        raise UsageError(
            f'{names["metadata"]}: expected a JSON object like \'{{"project": "x"}}\', got a JSON {_json_type(data)}', "metadata"
        )
    tags: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in data:
        name = clean_tag_name(key)
        if name is None:
            raise UsageError(
                f"{names['metadata']}: {printable(key, 60)!r} is not a tag name (lower-case letters, digits, _ and -, up to 40)",
                "metadata",
            )
        if name in _SHADOWING:
            raise UsageError(f"{names['metadata']}: {name!r} is a field of the record itself; use another name", "metadata")
        if name in seen:
            raise UsageError(f"{names['metadata']}: {name!r} given twice", "metadata")
        seen.add(name)
        if isinstance(value, list):  # an array, or an object (its pairs)
            raise UsageError(
                f"{names['metadata']}: {name!r} must be a string, number or boolean, not a JSON {_json_type(value)}", "metadata"
            )
        if value is None:
            continue
        cleaned = clean_value(("true" if value else "false") if isinstance(value, bool) else value)
        if cleaned is not None:
            tags[name] = cleaned
    return tags


def record_tags(
    category: str | None, description: str | None, metadata: dict[str, str], names: Mapping[str, str] = CLI_NAMES
) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name, value in (("category", category), ("description", description)):
        if value is None:
            continue
        if name in metadata:
            raise UsageError(f"{names['metadata']}: {name!r} is given by {names[name]} already", "metadata")
        cleaned = clean_value(value)
        if cleaned is None:
            raise UsageError(f"{names[name]}: empty after cleaning", name)
        tags[name] = cleaned
    tags.update(metadata)
    if len(tags) > MAX_TAGS:
        raise UsageError(f"{names['metadata']}: at most {MAX_TAGS} tags a record, category and description included", "metadata")
    return tags


def config_for(path: str, explicit: bool) -> Config:
    """The config (prices, aliases, providers). Without one, the catalog prices alone;
    a config asked for by name must exist, and a broken one is an error here: a wrong
    price written into the log would stay."""
    if not explicit and not os.path.exists(path):
        return Config(path=path, providers={})
    return load_config(path)


def manual_record(
    config: Config,
    *,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    provider: str | None = None,
    tags: dict[str, str] | None = None,
    user: str | None = None,
    now: float | None = None,
    book: PriceBook | None = None,
    names: Mapping[str, str] = CLI_NAMES,
) -> tuple[dict[str, Any], Provider]:
    """The record of a call made outside the proxy, and the provider chosen for it."""
    if cached_tokens > input_tokens:
        raise UsageError(
            f"{names['cached_tokens']}: the cached tokens are part of {names['input_tokens']}, so they cannot be more", "cached_tokens"
        )
    if not model.strip():
        raise UsageError(f"{names['model']}: empty", "model")
    book = book or pricebook_for(config)
    chosen = choose_provider(config, book, resolve_model(model, _aliases(config, None)), provider)
    resolved = resolve_model(model, _aliases(config, config.providers.get(chosen.name)))
    ctx = CallContext(
        timestamp=time.time() if now is None else now,
        provider=chosen.name,
        family=chosen.family,
        endpoint="",
        model=resolved,
        user_id=clean_value(user) if user is not None else None,
        metered=True,
        tags=tags or {},
    )
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached_tokens)
    priced = price_call(
        book, provider=chosen.name, family=chosen.family, model=resolved, response_model=None, usage=usage, when=ctx.timestamp_dt
    )
    rec = build_record(
        ctx,
        CallInfo(usage=usage),
        usage=usage,
        status=200,
        error=None,
        latency_ms=0.0,
        ttft_ms=None,
        usage_source="manual",
        price=priced.price,
        cost=priced.cost,
        price_variant=priced.variant,
    )
    # Not a call through the proxy: no path was called, and its latency is unknown (a 0
    # would pull the latency percentiles down).
    rec["endpoint"] = None
    rec["latency_ms"] = None
    return rec, chosen


# A trillion tokens in one call is a typo; bigger numbers overflow the JSON writer.
MAX_TOKENS = 10**12


def record_line(rec: dict[str, Any]) -> bytes:
    """The record as the log line to append; a UsageError for a line every reader would
    skip as corrupt (a cost beyond what a record can hold), which is not written at all."""
    line = dumps_record(rec)
    if not well_typed(orjson.loads(line)):
        raise UsageError(
            f"the cost of this call, {rec['total_cost']} USD, is beyond what a record can hold: check the token counts", "input_tokens"
        )
    return line
