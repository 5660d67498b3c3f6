"""Proxy keys: who may call through the proxy, as whom, with which models and budget.

Keys are ``lcp-`` + 32 random bytes (``secrets.token_urlsafe(32)``, 256 bits). Only
their SHA-256 is stored. A slow password KDF (bcrypt, scrypt, argon2) exists to make
guessing *low-entropy* secrets expensive; a 256-bit random key cannot be guessed at
any speed, so a plain hash is as safe and costs a microsecond per request. Lookup is
by hash (a dict), confirmed with ``hmac.compare_digest``; timing can at most reveal
something about the hash of a key the caller already has, never a stored key.

The keys file (``auth.keys_file``) is YAML holding ids, hashes, owners and limits:
never a key. ``python -m proxy keys …`` rewrites it atomically (temp file, fsync,
``os.replace``) with mode 0600, under a lock so two commands never lose an edit. A
running proxy notices the new file on its next request (one ``stat``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from proxy.budgets import Limit
from proxy.core.attribution import Owner, clean_value
from proxy.core.money import units_to_usd, usd_to_units
from proxy.errors import ConfigError
from proxy.pricing import name_candidates, normalize_model

log = logging.getLogger("proxy")

KEY_PREFIX = "lcp-"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"[0-9a-f]{12}")
_ENTRY_KEYS = {"id", "sha256", "user", "team", "models", "budget_monthly", "admin", "created", "revoked"}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# --- config -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys_file: Path
    admin_hashes: frozenset[str] = frozenset()  # sha256 hex of admin keys kept in config.yml


# --- the keys file --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str  # the first 12 hex digits of the hash: the record's key_id
    sha256: str
    user: str | None = None
    team: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    budget_units: int | None = None  # monthly, 1e-10 USD
    admin: bool = False
    created: str | None = None
    revoked: str | None = None
    limit: Limit | None = field(default=None, compare=False)

    @property
    def owner(self) -> Owner:
        return Owner(self.user, self.team)

    def allows(self, model: str | None) -> bool:
        """Model allowlist: the name as sent, or its dated snapshot's family
        (``gpt-4o-2024-08-06`` is ``gpt-4o``); never a prefix, never an alias."""
        if self.models is None:
            return True
        if not model:
            return False
        return any(c in self.models for c in name_candidates(model, {}))

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.key_id, "sha256": self.sha256}
        if self.user is not None:
            out["user"] = self.user
        if self.team is not None:
            out["team"] = self.team
        if self.models is not None:
            out["models"] = list(self.models)
        if self.budget_units is not None:
            out["budget_monthly"] = format(units_to_usd(self.budget_units), "f")
        if self.admin:
            out["admin"] = True
        out["created"] = self.created
        out["revoked"] = self.revoked
        return out


def parse_entry(raw: Any, path: Path, key: str) -> KeyEntry:
    if not isinstance(raw, Mapping):
        raise ConfigError(path, key, "expected a mapping")
    for k in raw:
        if k not in _ENTRY_KEYS:
            raise ConfigError(path, f"{key}.{k}", f"unknown field; known: {', '.join(sorted(_ENTRY_KEYS))}")
    h = raw.get("sha256")
    if not isinstance(h, str) or not SHA256_HEX.fullmatch(h):
        raise ConfigError(path, f"{key}.sha256", "expected 64 lower-case hex digits (the key's SHA-256)")
    kid = raw.get("id", h[:12])
    if kid != h[:12]:
        raise ConfigError(path, f"{key}.id", f"expected the hash's first 12 digits ({h[:12]}), got {kid!r}")
    for name in ("user", "team"):
        v = raw.get(name)
        if v is not None and (not isinstance(v, str) or clean_value(v) != v):
            raise ConfigError(
                path, f"{key}.{name}", f"expected a plain name (printable, at most 128 characters, not starting with = + - @), got {v!r}"
            )
    models = raw.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(path, f"{key}.models", "expected a list of model names")
        models = tuple(normalize_model(m) for m in models)
    budget = raw.get("budget_monthly")
    units = None
    if budget is not None:
        try:
            units = usd_to_units(budget)
        except ValueError as e:
            raise ConfigError(path, f"{key}.budget_monthly", str(e)) from None
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(path, f"{key}.admin", f"expected true or false, got {admin!r}")
    for name in ("created", "revoked"):
        v = raw.get(name)
        if v is not None and not isinstance(v, str):
            raise ConfigError(path, f"{key}.{name}", f"expected an ISO timestamp, got {v!r}")
    revoked = raw.get("revoked")
    limit = Limit("key", "monthly", units, match=h[:12], source="key") if units is not None and not revoked else None
    return KeyEntry(h[:12], h, raw.get("user"), raw.get("team"), models, units, admin, raw.get("created"), revoked, limit)
