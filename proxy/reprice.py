"""Re-price a whole log with today's configuration.

Every record keeps the normalized token counts, the raw usage, its timestamp and
what priced it, so history can be re-priced with the price that was in force at
each call's time. Files are streamed line by line: constant memory at any size.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from proxy.cli import command
from proxy.config import load_config, pricebook_for
from proxy.core.money import cost_units, units_to_usd
from proxy.core.records import dumps_record, iso_utc
from proxy.core.timestamps import parse_timestamp
from proxy.core.usage import Usage
from proxy.defaults import default_log_path
from proxy.engine.lines import Dedupe
from proxy.errors import ConfigError
from proxy.pricing import PriceBook, price_call

_PRICE_FIELDS = ("input_cost", "output_cost", "total_cost", "pricing_source", "price_id", "price_variant")


def usage_from_record(rec: dict[str, Any]) -> Usage | None:
    if rec.get("input_tokens") is None and rec.get("output_tokens") is None:
        return None

    def n(key: str) -> int:
        v = rec.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    return Usage(
        input_tokens=n("input_tokens"),
        output_tokens=n("output_tokens"),
        cache_read_tokens=n("cache_read_tokens"),
        cache_write_tokens=n("cache_write_tokens"),
        cache_write_1h_tokens=n("cache_write_1h_tokens"),
        reasoning_tokens=n("reasoning_tokens"),
        web_search_requests=n("web_search_requests"),
    )


def reprice_record(rec: dict[str, Any], book: PriceBook) -> dict[str, Any] | None:
    """The record with its price fields recomputed, or None if they are unchanged."""
    usage = usage_from_record(rec)
    if usage is None or not (usage.input_tokens or usage.output_tokens or usage.web_search_requests):
        return None  # unknown usage stays unknown; zero usage costs zero at any price
    try:
        when = datetime.fromtimestamp(parse_timestamp(rec["timestamp"]), timezone.utc)
    except (KeyError, TypeError, ValueError):
        return None
    priced = price_call(
        book,
        provider=str(rec.get("provider") or ""),
        family=str(rec.get("provider_type") or rec.get("provider") or ""),
        model=rec.get("model"),
        response_model=rec.get("response_model"),
        usage=usage,
        when=when,
        service_tier=rec.get("service_tier"),
        speed=rec.get("speed"),
    )
    cost, price = priced.cost, priced.price
    new = {
        "input_cost": cost.input_cost if cost else None,
        "output_cost": cost.output_cost if cost else None,
        "total_cost": cost.total_cost if cost else None,
        "pricing_source": price.source if cost and price else None,
        "price_id": price.price_id if cost and price else None,
        "price_variant": priced.variant if cost else None,
    }
    same = all((cost_units(rec.get(k)) == cost_units(new[k])) if k.endswith("_cost") else rec.get(k) == new[k] for k in _PRICE_FIELDS)
    if same:
        return None
    return {**rec, **new}


@dataclass
class RepriceStats:
    records: int = 0
    changed: int = 0  # records whose total cost changed
    relabelled: int = 0  # same cost, but a new price id or source
    newly_priced: int = 0
    now_unpriced: int = 0
    corrupt: int = 0
    duplicates: int = 0  # repeats of a recent line or record id (a retried write): counted once
    old_units: int = 0
    new_units: int = 0

    @property
    def difference(self) -> Decimal:
        return units_to_usd(self.new_units - self.old_units)


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _complete_lines(f: Iterable[bytes], tail: bytearray) -> Iterator[bytes]:
    """The lines of ``f`` that end in a newline, each whole.

    The log may be growing while we read it, and a reader takes no lock: the proxy's
    writes exclude only the rewriter's exclusive lock. Linux does not make a read atomic
    against a write to a regular file: ``write`` copies one page-cache folio at a time and
    raises the file size after each, so a read meeting a line in flight can end at a folio
    boundary with the line half there, and the next read finds its rest. Seen (CI, and
    ``tests/test_reprice.py``): a 522-byte line at offset 65120, read up to 65536 and then
    EOF. Terminating that piece as a line of its own split one record into two unreadable
    lines (and, for ``--in-place``, its rest then came from the copy under the lock). So
    a piece without its newline waits here for the rest; what is still unended when ``f``
    is exhausted is left in ``tail``, for the caller: copied under the lock, or ended."""
    for line in f:
        if not line.endswith(b"\n"):
            tail += line  # only at EOF: the rest, if any, is still being written
            continue
        if tail:
            line = bytes(tail) + line
            tail.clear()
        yield line


def _all_lines(f: Iterable[bytes]) -> Iterator[bytes]:
    """Every line of a file read as it stands; an unended last line too (reprice_lines
    ends it)."""
    tail = bytearray()
    yield from _complete_lines(f, tail)
    if tail:
        yield bytes(tail)


def reprice_lines(lines: Iterator[bytes], book: PriceBook, stats: RepriceStats, now: float) -> Iterator[bytes]:
    """Lines in, lines out; unchanged and unreadable lines pass through byte for byte.
    A repeated line (see engine.lines.Dedupe) is counted once but still written, re-priced
    like its first copy: the output stays a faithful copy, and its repeats stay
    byte-identical (or keep their record id), so readers still count them once."""
    stamp = iso_utc(now)
    dedupe = Dedupe()
    for line in lines:
        if not line.strip():
            continue
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            stats.corrupt += 1
            yield line
            continue
        if dedupe.seen_line(line) or dedupe.seen_record(rec):
            stats.duplicates += 1
            tally = RepriceStats()  # re-priced as usual, counted nowhere
        else:
            tally = stats
        tally.records += 1
        old = cost_units(rec.get("total_cost"))
        new_rec = reprice_record(rec, book)
        if new_rec is None:
            tally.old_units += old or 0
            tally.new_units += old or 0
            yield line
            continue
        new = cost_units(new_rec["total_cost"])
        tally.old_units += old or 0
        tally.new_units += new or 0
        if old != new:
            tally.changed += 1
            if old is None:
                tally.newly_priced += 1
            elif new is None:
                tally.now_unpriced += 1
        else:
            tally.relabelled += 1
        new_rec["repriced_at"] = stamp
        yield dumps_record(new_rec)


def reprice_file(src: Path, dst: Path | None, book: PriceBook, *, in_place: bool = False, now: float | None = None) -> RepriceStats:
    """Write the re-priced log to ``dst``; or, with ``in_place``, atomically replace ``src``."""
    stats = RepriceStats()
    now = now if now is not None else datetime.now(timezone.utc).timestamp()
    if in_place:
        if src.suffix == ".gz":
            raise ValueError("--in-place does not rewrite compressed files; use --out")
        fd, tmp = tempfile.mkstemp(prefix=src.name + ".", suffix=".reprice", dir=src.parent)
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                tail = bytearray()  # a line the proxy was still writing when we read it
                for line in reprice_lines(_complete_lines(f, tail), book, stats, now):
                    out.write(line)
                # A running proxy writes each batch under a shared lock and follows a
                # rename (logwriter.py): holding the exclusive lock while the last lines
                # are copied and the new file swapped in, no line can fall in between.
                # Under it no write is in flight, so the piece in ``tail`` and its rest,
                # read now, make one line again.
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    out.write(bytes(tail) + f.read())  # lines appended while we worked, as they are
                    out.flush()
                    os.fsync(out.fileno())
                    os.chmod(tmp, os.stat(src).st_mode & 0o777)
                    os.replace(tmp, src)
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return stats
    assert dst is not None
    if dst.resolve() == src.resolve():
        raise ValueError("--out is the input file: use --in-place to rewrite it")
    with _open(src) as f, gzip.open(dst, "wb") if dst.suffix == ".gz" else dst.open("wb") as out:
        for line in reprice_lines(_all_lines(f), book, stats, now):
            out.write(line)
    return stats


def format_stats(stats: RepriceStats) -> str:
    lines = [
        f"records: {stats.records}",
        f"cost changed: {stats.changed} (newly priced {stats.newly_priced}, now unpriced {stats.now_unpriced})",
        f"price id or source changed, same cost: {stats.relabelled}",
        f"total before: ${units_to_usd(stats.old_units)}",
        f"total after:  ${units_to_usd(stats.new_units)}",
        f"difference:   {'+' if stats.new_units >= stats.old_units else '-'}${abs(stats.difference)}",
    ]
    if stats.corrupt:
        lines.append(f"warning: {stats.corrupt} unreadable line(s) copied unchanged")
    if stats.duplicates:
        lines.append(f"note: {stats.duplicates} repeated line(s) (a retried write) counted once, copied re-priced")
    return "\n".join(lines)


@command("reprice", "recompute the costs of a log with today's prices")
def reprice_command(argv: list[str]) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m proxy reprice",
        description="Recompute every record's cost with the current config.yml (and catalog), "
        "each at the price in force at its timestamp. The input is never changed unless --in-place.",
    )
    parser.add_argument("--config", default="config.yml")
    parser.add_argument("--in", dest="src", default=default_log_path(), help="log to read (.gz allowed)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the re-priced log here")
    group.add_argument("--in-place", action="store_true", help="atomically replace the input")
    group.add_argument("--dry-run", action="store_true", help="only report what would change")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = Path(args.src)
    if not src.exists():
        print(f"error: {src}: no such log", file=sys.stderr)
        return 2
    book = pricebook_for(config)
    try:
        if args.dry_run:
            stats = RepriceStats()
            with _open(src) as f:
                for _ in reprice_lines(_all_lines(f), book, stats, 0.0):
                    pass
        else:
            stats = reprice_file(src, Path(args.out) if args.out else None, book, in_place=args.in_place)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if args.out:
        print(f"written: {args.out}")
    elif args.in_place:
        print(f"rewritten: {src}")
    return 0
