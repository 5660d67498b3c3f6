"""Read and validate ``config.yml``. A bad file stops start-up with file, key and reason."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from .pricing import ModelPrice, PriceSpecError, normalize_model, parse_model_price
from .providers import ADAPTERS

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        where = f"{self.path}: {key}" if key else str(self.path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str  # API family: openai | anthropic | gemini
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    # models.<model>.max_output_tokens: the most output one choice of an uncapped call
    # can produce, reserved against budgets. Keys are normalized (pricing.normalize_model)
    # so a lookup matches the way a price lookup does.
    max_output: Mapping[str, int] = field(default_factory=dict)


_MODEL_KEYS = ("pricing", "max_output_tokens")


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    providers: Mapping[str, ProviderConfig]
    cost_tracking: bool = True
    # Price models config.yml does not list from the bundled genai-prices catalog.
    catalog: bool = True
    aliases: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    # Between bytes from upstream; long reasoning calls can be silent for minutes.
    read_timeout: float = 600.0
    max_body_mb: int = 64
    # In-flight calls get this long to finish on SIGTERM.
    shutdown_timeout: float = 30.0
    # Proxy keys (keys.AuthConfig) and spend limits (budgets.BudgetsConfig); None: off.
    auth: Any = None
    budgets: Any = None


def _interpolate(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _mapping(value: Any, path: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, key, f"expected a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, path: str, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(path, key, f"expected a positive number, got {value!r}")
    return float(value)


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(p, "", "file not found") from None
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(p, "", f"not valid YAML: {at}{getattr(e, 'problem', None) or e}") from None
    return parse_config(data if data is not None else {}, str(p))


def parse_config(data: Any, path: str = "config.yml") -> Config:
    root = _mapping(data, path, "")
    features = _mapping(root.get("features"), path, "features")
    tracking = _mapping(features.get("cost_tracking"), path, "features.cost_tracking")
    enabled = tracking.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(path, "features.cost_tracking.enabled", f"expected true or false, got {enabled!r}")

    catalog = _mapping(root.get("catalog"), path, "catalog").get("enabled", True)
    if not isinstance(catalog, bool):
        raise ConfigError(path, "catalog.enabled", f"expected true or false, got {catalog!r}")
    aliases = _aliases(root.get("aliases"), path, "aliases")
    raw_providers = _mapping(root.get("providers"), path, "providers")
    if not raw_providers:
        raise ConfigError(path, "providers", "no providers configured")
    providers = {
        str(name): _provider(str(name), spec, path) for name, spec in raw_providers.items()
    }

    from .budgets import parse_budgets
    from .keys import parse_auth

    auth = parse_auth(root.get("auth"), path)
    if auth is not None:
        for pname, prov in providers.items():
            if not prov.api_key:
                raise ConfigError(path, f"providers.{pname}.api_key",
                                  "required with auth: clients present proxy keys, and the proxy sends this key upstream")
    budgets = parse_budgets(root.get("budgets"), path, enabled)

    server = _mapping(root.get("server"), path, "server")
    max_body = server.get("max_body_mb", 64)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise ConfigError(path, "server.max_body_mb", f"expected a whole number of megabytes, got {max_body!r}")
    return Config(
        path=path,
        providers=providers,
        cost_tracking=enabled,
        catalog=catalog,
        aliases=aliases,
        connect_timeout=_number(server.get("connect_timeout"), path, "server.connect_timeout", 10.0),
        read_timeout=_number(server.get("read_timeout"), path, "server.read_timeout", 600.0),
        max_body_mb=max_body,
        shutdown_timeout=_number(server.get("shutdown_timeout"), path, "server.shutdown_timeout", 30.0),
        auth=auth,
        budgets=budgets,
    )


def _aliases(value: Any, path: str, key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for alias, target in _mapping(value, path, key).items():
        if not isinstance(target, str) or not target:
            raise ConfigError(path, f"{key}.{alias}", f"expected a model name, got {target!r}")
        out[str(alias)] = target
    return out


def _provider(name: str, spec: Any, path: str) -> ProviderConfig:
    key = f"providers.{name}"
    spec = _mapping(spec, path, key)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(path, key, "provider names may use only letters, digits, '.', '_' and '-' (they become URL paths)")
    family = spec.get("type", name if name in ADAPTERS else None)
    if family is None:
        raise ConfigError(path, f"{key}.type", f"required for a provider not named after a family; one of: {', '.join(ADAPTERS)}")
    if family not in ADAPTERS:
        raise ConfigError(path, f"{key}.type", f"unknown API family {family!r}; one of: {', '.join(ADAPTERS)}")
    base_url = _interpolate(spec.get("base_url"))
    if not isinstance(base_url, str) or not base_url:
        raise ConfigError(path, f"{key}.base_url", "required: the upstream URL, e.g. https://api.openai.com")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(path, f"{key}.base_url", f"expected an http(s) URL, got {base_url!r}")
    api_key = _interpolate(spec.get("api_key"))
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError(path, f"{key}.api_key", "expected a string (use ${ENV_VAR} to read it from the environment)")
    models: dict[str, ModelPrice] = {}
    max_output: dict[str, int] = {}
    for model, mspec in _mapping(spec.get("models"), path, f"{key}.models").items():
        mkey = f"{key}.models.{model}"
        mspec = _mapping(mspec, path, mkey)
        for k in mspec:
            if k not in _MODEL_KEYS:
                raise ConfigError(path, f"{mkey}.{k}", f"unknown setting; known: {', '.join(_MODEL_KEYS)}")
        if "max_output_tokens" in mspec:
            limit = mspec["max_output_tokens"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(path, f"{mkey}.max_output_tokens",
                                  f"expected a whole number of tokens (the model's output limit, e.g. 16384), got {limit!r}")
            max_output[normalize_model(str(model))] = limit
        elif "pricing" not in mspec:
            raise ConfigError(path, f"{mkey}.pricing", "missing: give {input: …, output: …} in USD per 1M tokens "
                              "(an entry may instead set only max_output_tokens, leaving the price to the catalog)")
        # Without pricing, an entry only sets the output limit: the price comes from the
        # catalog (or the model stays unpriced).
        if "pricing" in mspec:
            try:
                models[str(model)] = parse_model_price(str(model), mspec["pricing"], f"{mkey}.pricing")
            except PriceSpecError as e:
                raise ConfigError(path, e.key, e.reason) from None
    return ProviderConfig(
        name=name,
        type=family,
        base_url=base_url.rstrip("/"),
        api_key=api_key or None,
        models=models,
        aliases=_aliases(spec.get("aliases"), path, f"{key}.aliases"),
        max_output=max_output,
    )
