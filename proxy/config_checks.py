"""The checks every section of ``config.yml`` goes through: mappings, known keys (with
the closest one suggested), ``${VAR}`` references, positive numbers. Shared by
``proxy.config`` and ``proxy.outputs``."""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Iterable, Mapping

from proxy.errors import ConfigError

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    if isinstance(value, str):
        return ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def mapping(value: Any, path: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, key, f"expected a mapping, got {type(value).__name__}")
    return value


def join_key(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def unknown_key_reason(name: str, known: Iterable[str], what: str = "key") -> str:
    """Why ``name`` is refused: the closest known key, or all of them when none is close."""
    names = sorted(known)
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    if close:
        return f"unknown {what}; did you mean '{close[0]}'?"
    return f"unknown {what}; known {what}s: {', '.join(names)}"


def check_keys(spec: Mapping[Any, Any], known: Iterable[str], path: str, key: str) -> None:
    """Every key of the mapping ``spec`` (found at ``key``, "" for the top level) is
    one of ``known``; the first that is not raises ConfigError with its key path and
    the closest known key. The one check every level of config.yml goes through."""
    allowed = frozenset(known)
    for name in spec:
        if name not in allowed:
            raise ConfigError(path, join_key(key, name), unknown_key_reason(str(name), allowed))


def section(value: Any, path: str, key: str, known: Iterable[str]) -> Mapping[str, Any]:
    """A mapping section (absent: empty) whose keys are all known."""
    spec = mapping(value, path, key)
    check_keys(spec, known, path, key)
    return spec


def positive_number(value: Any, path: str, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(path, key, f"expected a positive number, got {value!r}")
    return float(value)
