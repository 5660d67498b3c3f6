"""Read and validate ``config.yml``. A bad file stops start-up with file, key and reason."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis.connection as redis_connection
import yaml

from proxy.budgets import SCOPES, BudgetsConfig, Limit
from proxy.catalog import Catalog, context_window
from proxy.config_checks import check_keys, unknown_key_reason
from proxy.config_checks import interpolate as _interpolate
from proxy.config_checks import mapping as _mapping
from proxy.config_checks import positive_number as _number
from proxy.config_checks import section as _section
from proxy.core.attribution import TAG_NAME
from proxy.core.money import usd_to_units
from proxy.core.periods import PERIODS
from proxy.errors import ConfigError
from proxy.keys import KEY_PREFIX, SHA256_HEX, AuthConfig
from proxy.outputs import AlertsConfig, MetricsConfig, RepliesConfig, parse_alerts, parse_metrics, parse_replies
from proxy.pricing import (
    PERIOD_KEYS,
    SERVICE_TIER_KEYS,
    SERVICE_TIERS,
    TIER_KEYS,
    ModelPrice,
    PriceBook,
    PriceSpecError,
    name_candidates,
    normalize_model,
    parse_model_price,
)
from proxy.providers import ADAPTERS

log = logging.getLogger("proxy")


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


# The keys each level of config.yml knows. Anything else is refused (check_keys): a typo
# would otherwise be ignored in silence, and some cost money or leak (a misspelt
# providers.*.api_key sends the client's own key upstream instead).
_TOP_KEYS = ("features", "catalog", "aliases", "server", "providers", "auth", "budgets", "dashboard", "replies", "metrics", "alerts")
_FEATURES_KEYS = ("cost_tracking",)
_ENABLED_KEYS = ("enabled",)
_DASHBOARD_KEYS = ("enabled", "public")
_SERVER_KEYS = ("connect_timeout", "read_timeout", "max_body_mb", "shutdown_timeout")
_PROVIDER_KEYS = ("type", "base_url", "api_key", "models", "aliases")
_MODEL_KEYS = ("pricing", "max_output_tokens")


def client_base_path(provider: ProviderConfig) -> str:
    """The path on the proxy a client's SDK takes as its base URL: ``/NAME`` (the proxy
    appends what the client sends to ``base_url``), plus ``/v1`` for an OpenAI-type
    provider whose ``base_url`` does not end in ``/v1`` already, since the OpenAI SDKs
    expect the ``/v1`` in their base URL and add only ``/chat/completions``."""
    if provider.type == "openai" and not provider.base_url.endswith("/v1"):
        return f"/{provider.name}/v1"
    return f"/{provider.name}"


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
    auth: AuthConfig | None = None
    budgets: BudgetsConfig | None = None
    # The analytics API and /dashboard; without auth: only on a loopback address unless public.
    dashboard: bool = True
    dashboard_public: bool = False
    # Cost on replies, /metrics and email alerts (proxy.outputs; docs/replies.md, metrics.md, alerts.md).
    replies: RepliesConfig = field(default_factory=RepliesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)


def _check_pricing_keys(spec: Any, path: str, key: str) -> None:
    """The keys of a ``pricing:`` block, its periods, tiers and service tiers, before
    pricing.py parses the values (it reads only the rate keys it knows in a tier)."""
    periods = spec if isinstance(spec, list) else [spec]
    for i, period in enumerate(periods):
        pkey = f"{key}[{i}]" if isinstance(spec, list) else key
        if not isinstance(period, Mapping):
            continue  # pricing.py says what a period must be
        check_keys(period, PERIOD_KEYS, path, pkey)
        _check_tier_keys(period.get("tiers"), path, f"{pkey}.tiers")
        service = period.get("service_tiers")
        if isinstance(service, Mapping):
            for name, sspec in service.items():
                skey = f"{pkey}.service_tiers.{name}"
                if str(name).lower() not in SERVICE_TIERS:  # a name no reply would ever match
                    raise ConfigError(path, skey, unknown_key_reason(str(name), SERVICE_TIERS, "service tier"))
                if isinstance(sspec, Mapping):
                    check_keys(sspec, SERVICE_TIER_KEYS, path, skey)
                    _check_tier_keys(sspec.get("tiers"), path, f"{skey}.tiers")


def _check_tier_keys(tiers: Any, path: str, key: str) -> None:
    if isinstance(tiers, list):
        for i, tier in enumerate(tiers):
            if isinstance(tier, Mapping):
                check_keys(tier, TIER_KEYS, path, f"{key}[{i}]")


def read_yaml(path: str | os.PathLike[str], *, missing: Any = FileNotFoundError) -> Any:
    """A YAML file's data (None when empty). A missing file raises ConfigError unless
    ``missing`` gives the value to return; bad YAML names the line and column, on one line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing is FileNotFoundError:
            raise ConfigError(p, "", "file not found") from None
        return missing
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(p, "", f"not valid YAML: {at}{getattr(e, 'problem', None) or e}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    data = read_yaml(path)
    return parse_config(data if data is not None else {}, str(Path(path)))


def parse_config(data: Any, path: str = "config.yml") -> Config:
    root = _section(data, path, "", _TOP_KEYS)
    features = _section(root.get("features"), path, "features", _FEATURES_KEYS)
    tracking = _section(features.get("cost_tracking"), path, "features.cost_tracking", _ENABLED_KEYS)
    enabled = tracking.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(path, "features.cost_tracking.enabled", f"expected true or false, got {enabled!r}")

    catalog = _section(root.get("catalog"), path, "catalog", _ENABLED_KEYS).get("enabled", True)
    if not isinstance(catalog, bool):
        raise ConfigError(path, "catalog.enabled", f"expected true or false, got {catalog!r}")
    aliases = _aliases(root.get("aliases"), path, "aliases")
    raw_providers = _mapping(root.get("providers"), path, "providers")
    if not raw_providers:
        raise ConfigError(path, "providers", "no providers configured")
    providers = {str(name): _provider(str(name), spec, path) for name, spec in raw_providers.items()}

    auth = parse_auth(root.get("auth"), path)
    if auth is not None:
        for pname, prov in providers.items():
            if not prov.api_key:
                raise ConfigError(
                    path,
                    f"providers.{pname}.api_key",
                    "required with auth: clients present proxy keys, and the proxy sends this key upstream",
                )
    budgets = parse_budgets(root.get("budgets"), path, enabled)

    server = _section(root.get("server"), path, "server", _SERVER_KEYS)
    max_body = server.get("max_body_mb", 64)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise ConfigError(path, "server.max_body_mb", f"expected a whole number of megabytes, got {max_body!r}")
    dash = _section(root.get("dashboard"), path, "dashboard", _DASHBOARD_KEYS)
    for k in _DASHBOARD_KEYS:
        if not isinstance(dash.get(k, False), bool):
            raise ConfigError(path, f"dashboard.{k}", f"expected true or false, got {dash[k]!r}")
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
        dashboard=dash.get("enabled", True),
        dashboard_public=dash.get("public", False),
        replies=parse_replies(root.get("replies"), path),
        metrics=parse_metrics(root.get("metrics"), path),
        alerts=parse_alerts(root.get("alerts"), path, budgets.timezone if budgets is not None else "UTC"),
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
    spec = _section(spec, path, key, _PROVIDER_KEYS)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(path, key, "provider names may use only letters, digits, '.', '_' and '-' (they become URL paths)")
    if name in ("api", "dashboard", "health"):
        raise ConfigError(path, key, f"/{name} is the proxy's own path: give this provider another name")
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
        mspec = _section(mspec, path, mkey, _MODEL_KEYS)
        if "max_output_tokens" in mspec:
            limit = mspec["max_output_tokens"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(
                    path,
                    f"{mkey}.max_output_tokens",
                    f"expected a whole number of tokens (the model's output limit, e.g. 16384), got {limit!r}",
                )
            max_output[normalize_model(str(model))] = limit
        elif "pricing" not in mspec:
            raise ConfigError(
                path,
                f"{mkey}.pricing",
                "missing: give {input: …, output: …} in USD per 1M tokens "
                "(an entry may instead set only max_output_tokens, leaving the price to the catalog)",
            )
        # Without pricing, an entry only sets the output limit: the price comes from the
        # catalog (or the model stays unpriced).
        if "pricing" in mspec:
            _check_pricing_keys(mspec["pricing"], path, f"{mkey}.pricing")
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


_LIMIT_KEYS = {"scope", "period", "usd", "match", "tag"}


_BUDGET_KEYS = {
    "timezone",
    "warn_at",
    "webhook",
    "override",
    "default_max_output_tokens",
    "allow_unpriced",
    "limits",
    "backend",
    "on_backend_error",
    "backend_timeout",
    "redis_prefix",
}
_BACKEND_SCHEMES = ("redis", "rediss", "unix")
# A Redis that answers slower than this is treated as down: calls must not wait on it.
_MAX_BACKEND_TIMEOUT = 30.0
_REDIS_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def parse_budgets(value: Any, path: str, cost_tracking: bool = True) -> BudgetsConfig | None:
    """The ``budgets:`` section of config.yml; None when absent."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, "budgets", f"expected a mapping, got {type(value).__name__}")
    check_keys(value, _BUDGET_KEYS, path, "budgets")
    if not cost_tracking:
        raise ConfigError(path, "budgets", "budgets need features.cost_tracking.enabled: spend is counted from the records")
    tz = value.get("timezone", "UTC")
    if not isinstance(tz, str):
        raise ConfigError(path, "budgets.timezone", f"expected a zone name such as UTC or Europe/Berlin, got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, "budgets.timezone", f"unknown time zone {tz!r} (IANA names such as UTC, Europe/Berlin)") from None
    warn_at = value.get("warn_at", 0.8)
    if isinstance(warn_at, bool) or not isinstance(warn_at, (int, float)) or not 0 < warn_at <= 1:
        raise ConfigError(path, "budgets.warn_at", f"expected a fraction of the limit in (0, 1], e.g. 0.8; got {warn_at!r}")
    webhook = value.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(path, "budgets.webhook", f"expected an http(s) URL, got {webhook!r}")
    override = value.get("override", False)
    if not isinstance(override, bool):
        raise ConfigError(path, "budgets.override", f"expected true or false, got {override!r}")
    cap = value.get("default_max_output_tokens", 4096)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(path, "budgets.default_max_output_tokens", f"expected a whole number of tokens, got {cap!r}")
    allow_unpriced = value.get("allow_unpriced", False)
    if not isinstance(allow_unpriced, bool):
        raise ConfigError(path, "budgets.allow_unpriced", f"expected true or false, got {allow_unpriced!r}")
    raw_limits = value.get("limits") or []
    if not isinstance(raw_limits, list):
        raise ConfigError(path, "budgets.limits", f"expected a list of limits, got {type(raw_limits).__name__}")
    limits = [_parse_limit(spec, path, f"budgets.limits[{i}]") for i, spec in enumerate(raw_limits)]
    seen: dict[tuple[str, str | None, str | None, str | None], int] = {}
    for i, lim in enumerate(limits):
        # Two limits on the same budget would show, refuse and warn under one name.
        first = seen.setdefault((lim.scope, lim.tag, lim.match, lim.period), i)
        if first != i:
            raise ConfigError(path, f"budgets.limits[{i}]", f"the same budget as budgets.limits[{first}] ({lim.label}): keep one of them")
    return BudgetsConfig(tuple(limits), tz, float(warn_at), webhook, override, cap, allow_unpriced, *_parse_backend(value, path))


def _parse_backend(value: Mapping[str, Any], path: str) -> tuple[str, str, float, str]:
    """budgets.backend, on_backend_error, backend_timeout, redis_prefix. The URL may hold
    a password: an error shows its host and port, never the URL."""
    backend = _interpolate(value.get("backend", "memory"))
    if not isinstance(backend, str):
        raise ConfigError(path, "budgets.backend", f"expected memory or a redis:// URL, got {type(backend).__name__}")
    if not backend.strip():
        raise ConfigError(path, "budgets.backend", "empty: expected memory or a redis:// URL (is the ${VARIABLE} it names set?)")
    backend = backend.strip()
    if backend != "memory":
        parts = urlsplit(backend)
        if parts.scheme not in _BACKEND_SCHEMES:
            what = f"a {parts.scheme}:// URL" if parts.scheme and "://" in backend else "neither memory nor a URL"
            raise ConfigError(
                path, "budgets.backend", f"expected memory or a redis://, rediss:// or unix:// URL (redis://127.0.0.1:6379), got {what}"
            )
        try:
            parts.port
        except ValueError:
            host = urlsplit(backend).hostname or "?"
            raise ConfigError(path, "budgets.backend", f"the port after host {host} is not a number") from None
        if parts.scheme == "unix" and not parts.path:
            raise ConfigError(path, "budgets.backend", "a unix:// URL needs the socket's path, e.g. unix:///run/redis/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise ConfigError(path, "budgets.backend", f"a {parts.scheme}:// URL needs a host, e.g. {parts.scheme}://127.0.0.1:6379")
        try:  # the options after ? (socket_timeout=...) as the client will read them
            redis_connection.parse_url(backend)
        except ValueError as e:
            why = str(e)
            if parts.password and parts.password in why:
                why = "its options are not understood"
            raise ConfigError(path, "budgets.backend", f"the URL to {parts.hostname or parts.path}: {why}") from None
    on_error = value.get("on_backend_error", "refuse")
    if on_error not in ("refuse", "allow"):
        raise ConfigError(path, "budgets.on_backend_error", f"expected refuse or allow, got {on_error!r}")
    timeout = _number(value.get("backend_timeout"), path, "budgets.backend_timeout", 0.5)
    if timeout > _MAX_BACKEND_TIMEOUT:
        raise ConfigError(path, "budgets.backend_timeout", f"at most {_MAX_BACKEND_TIMEOUT:g} s (calls wait this long), got {timeout:g}")
    prefix = value.get("redis_prefix", "llm-cost-proxy")
    if not isinstance(prefix, str) or not _REDIS_PREFIX.fullmatch(prefix):
        raise ConfigError(path, "budgets.redis_prefix", f"expected 1-64 letters, digits or _ . : - {{ }}, got {prefix!r}")
    return backend, on_error, timeout, prefix


# A budget beyond this is a typo (1e308), and would overflow the money formatter.
_MAX_LIMIT_USD = 1_000_000_000
_MAX_LIMIT_UNITS = usd_to_units(_MAX_LIMIT_USD)


def _parse_limit(spec: Any, path: str, key: str) -> Limit:
    if not isinstance(spec, Mapping):
        raise ConfigError(path, key, "expected a mapping such as {scope: user, period: daily, usd: 5}")
    check_keys(spec, _LIMIT_KEYS, path, key)
    scope = spec.get("scope")
    if scope not in SCOPES:
        raise ConfigError(path, f"{key}.scope", f"expected one of {', '.join(SCOPES)}; got {scope!r}")
    period = spec.get("period")
    if period is None and scope != "session":
        raise ConfigError(path, f"{key}.period", f"required: one of {', '.join(PERIODS)}")
    if period is not None and period not in PERIODS:
        raise ConfigError(path, f"{key}.period", f"expected one of {', '.join(PERIODS)}; got {period!r}")
    if "usd" not in spec:
        raise ConfigError(path, f"{key}.usd", "required: the limit in US dollars")
    try:
        units = usd_to_units(spec["usd"])
    except ValueError as e:
        raise ConfigError(path, f"{key}.usd", str(e)) from None
    if units > _MAX_LIMIT_UNITS:
        raise ConfigError(path, f"{key}.usd", f"at most {_MAX_LIMIT_USD:,} US dollars, got {spec['usd']!r}")
    match = spec.get("match")
    if match is not None:
        if scope == "global":
            raise ConfigError(path, f"{key}.match", "a global limit applies to everything; remove match")
        if not isinstance(match, (str, int)) or isinstance(match, bool) or str(match) == "":
            raise ConfigError(path, f"{key}.match", f"expected a value such as a user id, got {match!r}")
        match = str(match)
    tag = spec.get("tag")
    if scope == "tag":
        if not isinstance(tag, str) or not TAG_NAME.fullmatch(tag):
            raise ConfigError(path, f"{key}.tag", "required for scope tag: the tag name ([a-z0-9_-], e.g. feature)")
    elif tag is not None:
        raise ConfigError(path, f"{key}.tag", "only for scope tag")
    return Limit(scope, period, units, match, tag)


def load_sections(config_path: str) -> tuple[AuthConfig | None, BudgetsConfig | None]:
    """(auth, budgets) sections of config.yml, validated, without needing provider keys."""
    data = read_yaml(config_path) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(config_path, "", "expected a mapping")
    check_keys(data, _TOP_KEYS, config_path, "")
    return parse_auth(data.get("auth"), config_path), parse_budgets(data.get("budgets"), config_path)


_AUTH_KEYS = {"keys_file", "admin_keys"}


def parse_auth(value: Any, path: str) -> AuthConfig | None:
    """The ``auth:`` section; None when absent (clients' own keys pass through)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, "auth", f"expected a mapping, got {type(value).__name__}")
    check_keys(value, _AUTH_KEYS, path, "auth")
    keys_file = value.get("keys_file", "keys.yml")
    if not isinstance(keys_file, str) or not keys_file:
        raise ConfigError(path, "auth.keys_file", f"expected a file name such as keys.yml, got {keys_file!r}")
    kf = Path(keys_file)
    if not kf.is_absolute():
        kf = Path(path).parent / kf
    admins = value.get("admin_keys") or []
    if not isinstance(admins, list):
        raise ConfigError(path, "auth.admin_keys", 'expected a list of "sha256:<hex>" hashes (from `python -m proxy keys create --admin`)')
    hashes = set()
    for i, h in enumerate(admins):
        text = h[7:] if isinstance(h, str) and h.startswith("sha256:") else None
        if text is None or not SHA256_HEX.fullmatch(text):
            is_key = isinstance(h, str) and h.startswith(KEY_PREFIX)
            shown = "a key, not its hash: never put a key in config.yml" if is_key else repr(h)[:20]
            raise ConfigError(path, f"auth.admin_keys[{i}]", f'expected "sha256:" and 64 lower-case hex digits, got {shown}')
        hashes.add(text)
    return AuthConfig(kf, frozenset(hashes))


def pricebook_for(config: Config) -> PriceBook:
    """The prices a configuration resolves to: config.yml first, then the catalog."""
    catalog = None
    if config.catalog:
        try:
            catalog = Catalog()
        except ImportError:
            log.warning("genai-prices is not installed: models missing from %s stay unpriced", config.path)
    return PriceBook(
        {name: p.models for name, p in config.providers.items()},
        {"*": config.aliases, **{name: p.aliases for name, p in config.providers.items()}},
        fallback=catalog,
    )


def model_output_limit(config: Config, provider: str, family: str | None, model: str | None, input_tokens: int) -> int | None:
    """The most output one choice of a call without an output cap can produce, for
    reserving against budgets; None when unknown (the caller then uses
    ``budgets.default_max_output_tokens``).

    ``providers.<provider>.models.<model>.max_output_tokens`` in config.yml wins; else
    what the catalog's context window leaves after ``input_tokens`` (the estimate), as
    the output cannot outgrow the window. Names resolve as prices do (aliases, dated
    snapshots). ``catalog.enabled: false`` keeps the catalog out of this too."""
    if not model:
        return None
    prov = config.providers.get(provider)
    aliases = {normalize_model(k): v for k, v in {**config.aliases, **(prov.aliases if prov is not None else {})}.items()}
    candidates = name_candidates(model, aliases)
    if prov is not None and prov.max_output:
        for cand in candidates:
            if cand in prov.max_output:
                return prov.max_output[cand]
    if not config.catalog:
        return None
    for cand in candidates:
        window = context_window(provider, cand, family)
        if window is not None:
            return max(0, window - max(0, input_tokens))
    return None
