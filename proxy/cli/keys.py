"""``python -m proxy keys create|list|update|revoke``: the keys file, edited safely."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from proxy.budgets import BudgetLedger, Limit
from proxy.cli import command
from proxy.cli.budgets import _table
from proxy.config import load_sections
from proxy.core.attribution import clean_value
from proxy.core.money import format_usd, usd_to_units
from proxy.defaults import default_log_path
from proxy.errors import ConfigError
from proxy.keys import KEY_ID, KeyEntry, key_hash, new_key
from proxy.pricing import normalize_model
from proxy.storage.keyfile import load_keys, locked, save_keys
from proxy.storage.replay import replay_log


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    auth = budgets = None
    if os.path.exists(args.config) or not args.keys_file:
        auth, budgets = load_sections(args.config)
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
    return "-" if units is None else format_usd(units, exact=True)


def _create(args: argparse.Namespace, path: Path) -> int:
    user, team = _name(args.user, "user"), _name(args.team, "team")
    if user is None and team is None:
        raise _Usage("give --user (and usually --team): records and budgets are attributed to the key's owner")
    models, units = _models(args.models), _budget(args.budget_monthly)
    with locked(path):
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
    print(
        f"Created {'admin ' if args.admin else ''}key {entry.key_id} for {who}"
        + (f", monthly budget {_money(units)}" if units is not None else "")
        + (f", models: {', '.join(models)}" if models else "")
        + "."
    )
    print(f"Shown once; {path} keeps only its hash:\n")
    print(f"    {key}\n")
    if args.admin:
        print("Admin key: it may override budgets (x-budget-override) and see budget detail on /health.")
        print(f'To keep it in config.yml instead: auth: {{admin_keys: ["sha256:{h}"]}}')
    return 0


def _find(entries: list[KeyEntry], key_id: str) -> int:
    key_id = key_id.strip().lower()
    if not KEY_ID.fullmatch(key_id):
        raise _Usage(f"expected a key id (12 hex digits, as `keys list` shows), got {key_id!r}")
    for i, e in enumerate(entries):
        if e.key_id == key_id:
            return i
    raise _Usage(f"no key with id {key_id}")


def _revoke(args: argparse.Namespace, path: Path) -> int:
    with locked(path):
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
    with locked(path):
        entries = load_keys(path)
        i = _find(entries, args.key_id)
        entries[i] = _with_entry(entries[i], **changes)
        save_keys(path, entries)
    e = entries[i]
    print(f"updated key {e.key_id}: budget {_money(e.budget_units)}/month, models {', '.join(e.models) if e.models else 'all'}")
    return 0


def _list(args: argparse.Namespace, path: Path, auth: Any, budgets: Any) -> int:

    entries = load_keys(path)
    tz = budgets.timezone if budgets is not None else "UTC"
    ledger = BudgetLedger((), timezone=tz, extra_dims=[("key", None, "monthly")])
    log_path = args.log_file or default_log_path()
    replay_log(ledger, log_path)
    rows: list[dict[str, Any]] = []
    for e in entries:
        spent = ledger.spent(("key", None, "monthly"), e.key_id)
        rows.append(
            {
                "id": e.key_id,
                "user": e.user,
                "team": e.team,
                "models": list(e.models) if e.models else None,
                "budget_monthly": _money(e.budget_units) if e.budget_units is not None else None,
                "spent_this_month": _money(spent),
                "admin": e.admin,
                "created": e.created,
                "revoked": e.revoked,
            }
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no keys in {path} (create one: python -m proxy keys create --user NAME)")
        return 0

    table = [
        [
            r["id"],
            r["user"] or "-",
            r["team"] or "-",
            ",".join(r["models"]) if r["models"] else "all",
            r["budget_monthly"] or "-",
            r["spent_this_month"],
            "yes" if r["admin"] else "",
            f"revoked {r['revoked'][:10]}" if r["revoked"] else "active",
            (r["created"] or "")[:10],
        ]
        for r in rows
    ]
    print(_table(table, ["KEY ID", "USER", "TEAM", "MODELS", "BUDGET/MONTH", "SPENT THIS MONTH", "ADMIN", "STATUS", "CREATED"]))
    print(f"(month to date in {tz}, from {log_path})", file=sys.stderr)
    return 0


@command("keys", "proxy keys: create, list, revoke, update")
def keys_main(argv: list[str]) -> int:

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
