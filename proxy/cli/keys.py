"""``python -m proxy keys create|list|update|revoke``: the keys file, edited safely."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import click

from proxy.budgets import BudgetLedger, BudgetsConfig, Limit
from proxy.cli.base import CONTEXT, Group, text_table
from proxy.cli.options import AFTER, config_option, inherited, json_option, keys_file_option, log_file_option
from proxy.config import load_sections
from proxy.core.attribution import clean_value
from proxy.core.money import format_usd, usd_to_units
from proxy.errors import UsageError
from proxy.keys import KEY_ID, AuthConfig, KeyEntry, key_hash, new_key
from proxy.pricing import normalize_model
from proxy.storage.keyfile import load_keys, locked, save_keys
from proxy.storage.replay import replay_log

F = TypeVar("F", bound=Callable[..., Any])


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if clean_value(value) != value:
        raise UsageError(f"--{what}: use a plain name (printable, at most 128 characters, not starting with = + - @)")
    return value


def _models(value: str | None) -> tuple[str, ...] | None:
    if value is None or value.strip().lower() in ("", "all", "*"):
        return None
    models = tuple(dict.fromkeys(normalize_model(m) for m in value.split(",") if m.strip()))
    if not models:
        raise UsageError("--models: give model names separated by commas, or 'all'")
    return models


def _budget(value: str | None) -> int | None:
    if value is None or value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return usd_to_units(value)
    except ValueError as e:
        raise UsageError(f"--budget-monthly: {e}") from None


class _Target:
    """The keys file a command edits, and the config sections around it."""

    def __init__(self, ctx: click.Context) -> None:
        config: str = inherited(ctx, "config")
        keys_file: str | None = inherited(ctx, "keys_file")
        self.auth: AuthConfig | None = None
        self.budgets: BudgetsConfig | None = None
        if os.path.exists(config) or not keys_file:
            self.auth, self.budgets = load_sections(config)
        if keys_file:
            self.path = Path(keys_file)
        elif self.auth is None:
            raise UsageError(f"{config} has no auth: section; add `auth: {{keys_file: keys.yml}}` or pass --keys-file")
        else:
            self.path = self.auth.keys_file
        if self.path.is_dir() or not self.path.name:
            # "." or "dir/": there is no file to lock or write beside it.
            raise UsageError(f"the keys file {str(self.path)!r} is a directory; name a file such as keys.yml")


def _with_entry(entry: KeyEntry, **changes: Any) -> KeyEntry:
    e = replace(entry, **changes)
    limit = Limit("key", "monthly", e.budget_units, match=e.key_id, source="key") if e.budget_units is not None and not e.revoked else None
    return replace(e, limit=limit)


def _money(units: int | None) -> str:
    return "-" if units is None else format_usd(units, exact=True)


def _find(entries: list[KeyEntry], key_id: str) -> int:
    key_id = key_id.strip().lower()
    if not KEY_ID.fullmatch(key_id):
        raise UsageError(f"expected a key id (12 hex digits, as `keys list` shows), got {key_id!r}")
    for i, e in enumerate(entries):
        if e.key_id == key_id:
            return i
    raise UsageError(f"no key with id {key_id}")


def _target_options(f: F) -> F:
    # Before the action (on the group) or after it (here): both spellings keep working.
    f = config_option(default=None, help=f"the config file {AFTER}")(f)
    f = keys_file_option(help=f"the keys file {AFTER}")(f)
    return f


@click.group(cls=Group, context_settings=CONTEXT)
@config_option(help="config file whose auth.keys_file is used")
@keys_file_option()
def keys(config: str, keys_file: str | None) -> None:
    """Manage proxy keys (the keys file holds only hashes)."""


@keys.command()
@click.option("--user", help="the key's owner (records and budgets are attributed to it)")
@click.option("--team", help="the owner's team")
@click.option("--budget-monthly", metavar="USD", help="a monthly budget for the key")
@click.option("--models", metavar="M1,M2", help="allowlist  [default: all models]")
@click.option("--admin", is_flag=True, help="an admin key (budget overrides, /health detail)")
@_target_options
@click.pass_context
def create(
    ctx: click.Context, user: str | None, team: str | None, budget_monthly: str | None, models: str | None, admin: bool, **_: Any
) -> int:
    """Create a key and print it once."""
    target = _Target(ctx)
    user, team = _name(user, "user"), _name(team, "team")
    if user is None and team is None:
        raise UsageError("give --user (and usually --team): records and budgets are attributed to the key's owner")
    allowed, units = _models(models), _budget(budget_monthly)
    path = target.path
    with locked(path):
        entries = load_keys(path)
        taken = {e.key_id for e in entries}
        while True:
            key = new_key()
            h = key_hash(key)
            if h[:12] not in taken:
                break
        entry = _with_entry(KeyEntry(h[:12], h, user, team, allowed, units, admin, _now_iso(), None))
        save_keys(path, [*entries, entry])
    who = " ".join(filter(None, [user, f"(team {team})" if team else None])) or "-"
    click.echo(
        f"Created {'admin ' if admin else ''}key {entry.key_id} for {who}"
        + (f", monthly budget {_money(units)}" if units is not None else "")
        + (f", models: {', '.join(allowed)}" if allowed else "")
        + "."
    )
    click.echo(f"Shown once; {path} keeps only its hash:\n")
    click.echo(f"    {key}\n")
    if admin:
        click.echo("Admin key: it may override budgets (x-budget-override) and see budget detail on /health.")
        click.echo(f'To keep it in config.yml instead: auth: {{admin_keys: ["sha256:{h}"]}}')
    return 0


@keys.command("list")
@log_file_option(help="the JSONL cost log the month's spend is read from")
@json_option()
@_target_options
@click.pass_context
def list_keys(ctx: click.Context, log_file: str, as_json: bool, **_: Any) -> int:
    """Keys, owners, limits and month-to-date spend."""
    target = _Target(ctx)
    entries = load_keys(target.path)
    tz = target.budgets.timezone if target.budgets is not None else "UTC"
    ledger = BudgetLedger((), timezone=tz, extra_dims=[("key", None, "monthly")])
    replay_log(ledger, log_file)
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
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return 0
    if not rows:
        click.echo(f"no keys in {target.path} (create one: python -m proxy keys create --user NAME)")
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
    click.echo(text_table(table, ["KEY ID", "USER", "TEAM", "MODELS", "BUDGET/MONTH", "SPENT THIS MONTH", "ADMIN", "STATUS", "CREATED"]))
    click.echo(f"(month to date in {tz}, from {log_file})", err=True)
    return 0


@keys.command()
@click.argument("key_id")
@_target_options
@click.pass_context
def revoke(ctx: click.Context, key_id: str, **_: Any) -> int:
    """Refuse a key from now on."""
    path = _Target(ctx).path
    with locked(path):
        entries = load_keys(path)
        i = _find(entries, key_id)
        if entries[i].revoked:
            click.echo(f"key {entries[i].key_id} was already revoked at {entries[i].revoked}")
            return 0
        entries[i] = _with_entry(entries[i], revoked=_now_iso())
        save_keys(path, entries)
    owner = entries[i].user or entries[i].team or "-"
    click.echo(f"revoked key {entries[i].key_id} ({owner}); a running proxy refuses it from its next request")
    return 0


@keys.command()
@click.argument("key_id")
@click.option("--budget-monthly", metavar="USD", help="USD, or 'none'")
@click.option("--models", metavar="M1,M2", help="allowlist, or 'all'")
@click.option("--user", help="the new owner")
@click.option("--team", help="the new team")
@_target_options
@click.pass_context
def update(
    ctx: click.Context, key_id: str, budget_monthly: str | None, models: str | None, user: str | None, team: str | None, **_: Any
) -> int:
    """Change a key's budget, models or owner."""
    path = _Target(ctx).path
    changes: dict[str, Any] = {}
    if budget_monthly is not None:
        changes["budget_units"] = _budget(budget_monthly)
    if models is not None:
        changes["models"] = _models(models)
    if user is not None:
        changes["user"] = _name(user, "user")
    if team is not None:
        changes["team"] = _name(team, "team")
    if not changes:
        raise UsageError("nothing to change: give --budget-monthly, --models, --user or --team")
    with locked(path):
        entries = load_keys(path)
        i = _find(entries, key_id)
        entries[i] = _with_entry(entries[i], **changes)
        save_keys(path, entries)
    e = entries[i]
    click.echo(f"updated key {e.key_id}: budget {_money(e.budget_units)}/month, models {', '.join(e.models) if e.models else 'all'}")
    return 0


def keys_main(argv: Sequence[str]) -> int:
    """``keys`` on its own, in process: the exit status (errors as the command line prints them)."""
    code: Any = keys.main(list(argv), prog_name="python -m proxy keys", standalone_mode=False)
    return int(code)
