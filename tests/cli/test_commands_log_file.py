"""``--log-file``: one name in every command for the log, resolved in one place
(``$COST_TRACKING_FILE``, else logs/cost-tracking.jsonl), and the names earlier
versions used (``report --file/-f``, ``reprice --in``, ``pricing check --file``)
still reaching the same log."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from proxy.cli.app import cli
from tests.support.records import gpt4o_call

PROG = "python -m proxy"
PRICED = (
    "catalog: {enabled: false}\nproviders:\n  openai:\n    base_url: http://127.0.0.1:1\n"
    "    models:\n      gpt-4o: {pricing: {input: 2.5, output: 10, cached_input: 1.25}}\n"
)


def record(i: int, user: str = "alice", key: str | None = None, model: str = "gpt-4o") -> dict[str, Any]:
    return gpt4o_call(time.time() - 3600 + i, model=model, response_model=model, cache_read_tokens=0, user_id=user, key_id=key)


def write_log(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args), prog_name=PROG, env=env, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COST_TRACKING_FILE", raising=False)
    return tmp_path


def requests(out: str) -> int:
    body = json.loads(out, parse_float=Decimal)
    return int(body["totals"]["requests"])


def test_report_reads_the_log_by_every_name(workdir: Path) -> None:
    log = write_log(workdir / "logs" / "a.jsonl", [record(i) for i in range(7)])
    write_log(workdir / "logs" / "b.jsonl", [record(i) for i in range(100, 103)])
    base = ["report", "--since", "all", "--format", "json"]
    for flag in ("--log-file", "--file", "-f"):
        code, out, err = run(*base, flag, str(log))
        assert (code, requests(out)) == (0, 7), err
    code, out, _ = run(*base, env={"COST_TRACKING_FILE": str(log)})
    assert (code, requests(out)) == (0, 7)
    # Repeatable, mixing the names; globs and directories as before.
    code, out, _ = run(*base, "--log-file", str(log), "-f", str(workdir / "logs" / "b.jsonl"))
    assert (code, requests(out)) == (0, 10)
    assert requests(run(*base, "--log-file", "logs/*.jsonl")[1]) == 10
    assert requests(run(*base, "--log-file", "logs")[1]) == 10
    # The flag wins over the variable.
    code, out, _ = run(*base, "--log-file", "logs/b.jsonl", env={"COST_TRACKING_FILE": str(log)})
    assert requests(out) == 3


def test_report_says_how_to_name_a_missing_log(workdir: Path) -> None:
    code, out, err = run("report")
    assert (code, out) == (2, "")
    assert err == "error: no log found at logs/cost-tracking.jsonl (set COST_TRACKING_FILE or pass --log-file)\n"
    code, _, err = run("report", env={"COST_TRACKING_FILE": "elsewhere.jsonl"})
    assert err == "error: no log found at elsewhere.jsonl (set COST_TRACKING_FILE or pass --log-file)\n"
    # A log the user named: no hint about how to name one.
    code, _, err = run("report", "--log-file", "mine.jsonl")
    assert (code, err) == (2, "error: no log found at mine.jsonl\n")


def test_the_default_log_is_logs_cost_tracking_jsonl(workdir: Path) -> None:
    write_log(workdir / "logs" / "cost-tracking.jsonl", [record(i) for i in range(4)])
    assert requests(run("report", "--since", "all", "--format", "json")[1]) == 4


def test_reprice_reads_in_and_log_file_alike(workdir: Path) -> None:
    (workdir / "config.yml").write_text(PRICED.replace("input: 2.5", "input: 5"))
    log = write_log(workdir / "cost.jsonl", [record(i) for i in range(5)])
    outputs = {flag: run("reprice", flag, str(log), "--dry-run") for flag in ("--log-file", "--in")}
    outputs["env"] = run("reprice", "--dry-run", env={"COST_TRACKING_FILE": str(log)})
    assert len(set(outputs.values())) == 1
    code, out, err = outputs["--in"]
    assert code == 0 and "records: 5" in out and "cost changed: 5 " in out, err
    code, out, _ = run("reprice", "--in", str(log), "--out", "new.jsonl")
    assert code == 0 and "written: new.jsonl" in out and len((workdir / "new.jsonl").read_text().splitlines()) == 5


def test_pricing_check_reads_file_and_log_file_alike(workdir: Path) -> None:
    (workdir / "config.yml").write_text(PRICED)
    log = write_log(workdir / "cost.jsonl", [record(0), record(1, model="mystery-model")])
    outputs = {run("pricing", "check", flag, str(log)) for flag in ("--log-file", "--file")}
    outputs.add(run("pricing", "check", env={"COST_TRACKING_FILE": str(log)}))
    [(code, out, _)] = outputs
    assert code == 1 and "openai/mystery-model  1 call(s)" in out


def test_budgets_read_the_named_log(workdir: Path) -> None:
    (workdir / "config.yml").write_text("budgets:\n  limits:\n    - {scope: user, period: monthly, usd: 1}\n")
    log = write_log(workdir / "cost.jsonl", [record(i, user="bob") for i in range(4)])
    code, out, err = run("budgets", "--json", "--log-file", str(log))
    assert (code, err) == (0, "")
    [bob] = [json.loads(line, parse_float=Decimal) for line in out.splitlines()]
    assert bob["budget"] == "user:bob monthly (each user)" and bob["spent_usd"] == Decimal("0.014")
    assert run("budgets", "--json", env={"COST_TRACKING_FILE": str(log)})[1] == out
    assert run("budgets", "--json")[1] == ""  # the default log does not exist: nothing spent


def test_keys_list_reads_the_named_log(workdir: Path) -> None:
    (workdir / "config.yml").write_text("auth: {keys_file: keys.yml}\n")
    code, out, err = run("keys", "create", "--user", "carol", "--budget-monthly", "10")
    assert code == 0, err
    [key] = [line.strip() for line in out.splitlines() if line.strip().startswith("lcp-")]
    kid = json.loads(run("keys", "list", "--json")[1])["id"]
    log = write_log(workdir / "cost.jsonl", [record(i, user="carol", key=kid) for i in range(2)])
    for args, env in ((["--log-file", str(log)], None), ([], {"COST_TRACKING_FILE": str(log)})):
        code, out, err = run("keys", "list", "--json", *args, env=env)
        assert code == 0 and key not in out + err
        assert json.loads(out)["spent_this_month"] == "$0.007"
    code, out, err = run("keys", "list", "--log-file", str(log))
    assert code == 0 and out.splitlines()[1].split()[:6] == [kid, "carol", "-", "all", "$10.00", "$0.007"]
    assert err == f"(month to date in UTC, from {log})\n"
