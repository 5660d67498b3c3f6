"""``python -m proxy pricing show|check|sync``: what a model costs, what is unpriced,
and copying catalog prices into config.yml."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TypeVar

import click
import yaml

from proxy.catalog import Catalog
from proxy.cli.base import CONTEXT, Group
from proxy.cli.options import AFTER, config_option, inherited, log_file_option
from proxy.config import Config, load_config, parse_config, pricebook_for
from proxy.errors import UsageError
from proxy.pricing import PriceBook, name_candidates
from proxy.reports.prices import describe, insert_models, price_yaml
from proxy.storage.logfiles import iter_jsonl, open_log

F = TypeVar("F", bound=Callable[..., Any])


def _config_after(f: F) -> F:
    # Before the action (on the group) or after it (here): both spellings work.
    return config_option(default=None, help=f"the config file {AFTER}")(f)


def _setup(ctx: click.Context) -> tuple[Config, PriceBook]:
    config = load_config(inherited(ctx, "config"))
    return config, pricebook_for(config)


@click.group(cls=Group, context_settings=CONTEXT)
@config_option(help="the config file whose prices (and catalog setting) apply")
def pricing(config: str) -> None:
    """Show a model's price, list unpriced models, copy catalog prices into config.yml."""


@pricing.command()
@click.argument("model")
@click.option("--provider", metavar="NAME", help="only this provider  [default: every configured one]")
@_config_after
@click.pass_context
def show(ctx: click.Context, model: str, provider: str | None, **_: Any) -> int:
    """The price a model resolves to and where it comes from."""
    config, book = _setup(ctx)
    found = False
    for name in [provider] if provider else list(config.providers):
        p = config.providers.get(name)
        if p is None:
            raise UsageError(f"no provider {name!r} in {config.path}")
        price = book.resolve(name, model, family=p.type)
        if price is not None:
            found = True
            click.echo(describe(price, model, name))
    if not found:
        click.echo(f"{model}: no price in {config.path} or the catalog (calls are logged with null cost)")
        return 1
    return 0


@pricing.command()
@log_file_option(aliases=("--file",), help="the JSONL cost log to check")
@_config_after
@click.pass_context
def check(ctx: click.Context, log_file: str, **_: Any) -> int:
    """Models in the log that are unpriced or priced only from the catalog."""
    config, book = _setup(ctx)
    path = Path(log_file)
    if not path.exists():
        raise UsageError(f"{path}: no such log")
    seen: Counter[tuple[str, str, str, str]] = Counter()
    with open_log(path) as f:
        for rec in iter_jsonl(f):
            if not rec.get("total_tokens"):
                continue
            key = (
                str(rec.get("provider")),
                str(rec.get("provider_type") or rec.get("provider")),
                str(rec.get("response_model") or ""),
                str(rec.get("model") or ""),
            )
            seen[key] += 1
    unpriced, catalog = [], []
    for (provider, family, response_model, requested), n in sorted(seen.items()):
        # Resolved as the proxy prices a call: the reply's model, then the request's.
        price = book.resolve(provider, response_model, requested, family=family)
        model = response_model or requested or "?"
        if price is None:
            unpriced.append((provider, model, n))
        elif price.source == "catalog":
            catalog.append((provider, model, price.model, n))
    if unpriced:
        click.echo("Unpriced (add them to config.yml):")
        for provider, model, n in unpriced:
            click.echo(f"  {provider}/{model}  {n} call(s)")
    if catalog:
        click.echo("Priced only from the catalog (`python -m proxy pricing sync MODEL --provider P` pins them):")
        for provider, model, entry, n in catalog:
            click.echo(f"  {provider}/{model} -> {entry}  {n} call(s)")
    if not unpriced and not catalog:
        click.echo(f"All {len(seen)} model(s) in {path} are priced from {config.path}.")
    return 1 if unpriced else 0


@pricing.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", metavar="NAME", required=True, help="the provider whose models: section gets the prices")
@click.option("--write", is_flag=True, help="edit config.yml  [default: print the YAML to paste]")
@_config_after
@click.pass_context
def sync(ctx: click.Context, models: tuple[str, ...], provider: str, write: bool, **_: Any) -> int:
    """Write catalog prices for models into config.yml (comments kept)."""
    config, _book = _setup(ctx)
    p = config.providers.get(provider)
    if p is None:
        raise UsageError(f"no provider {provider!r} in {config.path}")
    catalog = Catalog()
    entries = []
    for model in models:
        aliases = {**config.aliases, **p.aliases}
        price = None
        for cand in name_candidates(model, aliases):
            price = catalog.lookup(p.name, p.type, cand)
            if price is not None:
                break
        if price is None:
            click.echo(f"error: {model}: not in the catalog", err=True)
            return 1
        if any(c in {k.lower() for k in p.models} for c in name_candidates(model, aliases)):
            click.echo(f"skipped {model}: already priced in {config.path}", err=True)
            continue
        entries.append(price_yaml(model, price))
    if not entries:
        return 0
    if not write:
        click.echo(f"# paste under providers.{provider}.models in {config.path}:")
        click.echo("\n".join(entries))
        return 0
    return _write(Path(inherited(ctx, "config")), provider, entries)


def _write(path: Path, provider: str, entries: list[str]) -> int:
    text = path.read_text(encoding="utf-8")
    try:
        new_text = insert_models(text, provider, entries)
        parse_config(yaml.safe_load(new_text), str(path))
    except Exception as e:  # anything at all: config.yml is left untouched
        click.echo(f"error: could not update {path} safely ({e}); paste this instead:\n" + "\n".join(entries), err=True)
        return 1
    # Same directory (atomic rename), same permissions: config.yml may hold literal keys.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new_text)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Reload once more from disk: what we wrote is what the proxy will read.
    load_config(path)
    click.echo(f"added {len(entries)} model(s) to providers.{provider}.models in {path}")
    return 0
