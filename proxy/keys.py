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

import argparse
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from .attribution import Owner, clean_value
from .budgets import Limit, money, usd_to_units
from .cli import command
from .defaults import default_log_path
from .pricing import name_candidates, normalize_model

log = logging.getLogger("proxy")

KEY_PREFIX = "lcp-"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_AUTH_KEYS = {"keys_file", "admin_keys"}
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


def parse_auth(value: Any, path: str) -> AuthConfig | None:
    """The ``auth:`` section; None when absent (clients' own keys pass through)."""
    from .config import ConfigError

    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, "auth", f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if k not in _AUTH_KEYS:
            raise ConfigError(path, f"auth.{k}", f"unknown setting; known: {', '.join(sorted(_AUTH_KEYS))}")
    keys_file = value.get("keys_file", "keys.yml")
    if not isinstance(keys_file, str) or not keys_file:
        raise ConfigError(path, "auth.keys_file", f"expected a file name such as keys.yml, got {keys_file!r}")
    kf = Path(keys_file)
    if not kf.is_absolute():
        kf = Path(path).parent / kf
    admins = value.get("admin_keys") or []
    if not isinstance(admins, list):
        raise ConfigError(path, "auth.admin_keys",
                          "expected a list of \"sha256:<hex>\" hashes (from `python -m proxy keys create --admin`)")
    hashes = set()
    for i, h in enumerate(admins):
        text = h[7:] if isinstance(h, str) and h.startswith("sha256:") else None
        if text is None or not _HEX64.fullmatch(text):
            is_key = isinstance(h, str) and h.startswith(KEY_PREFIX)
            shown = "a key, not its hash: never put a key in config.yml" if is_key else repr(h)[:20]
            raise ConfigError(path, f"auth.admin_keys[{i}]", f"expected \"sha256:\" and 64 lower-case hex digits, got {shown}")
        hashes.add(text)
    if kf.exists():
        load_keys(kf)  # a broken keys file stops start-up, naming the file, entry and reason
    return AuthConfig(kf, frozenset(hashes))


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
            out["budget_monthly"] = format(_usd(self.budget_units), "f")
        if self.admin:
            out["admin"] = True
        out["created"] = self.created
        out["revoked"] = self.revoked
        return out


def _usd(units: int) -> Any:
    from .core.money import units_to_usd

    return units_to_usd(units)


def _entry(raw: Any, path: Path, key: str) -> KeyEntry:
    from .config import ConfigError

    if not isinstance(raw, Mapping):
        raise ConfigError(path, key, "expected a mapping")
    for k in raw:
        if k not in _ENTRY_KEYS:
            raise ConfigError(path, f"{key}.{k}", f"unknown field; known: {', '.join(sorted(_ENTRY_KEYS))}")
    h = raw.get("sha256")
    if not isinstance(h, str) or not _HEX64.fullmatch(h):
        raise ConfigError(path, f"{key}.sha256", "expected 64 lower-case hex digits (the key's SHA-256)")
    kid = raw.get("id", h[:12])
    if kid != h[:12]:
        raise ConfigError(path, f"{key}.id", f"expected the hash's first 12 digits ({h[:12]}), got {kid!r}")
    for name in ("user", "team"):
        v = raw.get(name)
        if v is not None and (not isinstance(v, str) or clean_value(v) != v):
            raise ConfigError(path, f"{key}.{name}",
                              f"expected a plain name (printable, at most 128 characters, not starting with = + - @), got {v!r}")
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


def load_keys(path: Path) -> list[KeyEntry]:
    """The keys file's entries; a missing file has none. Raises ConfigError naming
    the file, the entry and what is wrong."""
    from .config import ConfigError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"not valid YAML: {e}") from None
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(data.get("keys", []), (list, type(None))):
        raise ConfigError(path, "keys", "expected `keys:` with a list of entries")
    entries = [_entry(raw, path, f"keys[{i}]") for i, raw in enumerate(data.get("keys") or [])]
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.key_id in seen:
            raise ConfigError(path, f"keys[{i}].id", f"duplicate key id {entry.key_id}")
        seen.add(entry.key_id)
    return entries


class KeyStore:
    """The keys the proxy accepts, reloaded when the file changes."""

    def __init__(self, path: Path | None, admin_hashes: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.admin_hashes = tuple(sorted(admin_hashes))
        self.entries: list[KeyEntry] = []
        self._by_hash: dict[str, KeyEntry] = {}
        self._sig: tuple[int, int, int] | None = None
        self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> None:
        """Reload if the file changed (a new inode after ``os.replace``, or a new
        mtime/size after a hand edit). A broken file is an error at start-up; later
        the previous keys stay in force and the error is logged once."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = (0, 0, 0)
        if sig == self._sig:
            return
        self._sig = sig
        from .config import ConfigError

        try:
            entries = load_keys(self.path)
        except ConfigError as e:
            if strict:
                raise
            log.error("keys file not reloaded, the previous keys stay in force: %s", e)
            return
        self.entries = entries
        self._by_hash = {e.sha256: e for e in entries}

    def lookup(self, key: str | None) -> KeyEntry | None:
        if not key:
            return None
        h = key_hash(key)
        entry = self._by_hash.get(h)
        if entry is not None and hmac.compare_digest(entry.sha256, h):
            return entry
        return None

    def is_admin(self, key: str | None) -> bool:
        if not key:
            return False
        h = key_hash(key)
        ok = False
        for a in self.admin_hashes:  # no early exit: the same work for every key
            ok |= hmac.compare_digest(a, h)
        entry = self.lookup(key)
        return ok or (entry is not None and entry.admin and not entry.revoked)

    def budget_limits(self) -> list[Limit]:
        return [e.limit for e in self.entries if e.limit is not None]


# --- writing the keys file ------------------------------------------------------------

_HEADER = (
    "# llm-cost-proxy keys, written by `python -m proxy keys`. Only SHA-256 hashes of\n"
    "# keys are stored here; a key is shown once, when it is created.\n"
)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no concurrent writers expected
            pass
        yield
    finally:
        os.close(fd)


def save_keys(path: Path, entries: Sequence[KeyEntry]) -> None:
    text = _HEADER + yaml.safe_dump({"keys": [e.to_yaml() for e in entries]}, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- `python -m proxy keys …` -----------------------------------------------------------


class _Usage(Exception):
    pass


def _name(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if clean_value(value) != value:
        raise _Usage(f"--{what}: use a plain name (printable, at most 128 characters, not starting with = + - @)")
    return value


def _models(value: str | None) -> tuple[str, ...] | None:
    if value is None or value.strip().lower() in ("", "all", "*"):
        return None
    models = tuple(dict.fromkeys(normalize_model(m) for m in value.split(",") if m.strip()))
    if not models:
        raise _Usage("--models: give model names separated by commas, or 'all'")
    return models


def _budget(value: str | None) -> int | None:
    if value is None or value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return usd_to_units(value)
    except ValueError as e:
        raise _Usage(f"--budget-monthly: {e}") from None


def _keys_path(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """(keys file, auth section, budgets section)."""
    from .budgets import _load_sections

    auth = budgets = None
    if os.path.exists(args.config) or not args.keys_file:
        auth, budgets = _load_sections(args.config)
    if args.keys_file:
        return Path(args.keys_file), auth, budgets
    if auth is None:
        raise _Usage(f"{args.config} has no auth: section; add `auth: {{keys_file: keys.yml}}` or pass --keys-file")
    return auth.keys_file, auth, budgets


def _with_entry(entry: KeyEntry, **changes: Any) -> KeyEntry:
    e = replace(entry, **changes)
    limit = Limit("key", "monthly", e.budget_units, match=e.key_id, source="key") if e.budget_units is not None and not e.revoked else None
    return replace(e, limit=limit)


def _money(units: int | None) -> str:
    return "-" if units is None else money(units)


def _create(args: argparse.Namespace, path: Path) -> int:
    user, team = _name(args.user, "user"), _name(args.team, "team")
    if user is None and team is None:
        raise _Usage("give --user (and usually --team): records and budgets are attributed to the key's owner")
    models, units = _models(args.models), _budget(args.budget_monthly)
    with _locked(path):
        entries = load_keys(path)
        taken = {e.key_id for e in entries}
        while True:
            key = new_key()
            h = key_hash(key)
            if h[:12] not in taken:
                break
        entry = _with_entry(KeyEntry(h[:12], h, user, team, models, units, args.admin, _now_iso(), None))
        save_keys(path, [*entries, entry])
    who = " ".join(filter(None, [user, f"(team {team})" if team else None])) or "-"
    print(f"Created {'admin ' if args.admin else ''}key {entry.key_id} for {who}"
          + (f", monthly budget {_money(units)}" if units is not None else "")
          + (f", models: {', '.join(models)}" if models else "") + ".")
    print(f"Shown once; {path} keeps only its hash:\n")
    print(f"    {key}\n")
    if args.admin:
        print("Admin key: it may override budgets (x-budget-override) and see budget detail on /health.")
        print(f"To keep it in config.yml instead: auth: {{admin_keys: [\"sha256:{h}\"]}}")
    return 0


def _find(entries: list[KeyEntry], key_id: str) -> int:
    key_id = key_id.strip().lower()
    if not _KEY_ID.fullmatch(key_id):
        raise _Usage(f"expected a key id (12 hex digits, as `keys list` shows), got {key_id!r}")
    for i, e in enumerate(entries):
        if e.key_id == key_id:
            return i
    raise _Usage(f"no key with id {key_id}")


def _revoke(args: argparse.Namespace, path: Path) -> int:
    with _locked(path):
        entries = load_keys(path)
        i = _find(entries, args.key_id)
        if entries[i].revoked:
            print(f"key {entries[i].key_id} was already revoked at {entries[i].revoked}")
            return 0
        entries[i] = _with_entry(entries[i], revoked=_now_iso())
        save_keys(path, entries)
    owner = entries[i].user or entries[i].team or "-"
    print(f"revoked key {entries[i].key_id} ({owner}); a running proxy refuses it from its next request")
    return 0


def _update(args: argparse.Namespace, path: Path) -> int:
    changes: dict[str, Any] = {}
    if args.budget_monthly is not None:
        changes["budget_units"] = _budget(args.budget_monthly)
    if args.models is not None:
        changes["models"] = _models(args.models)
    if args.user is not None:
        changes["user"] = _name(args.user, "user")
    if args.team is not None:
        changes["team"] = _name(args.team, "team")
    if not changes:
        raise _Usage("nothing to change: give --budget-monthly, --models, --user or --team")
    with _locked(path):
        entries = load_keys(path)
        i = _find(entries, args.key_id)
        entries[i] = _with_entry(entries[i], **changes)
        save_keys(path, entries)
    e = entries[i]
    print(f"updated key {e.key_id}: budget {_money(e.budget_units)}/month, models {', '.join(e.models) if e.models else 'all'}")
    return 0


def _list(args: argparse.Namespace, path: Path, auth: Any, budgets: Any) -> int:
    from .budgets import BudgetLedger, replay_log

    entries = load_keys(path)
    tz = budgets.timezone if budgets is not None else "UTC"
    ledger = BudgetLedger((), timezone=tz, extra_dims=[("key", None, "monthly")])
    log_path = args.log_file or default_log_path()
    replay_log(ledger, log_path)
    rows: list[dict[str, Any]] = []
    for e in entries:
        spent = ledger.spent(("key", None, "monthly"), e.key_id)
        rows.append({
            "id": e.key_id, "user": e.user, "team": e.team, "models": list(e.models) if e.models else None,
            "budget_monthly": _money(e.budget_units) if e.budget_units is not None else None,
            "spent_this_month": _money(spent), "admin": e.admin, "created": e.created, "revoked": e.revoked,
        })
    if args.json:
        import json

        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no keys in {path} (create one: python -m proxy keys create --user NAME)")
        return 0
    from .budgets import _table

    table = [[r["id"], r["user"] or "-", r["team"] or "-", ",".join(r["models"]) if r["models"] else "all",
              r["budget_monthly"] or "-", r["spent_this_month"], "yes" if r["admin"] else "",
              f"revoked {r['revoked'][:10]}" if r["revoked"] else "active", (r["created"] or "")[:10]] for r in rows]
    print(_table(table, ["KEY ID", "USER", "TEAM", "MODELS", "BUDGET/MONTH", "SPENT THIS MONTH", "ADMIN", "STATUS", "CREATED"]))
    print(f"(month to date in {tz}, from {log_path})", file=sys.stderr)
    return 0


@command("keys", "proxy keys: create, list, revoke, update")
def keys_main(argv: list[str]) -> int:
    from .config import ConfigError

    ap = argparse.ArgumentParser(prog="python -m proxy keys", description="Manage proxy keys (the keys file holds only hashes).")
    ap.add_argument("--config", default="config.yml", help="config file whose auth.keys_file is used (default: ./config.yml)")
    ap.add_argument("--keys-file", default=None, help="the keys file, instead of the one config.yml names")
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("--user")
    c.add_argument("--team")
    c.add_argument("--budget-monthly", metavar="USD")
    c.add_argument("--models", metavar="M1,M2", help="allowlist (default: all models)")
    c.add_argument("--admin", action="store_true", help="an admin key (budget overrides, /health detail)")
    ls = sub.add_parser("list", help="keys, owners, limits and month-to-date spend")
    ls.add_argument("--log-file", default=None, help="JSONL log (default: $COST_TRACKING_FILE or logs/cost-tracking.jsonl)")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="refuse a key from now on")
    r.add_argument("key_id")
    u = sub.add_parser("update", help="change a key's budget, models or owner")
    u.add_argument("key_id")
    u.add_argument("--budget-monthly", metavar="USD", help="USD, or 'none'")
    u.add_argument("--models", metavar="M1,M2", help="allowlist, or 'all'")
    u.add_argument("--user")
    u.add_argument("--team")
    # Options before or after the action both work: `keys --config x list` / `keys list --config x`.
    for p in (c, ls, r, u):
        p.add_argument("--config", dest="config", default=argparse.SUPPRESS)
        p.add_argument("--keys-file", dest="keys_file", default=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        path, auth, budgets = _keys_path(args)
        if args.action == "create":
            return _create(args, path)
        if args.action == "revoke":
            return _revoke(args, path)
        if args.action == "update":
            return _update(args, path)
        return _list(args, path, auth, budgets)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
