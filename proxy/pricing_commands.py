"""``python -m proxy pricing show|check|sync``: what a model costs, what is unpriced,
and copying catalog prices into config.yml."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from proxy.catalog import Catalog
from proxy.cli import command
from proxy.config import load_config, parse_config, pricebook_for
from proxy.defaults import default_log_path
from proxy.errors import ConfigError
from proxy.pricing import ModelPrice, PriceBook, RateCard, Rates, name_candidates
from proxy.reprice import _open
from proxy.storage.logfiles import iter_jsonl

_RATE_COLUMNS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "web_search")


def _fmt(d: Decimal | None) -> str:
    return "-" if d is None else format(d.normalize(), "f")


def _card_lines(label: str, card: RateCard) -> list[str]:
    def row(name: str, r: Rates) -> str:
        return f"  {name:<28}" + "".join(f"{_fmt(getattr(r, c)):>15}" for c in _RATE_COLUMNS)

    out = [row(label, card.rates)]
    out += [row(f"{label}, input > {t.above:,}", t.rates) for t in card.tiers]
    return out


def describe(price: ModelPrice, asked: str, provider: str) -> str:
    source = "config.yml" if price.source == "config" else "genai-prices catalog"
    lines = [f"{asked} ({provider}) -> {price.model}, from the {source} [price id {price.price_id}]"]
    lines.append(f"  {'USD per 1M tokens':<28}" + "".join(f"{c:>15}" for c in _RATE_COLUMNS[:-1]) + f"{'web_search/1K':>15}")
    start = None
    for period in price.periods:
        if period.until is None:
            span = f"from {start}" if start else "always"
        else:
            span = f"{start} .. {period.until.date()}" if start else f"before {period.until.date()}"
        lines += _card_lines(span, period.card)
        for name, card in period.service_tiers.items():
            lines += _card_lines(f"  {name}", card)
        start = str(period.until.date()) if period.until else start
    return "\n".join(lines)


def _setup(args: argparse.Namespace) -> tuple[Any, PriceBook] | None:

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return config, pricebook_for(config)


def _show(args: argparse.Namespace) -> int:
    setup = _setup(args)
    if setup is None:
        return 2
    config, book = setup
    providers = [args.provider] if args.provider else list(config.providers)
    found = False
    for name in providers:
        p = config.providers.get(name)
        if p is None:
            print(f"error: no provider {name!r} in {config.path}", file=sys.stderr)
            return 2
        price = book.resolve(name, args.model, family=p.type)
        if price is not None:
            found = True
            print(describe(price, args.model, name))
    if not found:
        print(f"{args.model}: no price in {config.path} or the catalog (calls are logged with null cost)")
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:

    setup = _setup(args)
    if setup is None:
        return 2
    config, book = setup
    path = Path(args.file)
    if not path.exists():
        print(f"error: {path}: no such log", file=sys.stderr)
        return 2
    seen: Counter[tuple[str, str, str, str]] = Counter()
    with _open(path) as f:
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
        print("Unpriced (add them to config.yml):")
        for provider, model, n in unpriced:
            print(f"  {provider}/{model}  {n} call(s)")
    if catalog:
        print("Priced only from the catalog (`python -m proxy pricing sync MODEL --provider P` pins them):")
        for provider, model, entry, n in catalog:
            print(f"  {provider}/{model} -> {entry}  {n} call(s)")
    if not unpriced and not catalog:
        print(f"All {len(seen)} model(s) in {path} are priced from {config.path}.")
    return 1 if unpriced else 0


def _yaml_number(d: Decimal) -> str:
    return format(d.normalize(), "f")


def _rates_yaml(r: Rates) -> str:
    return ", ".join(f"{k}: {_yaml_number(v)}" for k in _RATE_COLUMNS if (v := getattr(r, k)) is not None)


def price_yaml(model: str, price: ModelPrice) -> str:
    """A config.yml ``models:`` entry reproducing a catalog price, as one flow-style
    line: every period with its ``until`` date (so old calls keep old prices, and a
    scheduled price change takes effect on its day), with tiers and service tiers."""

    def card(c: RateCard) -> str:
        s = _rates_yaml(c.rates)
        if c.tiers:
            s += ", tiers: [" + ", ".join(f"{{above: {t.above}, {_rates_yaml(t.rates)}}}" for t in c.tiers) + "]"
        return s

    def period(p: Any) -> str:
        body = card(p.card)
        if p.service_tiers:
            body += ", service_tiers: {" + ", ".join(f"{n}: {{{card(c)}}}" for n, c in p.service_tiers.items()) + "}"
        if p.until is not None:
            body += f", until: {p.until.isoformat().replace('+00:00', 'Z')}"
        return "{" + body + "}"

    periods = [period(p) for p in price.periods]
    pricing = periods[0] if len(periods) == 1 else "[" + ", ".join(periods) + "]"
    return f'"{model}": {{pricing: {pricing}}}  # from genai-prices, {datetime.now(timezone.utc).date()}'


def insert_models(text: str, provider: str, entries: list[str]) -> str:
    """Insert ``entries`` under ``providers.<provider>.models`` as text, so every
    comment and the layout of config.yml survive."""
    lines = text.splitlines(keepends=True)
    prov_re = re.compile(r"^(\s*)" + re.escape(provider) + r"\s*:\s*(#.*)?$")
    in_providers, prov_indent, prov_line = False, None, None
    for i, line in enumerate(lines):
        if re.match(r"^providers\s*:", line):
            in_providers = True
            continue
        if in_providers and prov_line is None:
            m = prov_re.match(line)
            if m and len(m.group(1)) > 0:
                prov_indent, prov_line = len(m.group(1)), i
                break
    if prov_line is None or prov_indent is None:
        raise ValueError(f"providers.{provider} not found")
    end = len(lines)
    models_line = None
    for j in range(prov_line + 1, len(lines)):
        stripped = lines[j].strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(lines[j]) - len(lines[j].lstrip())
        if indent <= prov_indent:
            end = j
            break
        if re.match(r"models\s*:\s*(#.*)?$", stripped):
            models_line = j
    if models_line is not None:
        indent = len(lines[models_line]) - len(lines[models_line].lstrip()) + 2
        at = models_line + 1
        block = [" " * indent + e + "\n" for e in entries]
    else:
        child = prov_indent + 2
        at = end
        while at > prov_line + 1 and not lines[at - 1].strip():
            at -= 1
        block = [" " * child + "models:\n"] + [" " * (child + 2) + e + "\n" for e in entries]
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    return "".join(lines[:at] + block + lines[at:])


def _sync(args: argparse.Namespace) -> int:

    setup = _setup(args)
    if setup is None:
        return 2
    config, _ = setup
    p = config.providers.get(args.provider)
    if p is None:
        print(f"error: no provider {args.provider!r} in {config.path}", file=sys.stderr)
        return 2
    catalog = Catalog()
    entries = []
    for model in args.models:
        aliases = {**config.aliases, **p.aliases}
        price = None
        for cand in name_candidates(model, aliases):
            price = catalog.lookup(p.name, p.type, cand)
            if price is not None:
                break
        if price is None:
            print(f"error: {model}: not in the catalog", file=sys.stderr)
            return 1
        if any(c in {k.lower() for k in p.models} for c in name_candidates(model, aliases)):
            print(f"skipped {model}: already priced in {config.path}", file=sys.stderr)
            continue
        entries.append(price_yaml(model, price))
    if not entries:
        return 0
    if not args.write:
        print(f"# paste under providers.{args.provider}.models in {config.path}:")
        print("\n".join(entries))
        return 0
    path = Path(args.config)
    text = path.read_text(encoding="utf-8")
    try:
        new_text = insert_models(text, args.provider, entries)

        parse_config(yaml.safe_load(new_text), str(path))
    except Exception as e:  # anything at all: config.yml is left untouched
        print(f"error: could not update {path} safely ({e}); paste this instead:\n" + "\n".join(entries), file=sys.stderr)
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
    print(f"added {len(entries)} model(s) to providers.{args.provider}.models in {path}")
    return 0


@command("pricing", "show a model's price, list unpriced models, copy catalog prices into config.yml")
def pricing_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy pricing")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="the price a model resolves to and where it comes from")
    show.add_argument("model")
    show.add_argument("--provider")
    check = sub.add_parser("check", help="models in the log that are unpriced or priced only from the catalog")
    check.add_argument("--file", default=default_log_path())
    sync = sub.add_parser("sync", help="write catalog prices for models into config.yml (comments kept)")
    sync.add_argument("models", nargs="+")
    sync.add_argument("--provider", required=True)
    sync.add_argument("--write", action="store_true", help="edit config.yml (default: print the YAML to paste)")
    for p in (show, check, sync):
        p.add_argument("--config", default="config.yml")
    args = parser.parse_args(argv)
    return {"show": _show, "check": _check, "sync": _sync}[args.action](args)
