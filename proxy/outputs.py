"""The settings of what the proxy tells besides its log: the cost on each reply
(``replies:``, docs/replies.md), ``/metrics`` (``metrics:``, docs/metrics.md) and email
alerts (``alerts:``, docs/alerts.md).
Each ``parse_*`` reads one top-level section of ``config.yml`` and stops start-up with
the file, key path and reason when it is wrong."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config_checks import section
from proxy.core.attribution import TAG_NAME
from proxy.errors import ConfigError

REPLIES_KEYS = ("cost_headers", "stream_comment")
METRICS_KEYS = ("enabled", "labels", "max_label_values", "max_series", "scrape_token_env")
ALERTS_KEYS = ("email",)
EMAIL_KEYS = ("host", "port", "tls", "user", "password_env", "from", "to", "budget_alerts", "daily_summary", "timezone", "timeout")
TLS_MODES = ("starttls", "ssl", "none")
# Labels a deployment may add to every series; each costs one series per distinct value.
OPT_IN_LABELS = ("user", "team")
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_ADDRESS = re.compile(r"[^@\s<>,;]+@[^@\s<>,;]+")


@dataclass(frozen=True, slots=True)
class RepliesConfig:
    """``cost_headers``: the ``x-llm-cost-*`` headers on replies; ``stream_comment``:
    the ``: llm-cost {...}`` line near the end of OpenAI-family and Anthropic streams."""

    cost_headers: bool = True
    stream_comment: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``labels``: opt-in labels beyond provider and model ("user", "team", "tag:NAME");
    ``max_label_values``: distinct values kept per label, later ones counted as "other";
    ``max_series``: label combinations kept in all, later ones counted as "other";
    ``scrape_token``: a bearer token that may read /metrics (read from the environment)."""

    enabled: bool = True
    labels: tuple[str, ...] = ()
    max_label_values: int = 100
    max_series: int = 1000
    scrape_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class EmailConfig:
    host: str
    sender: str
    to: tuple[str, ...]
    port: int = 587
    tls: str = "starttls"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    budget_alerts: bool = True
    daily_summary: str | None = None  # "HH:MM", local time in ``timezone``
    timezone: str = "UTC"
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    email: EmailConfig | None = None


def _flag(spec: Any, path: str, key: str, default: bool) -> bool:
    value = spec.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(value, bool):
        raise ConfigError(path, key, f"expected true or false, got {value!r}")
    return value


def _from_env(spec: Any, path: str, key: str) -> str | None:
    """The value of the environment variable a ``*_env`` key names: secrets stay out of
    config.yml. A named variable that is not set stops start-up."""
    name = spec.get(key.rsplit(".", 1)[-1])
    if name is None:
        return None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(path, key, f"expected the name of an environment variable, got {name!r}")
    value = os.environ.get(name)
    if not value:
        raise ConfigError(path, key, f"environment variable {name} is not set (or empty)")
    return value


def parse_replies(value: Any, path: str) -> RepliesConfig:
    spec = section(value, path, "replies", REPLIES_KEYS)
    return RepliesConfig(
        cost_headers=_flag(spec, path, "replies.cost_headers", True),
        stream_comment=_flag(spec, path, "replies.stream_comment", True),
    )


def parse_metrics(value: Any, path: str) -> MetricsConfig:
    spec = section(value, path, "metrics", METRICS_KEYS)
    labels = spec.get("labels", [])
    if not isinstance(labels, list):
        raise ConfigError(path, "metrics.labels", f"expected a list such as [user, team, 'tag:project'], got {labels!r}")
    seen: list[str] = []
    for i, label in enumerate(labels):
        ok = isinstance(label, str) and (label in OPT_IN_LABELS or (label.startswith("tag:") and TAG_NAME.fullmatch(label[4:]) is not None))
        if not ok:
            raise ConfigError(path, f"metrics.labels[{i}]", f"expected user, team or tag:NAME (NAME in a-z0-9_-), got {label!r}")
        if label in seen:
            raise ConfigError(path, f"metrics.labels[{i}]", f"{label!r} is listed twice")
        seen.append(label)
    cap = spec.get("max_label_values", 100)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 100_000:
        raise ConfigError(path, "metrics.max_label_values", f"expected a whole number from 1 to 100000, got {cap!r}")
    series = spec.get("max_series", 1000)
    if isinstance(series, bool) or not isinstance(series, int) or not 1 <= series <= 1_000_000:
        raise ConfigError(path, "metrics.max_series", f"expected a whole number from 1 to 1000000, got {series!r}")
    return MetricsConfig(
        enabled=_flag(spec, path, "metrics.enabled", True),
        labels=tuple(seen),
        max_label_values=cap,
        max_series=series,
        scrape_token=_from_env(spec, path, "metrics.scrape_token_env"),
    )


def parse_alerts(value: Any, path: str, default_tz: str = "UTC") -> AlertsConfig:
    spec = section(value, path, "alerts", ALERTS_KEYS)
    if spec.get("email") is None:
        return AlertsConfig()
    return AlertsConfig(email=_parse_email(spec["email"], path, default_tz))


def _text(spec: Any, path: str, key: str, required: bool = False) -> str | None:
    value = spec.get(key.rsplit(".", 1)[-1])
    if value is None:
        if required:
            raise ConfigError(path, key, "required")
        return None
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\r\n"):
        raise ConfigError(path, key, f"expected a one-line string, got {value!r}")
    return value.strip()


def _address(value: Any, path: str, key: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value.strip()):
        raise ConfigError(path, key, f"expected an email address (name@host), got {value!r}")
    return value.strip()


def _parse_email(value: Any, path: str, default_tz: str) -> EmailConfig:
    k = "alerts.email"
    spec = section(value, path, k, EMAIL_KEYS)
    host = _text(spec, path, f"{k}.host", required=True)
    tls = spec.get("tls", "starttls")
    if tls not in TLS_MODES:
        raise ConfigError(path, f"{k}.tls", f"expected one of {', '.join(TLS_MODES)}, got {tls!r}")
    port = spec.get("port", 465 if tls == "ssl" else 587)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(path, f"{k}.port", f"expected a port number from 1 to 65535, got {port!r}")
    if "from" not in spec:
        raise ConfigError(path, f"{k}.from", "required: the sender's address")
    sender = _address(spec["from"], path, f"{k}.from")
    raw_to = spec.get("to")
    if raw_to is None:
        raise ConfigError(path, f"{k}.to", "required: one address or a list of them")
    to_list = raw_to if isinstance(raw_to, list) else [raw_to]
    if not to_list:
        raise ConfigError(path, f"{k}.to", "expected at least one address")
    to = tuple(_address(a, path, f"{k}.to[{i}]" if isinstance(raw_to, list) else f"{k}.to") for i, a in enumerate(to_list))
    user = _text(spec, path, f"{k}.user")
    password = _from_env(spec, path, f"{k}.password_env")
    if password is not None and user is None:
        raise ConfigError(path, f"{k}.user", "required with password_env: the login the password belongs to")
    summary = spec.get("daily_summary")
    if isinstance(summary, int) and not isinstance(summary, bool) and 0 <= summary < 24 * 60:
        # YAML 1.1 reads an unquoted 18:30 as the sexagesimal number 1110 (minutes).
        summary = f"{summary // 60:02d}:{summary % 60:02d}"
    if summary is not None and (not isinstance(summary, str) or not _HHMM.fullmatch(summary)):
        raise ConfigError(path, f"{k}.daily_summary", f'expected a local time "HH:MM" (24-hour), got {summary!r}')
    tz = spec.get("timezone", default_tz)
    try:
        ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, f"{k}.timezone", f"unknown time zone {tz!r} (an IANA name such as Europe/Berlin)") from None
    timeout = spec.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise ConfigError(path, f"{k}.timeout", f"expected seconds from 0 to 300, got {timeout!r}")
    assert host is not None
    return EmailConfig(
        host=host,
        sender=sender,
        to=to,
        port=port,
        tls=tls,
        user=user,
        password=password,
        budget_alerts=_flag(spec, path, f"{k}.budget_alerts", True),
        daily_summary=summary,
        timezone=str(tz),
        timeout=float(timeout),
    )
