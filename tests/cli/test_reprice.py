"""`python -m proxy reprice` and `pricing` commands, run as a user runs them."""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def write_config(path: Path, gpt4o_input: str, with_history: bool = False) -> None:
    pricing = f"{{input: {gpt4o_input}, output: 10, cached_input: 1.25}}"
    if with_history:
        pricing = f"[{{input: 2.50, output: 10, cached_input: 1.25, until: 2026-11-01}}, {pricing}]"
    path.write_text(
        "# my comment stays\n"
        "catalog: {enabled: false}\n"
        "providers:\n"
        "  openai:\n"
        "    base_url: http://127.0.0.1:1\n"
        "    models:\n"
        f"      gpt-4o: {{pricing: {pricing}}}\n"
    )


def record(ts: str, inp: int, cached: int, out: int, cost: str | None, model: str = "gpt-4o") -> dict:
    return {
        "schema_version": 1,
        "timestamp": ts,
        "provider": "openai",
        "provider_type": "openai",
        "model": model,
        "response_model": f"{model}-2024-08-06",
        "status": 200,
        "input_tokens": inp,
        "output_tokens": out,
        "total_tokens": inp + out,
        "cache_read_tokens": cached,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "reasoning_tokens": 0,
        "web_search_requests": 0,
        "input_cost": None,
        "output_cost": None,
        "total_cost": None if cost is None else float(cost),
        "pricing_source": "config" if cost else None,
        "price_id": "old",
        "usage_source": "provider",
    }


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    rows = [
        # before and after a price change on 2026-11-01; one unpriced model; one failed call
        record("2026-10-15T10:00:00.000Z", 10000, 8000, 500, "0.02"),
        record("2026-11-15T10:00:00.000Z", 10000, 8000, 500, "0.02"),
        record("2026-11-16T10:00:00.000Z", 1000, 0, 100, "0.0035"),
        record("2026-11-16T11:00:00.000Z", 100, 0, 10, None, model="mystery-model"),
        {**record("2026-11-16T12:00:00.000Z", 0, 0, 0, "0"), "status": 500},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"torn": ')  # a corrupt line survives untouched
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def expected_cost(inp: int, cached: int, out: int, rate_in: str) -> Decimal:
    return ((inp - cached) * Decimal(rate_in) + cached * Decimal("1.25") + out * Decimal(10)) / Decimal(1_000_000)


def test_reprice_to_new_file_with_effective_dates(log_dir: Path):
    write_config(log_dir / "config.yml", "5.00", with_history=True)
    src = log_dir / "log.jsonl"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    res = run("reprice", "--config", "config.yml", "--in", "log.jsonl", "--out", "repriced.jsonl", cwd=log_dir)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # original untouched

    out_lines = (log_dir / "repriced.jsonl").read_text().splitlines()
    assert out_lines[2] == '{"torn": '
    recs = [json.loads(ln) for ln in out_lines if ln != '{"torn": ']
    # the October call keeps the old price (2.50), the November ones get the new one (5.00)
    assert Decimal(str(recs[0]["total_cost"])) == expected_cost(10000, 8000, 500, "2.50") == Decimal("0.02")
    assert Decimal(str(recs[1]["total_cost"])) == expected_cost(10000, 8000, 500, "5.00")
    assert Decimal(str(recs[2]["total_cost"])) == expected_cost(1000, 0, 100, "5.00")
    assert recs[3]["total_cost"] is None and recs[4]["total_cost"] == 0
    assert recs[1]["pricing_source"] == "config" and recs[1]["price_id"] != "old" and "repriced_at" in recs[1]
    for r in recs[1:3]:
        assert Decimal(str(r["input_cost"])) + Decimal(str(r["output_cost"])) == Decimal(str(r["total_cost"]))

    diff = (expected_cost(10000, 8000, 500, "5.00") - Decimal("0.02")) + (expected_cost(1000, 0, 100, "5.00") - Decimal("0.0035"))
    assert "cost changed: 2 " in res.stdout
    assert f"difference:   +${diff.normalize()}" in res.stdout
    assert "1 unreadable line" in res.stdout


def test_reprice_in_place_is_atomic_and_dry_run_changes_nothing(log_dir: Path):
    write_config(log_dir / "config.yml", "5.00")
    src = log_dir / "log.jsonl"
    before = src.read_bytes()
    res = run("reprice", "--config", "config.yml", "--in", "log.jsonl", "--dry-run", cwd=log_dir)
    assert res.returncode == 0 and "cost changed: 3 " in res.stdout and src.read_bytes() == before
    res = run("reprice", "--config", "config.yml", "--in", "log.jsonl", "--in-place", cwd=log_dir)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(ln) for ln in src.read_text().splitlines() if ln.startswith('{"schema')]
    assert Decimal(str(recs[0]["total_cost"])) == expected_cost(10000, 8000, 500, "5.00")
    assert not list(log_dir.glob("*.reprice"))  # no temp file left behind
    # a second run finds nothing more to change
    res = run("reprice", "--config", "config.yml", "--in", "log.jsonl", "--dry-run", cwd=log_dir)
    assert "cost changed: 0 " in res.stdout


def test_reprice_refuses_to_overwrite_its_input(log_dir: Path):
    write_config(log_dir / "config.yml", "5.00")
    res = run("reprice", "--config", "config.yml", "--in", "log.jsonl", "--out", "log.jsonl", cwd=log_dir)
    assert res.returncode == 2 and "--in-place" in res.stderr


def test_pricing_show_check_and_sync(log_dir: Path):
    write_config(log_dir / "config.yml", "2.50")
    res = run("pricing", "show", "gpt-4o-2024-08-06", "--config", "config.yml", cwd=log_dir)
    assert res.returncode == 0 and "-> gpt-4o, from the config.yml" in res.stdout and "2.5" in res.stdout
    # A deployment that answers with its own name: priced through the requested gpt-4o.
    with (log_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps({**record("2026-11-17T10:00:00.000Z", 100, 0, 10, "0.00035"), "response_model": "acme-deploy-7"}) + "\n")
    res = run("pricing", "check", "--config", "config.yml", "--file", "log.jsonl", cwd=log_dir)
    assert res.returncode == 1 and "openai/mystery-model" in res.stdout
    assert "acme-deploy-7" not in res.stdout  # priced, so not listed as unpriced

    # sync writes a catalog price into config.yml, keeping its comments
    cfg = log_dir / "config.yml"
    cfg.write_text(cfg.read_text().replace("catalog: {enabled: false}", "catalog: {enabled: true}"))
    cfg.chmod(0o600)
    res = run("pricing", "sync", "gpt-4.1-mini", "o3", "--provider", "openai", "--config", "config.yml", "--write", cwd=log_dir)
    assert res.returncode == 0, res.stderr
    text = cfg.read_text()
    assert text.startswith("# my comment stays\n") and '"gpt-4.1-mini": {pricing: {input: 0.4' in text
    assert cfg.stat().st_mode & 0o777 == 0o600  # a config holding keys stays private
    # o3's price history comes along: calls before 2025-06-10 keep the old price
    assert "until: 2025-06-10" in text
    res = run("pricing", "show", "o3", "--config", "config.yml", cwd=log_dir)
    assert "from the config.yml" in res.stdout and "before 2025-06-10" in res.stdout
    res = run("pricing", "show", "gpt-4.1-mini", "--config", "config.yml", cwd=log_dir)
    assert "from the config.yml" in res.stdout


def _log_census(text: str) -> dict[str, Any]:
    """What a log holds, line by line, so that a wrong count says what went wrong."""
    seqs: list[int] = []
    empty: list[int] = []
    unparseable: list[tuple[int, str]] = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if not ln.strip():
            empty.append(i)
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            unparseable.append((i, ln[:60] + ("..." if len(ln) > 60 else "")))
            continue
        if isinstance(rec, dict) and "seq" in rec:
            seqs.append(rec["seq"])
    return {"lines": len(lines), "empty": empty, "unparseable": unparseable, "seqs": seqs}


def test_in_place_reprice_under_a_running_writer_loses_no_line(log_dir: Path):
    """The proxy keeps appending through its open file while the log is rewritten and
    swapped; every line written before, during and after must be in the new file, once,
    whole, in order."""
    import threading

    from proxy.config import load_config, pricebook_for
    from proxy.storage.logwriter import JsonlWriter
    from proxy.storage.rewrite import reprice_file

    write_config(log_dir / "config.yml", "5.00")
    src = log_dir / "log.jsonl"
    base = _log_census(src.read_text())
    writer = JsonlWriter(src, console_fd=None)
    stop = threading.Event()
    written = [0]

    def line(ts: str) -> bytes:  # each line unique (seq), so repeats and losses show
        return (json.dumps({**record(ts, 10, 0, 1, "0.000035"), "seq": written[0]}) + "\n").encode()

    def proxy_traffic() -> None:
        while not stop.is_set() and written[0] < 5000:
            writer.write(line("2026-11-20T10:00:00.000Z"))
            written[0] += 1

    t = threading.Thread(target=proxy_traffic)
    t.start()
    reprice_file(src, None, pricebook_for(load_config(log_dir / "config.yml")), in_place=True)
    stop.set()
    t.join()
    for _ in range(3):  # and after the swap
        writer.write(line("2026-11-21T10:00:00.000Z"))
        written[0] += 1
    writer.close()

    got = _log_census(src.read_text())
    seqs = got["seqs"]
    counts = collections.Counter(seqs)
    duplicated = sorted(s for s, c in counts.items() if c > 1)
    missing = sorted(set(range(written[0])) - set(counts))
    new_unparseable = got["unparseable"][len(base["unparseable"]) :]
    new_empty = got["empty"][len(base["empty"]) :]
    assert (duplicated, missing, new_empty, new_unparseable) == ([], [], [], []), (
        f"{got['lines']} lines for {base['lines']} + {written[0]} written: "
        f"duplicated seqs {duplicated[:10]}, missing seqs {missing[:10]}, "
        f"new empty lines at {new_empty[:10]}, new unparseable lines {new_unparseable[:10]}"
    )
    assert seqs == sorted(seqs), "lines out of write order"
    assert got["lines"] == base["lines"] + written[0]


def test_in_place_reprice_keeps_a_line_caught_mid_write_whole(log_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A read of a file being appended to can end inside a line (a write is copied one
    page-cache folio at a time). Deterministically: the log ends in half a line when the
    rewriter reads it, and the writer finishes that line just before the exclusive lock
    is taken. The line must come out whole, not as a fragment and its rest."""
    from proxy.config import load_config, pricebook_for
    from proxy.storage import rewrite as reprice

    write_config(log_dir / "config.yml", "5.00")
    src = log_dir / "log.jsonl"
    base = _log_census(src.read_text())
    whole = (json.dumps({**record("2026-11-20T10:00:00.000Z", 10, 0, 1, "0.000035"), "seq": 0}) + "\n").encode()
    half = len(whole) // 2
    with src.open("ab") as f:
        f.write(whole[:half])  # in flight: the first folio's share is visible

    real_flock = reprice.fcntl.flock

    class Fcntl:
        LOCK_EX, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        @staticmethod
        def flock(fd: int, op: int) -> None:
            if op == fcntl.LOCK_EX:
                with src.open("ab") as f:
                    f.write(whole[half:])  # the write completes before our lock
            real_flock(fd, op)

    monkeypatch.setattr(reprice, "fcntl", Fcntl)
    reprice.reprice_file(src, None, pricebook_for(load_config(log_dir / "config.yml")), in_place=True)
    got = _log_census(src.read_text())
    assert got["unparseable"] == base["unparseable"] and got["seqs"] == [0]
    assert got["lines"] == base["lines"] + 1
    assert src.read_bytes().endswith(whole)  # appended after the read: copied as it is


def test_reprice_joins_a_line_read_in_two_pieces():
    from proxy.storage.rewrite import all_lines as _all_lines
    from proxy.storage.rewrite import complete_lines as _complete_lines

    tail = bytearray()
    pieces = [b'{"a": 1}\n', b'{"b":', b" 2}\n", b'{"c": 3']  # as readline returns them from a growing file
    assert list(_complete_lines(iter(pieces), tail)) == [b'{"a": 1}\n', b'{"b": 2}\n'] and tail == b'{"c": 3'
    assert list(_all_lines(iter(pieces)))[-1] == b'{"c": 3'  # a snapshot ends there (reprice_lines ends the line)
