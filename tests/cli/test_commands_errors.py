"""A user's mistake, in any command, is one ``error:`` line on stderr and exit status 2,
never a traceback; with no command the proxy serves (so a bad serve option is such an
error too). In process: ``CliRunner`` and ``proxy.cli.main``; nothing here binds a port."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from proxy.cli import main
from proxy.cli.app import cli
from tests.support.records import gpt4o_call

PROG = "python -m proxy"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``main`` as the console script runs it, with its streams captured."""
    with CliRunner().isolation() as (out, err, _):
        try:
            code = main(argv, prog=PROG)
        except SystemExit as e:  # main returns its status; a SystemExit would be a finding too
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue().decode(), err.getvalue().decode()


def record(i: int, **extra: object) -> dict[str, object]:
    return gpt4o_call(time.time() - 60 - i, **extra)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a log, configs good and bad, and no config.yml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COST_TRACKING_FILE", raising=False)
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(20)))
    # Budgets and keys but no providers: every command that reads them works, serve refuses it.
    (tmp_path / "budgets.yml").write_text(
        "auth: {keys_file: keys.yml}\nbudgets:\n  limits:\n    - {scope: user, period: monthly, usd: 5}\n"
    )
    (tmp_path / "priced.yml").write_text(
        "catalog: {enabled: false}\nproviders:\n  openai:\n    base_url: http://127.0.0.1:1\n"
        "    models:\n      gpt-4o: {pricing: {input: 2.5, output: 10, cached_input: 1.25}}\n"
    )
    (tmp_path / "broken.yml").write_text("providers: {openai: [unclosed\n")
    return tmp_path


def assert_one_error_line(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])


USER_ERRORS = [
    (["budgets", "--bogus"], ["No such option", "--bogus", f"(see '{PROG} budgets --help')"]),
    (["budgets", "--config", "missing.yml"], ["missing.yml: file not found"]),
    (["budgets", "--config", "broken.yml"], ["broken.yml", "not valid YAML"]),
    (["report", "--log-file", "log.jsonl", "--since", "xx"], ["--since", "'xx'"]),
    # Was an OverflowError traceback (a window start before year 1), and a silent empty report.
    (["report", "--log-file", "log.jsonl", "--since", "99999999999999999999"], ["--since", "100 years"]),
    (["report", "--log-file", "log.jsonl", "--since", "-5"], ["--since", "positive"]),
    (["report", "--log-file", "log.jsonl", "--sessions", "--min-cost", "1", "--max-cost", "0.5"], ["--min-cost", "--max-cost"]),
    (["report", "--log-file", "log.jsonl", "--sessions", "--min-cost", "1e400"], ["--min-cost"]),
    (["report", "--log-file", "log.jsonl", "--min-cost", "1"], ["--min-cost needs --sessions"]),
    (["report", "--log-file", "log.jsonl", "--sessions-sort", "cost"], ["--sessions-sort needs --sessions"]),
    (["report", "--log-file", "log.jsonl", "--tz", "Nowhere/Zone"], ["--tz", "Nowhere/Zone"]),
    (["report", "--log-file", "log.jsonl", "--since", "24", "--period", "daily"], ["either"]),
    (["report", "--log-file", "log.jsonl", "--format", "pdf"], ["--format", "pdf"]),
    (["report", "--log-file", "log.jsonl", "--limit", "-1"], ["--limit"]),
    (["report", "--log-file", "log.jsonl", "--group-by", "colour"], ["--group-by"]),
    (["report", "--log-file", "log.jsonl", "--tag", "novalue"], ["--tag", "KEY=VALUE"]),
    (["report", "--log-file", "log.jsonl", "--since", "all", "--output", "nodir/out.txt"], ["--output", "nodir/out.txt"]),
    (["report", "--log-file", "nowhere/*.jsonl"], ["no log found at nowhere/*.jsonl"]),
    (["report", "-j"], ["-j", "requires an argument"]),
    (["keys", "--keys-file", "k.yml", "create", "--user", "a", "--budget-monthly", "lots"], ["--budget-monthly"]),
    (["keys", "--keys-file", "k.yml", "create", "--user", "=cmd|calc"], ["--user", "plain name"]),
    (["keys", "--keys-file", "k.yml", "create"], ["give --user"]),
    (["keys", "--keys-file", "k.yml", "revoke", "000000000000"], ["no key with id 000000000000"]),
    (["keys", "--keys-file", "k.yml", "update", "xyz", "--team", "t"], ["expected a key id"]),
    (["keys", "--keys-file", "k.yml", "update", "000000000000"], ["nothing to change"]),
    (["keys", "revoke"], ["Missing argument 'KEY_ID'", f"{PROG} keys revoke --help"]),
    (["keys", "--config", "priced.yml", "list"], ["priced.yml has no auth: section"]),
    (["keys", "rotate"], ["No such command 'rotate'"]),
    (["pricing", "show", "gpt-4o", "--config", "missing.yml"], ["missing.yml: file not found"]),
    (["pricing", "show", "gpt-4o", "--config", "priced.yml", "--provider", "azure"], ["no provider 'azure'"]),
    (["pricing", "check", "--config", "priced.yml", "--log-file", "none.jsonl"], ["none.jsonl: no such log"]),
    (["pricing", "sync", "gpt-4o", "--config", "priced.yml"], ["Missing option '--provider'"]),
    (["pricing"], ["Missing command"]),
    (["reprice", "--config", "priced.yml", "--log-file", "log.jsonl"], ["exactly one of --out, --in-place and --dry-run"]),
    (["reprice", "--config", "priced.yml", "--out", "x.jsonl", "--dry-run"], ["exactly one", "--out --dry-run"]),
    (["reprice", "--config", "priced.yml", "--log-file", "log.jsonl", "--out", "log.jsonl"], ["--in-place"]),
    (["reprice", "--config", "priced.yml", "--log-file", "none.jsonl", "--dry-run"], ["none.jsonl: no such log"]),
    (["serve", "--port", "99999"], ["--port", "99999"]),
    (["serve", "--loop", "trio"], ["--loop", "trio"]),
    (["serve", "--config", "budgets.yml"], ["budgets.yml: providers: no providers configured"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
]


@pytest.mark.parametrize("argv,expected", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_a_user_error_is_one_line_and_status_2(files: Path, argv: list[str], expected: list[str]) -> None:
    res = CliRunner().invoke(cli, argv, prog_name=PROG, catch_exceptions=False)
    assert res.stdout == ""
    assert_one_error_line(res.exit_code, res.stderr, *expected)
    # main (the console script, python -m proxy) says exactly the same.
    assert run_main(argv) == (2, "", res.stderr)


def test_no_command_serves(files: Path) -> None:
    # `python -m proxy` and `python -m proxy --option…` are `serve`: the config is read first.
    assert_one_error_line(*run_main(["--config", "missing.yml"])[::2], "missing.yml: file not found")
    assert_one_error_line(*run_main([])[::2], "config.yml: file not found")
    code, _, err = run_main(["--port", "9002", "--config", "broken.yml"])
    assert_one_error_line(code, err, "broken.yml", "not valid YAML")
    code, _, err = run_main(["--bogus"])
    assert_one_error_line(code, err, "No such option '--bogus'", f"{PROG} serve --help")


def test_keys_options_before_or_after_the_action(files: Path) -> None:
    code, out, err = run_main(["keys", "--config", "budgets.yml", "create", "--user", "alice"])
    assert code == 0 and "Created key" in out and (files / "keys.yml").exists(), err
    before = run_main(["keys", "--config", "budgets.yml", "list", "--json"])
    after = run_main(["keys", "list", "--json", "--config", "budgets.yml"])
    assert before[0] == 0 and before == after
    assert [json.loads(line)["user"] for line in before[1].splitlines()] == ["alice"]
    # --keys-file after the action too; the subcommand's value wins over the group's.
    assert run_main(["keys", "--keys-file", "other.yml", "list", "--keys-file", "keys.yml", "--json"])[1] == before[1]
    assert run_main(["pricing", "--config", "priced.yml", "show", "gpt-4o"]) == run_main(
        ["pricing", "show", "gpt-4o", "--config", "priced.yml"]
    )


def test_budgets_without_budgets_says_so_and_exits_1(files: Path) -> None:
    (files / "empty.yml").write_text("providers: {}\n")
    code, out, err = run_main(["budgets", "--config", "empty.yml"])
    assert (code, out) == (1, "") and err == "empty.yml has no budgets (add a budgets: section; see docs/budgets.md)\n"


# --- any argv at all -----------------------------------------------------------------------

WORDS = (
    # commands and subcommands
    ["serve", "report", "keys", "budgets", "pricing", "reprice", "list", "create", "update", "revoke", "show", "check", "sync", "nope"]
    # options, the hidden aliases among them
    + ["--config", "--log-file", "--file", "-f", "--in", "--json", "--since", "--start-date", "--end-date", "--period", "--tz"]
    + ["--format", "--group-by", "-g", "--limit", "--top", "--all", "--output", "--tag", "--status", "--model", "--user", "--team"]
    + ["--budget-monthly", "--models", "--admin", "--keys-file", "--provider", "--out", "--in-place", "--dry-run", "--write"]
    + ["--port", "--loop", "--no-index", "-j", "--help", "-h", "--version", "--bogus", "--"]
    # values
    + ["budgets.yml", "priced.yml", "broken.yml", "missing.yml", "log.jsonl", "none.jsonl", "*.jsonl", ".", "out.txt", "nodir/x"]
    + ["7d", "all", "24", "xx", "UTC", "local", "Nowhere/Zone", "json", "detailed", "csv", "daily", "monthly", "user", "day"]
    + ["-1", "0", "2", "99999", "abc", "50", "alice", "=cmd", "gpt-4o", "openai", "000000000000", "k=v", "2026-11-01", "", "ü\x1b"]
)
SUBCOMMANDS = {"report", "keys", "budgets", "pricing", "reprice"}
# Mostly a command path with options it takes, so that commands run deep and not only
# their parsers; sometimes any words at all.
LOGS = ["--log-file", "--file", "-f", "--in"]
REPORT = [*LOGS, "--since", "--tz", "--format", "--group-by", "--limit", "--top", "--all", "--output", "--tag", "--status"]
REPORT += ["--model", "--user", "--period", "--start-date", "--end-date", "--no-index", "-j", "--config"]
TARGET = ["--config", "--keys-file"]
OWNER = ["--user", "--team", "--budget-monthly", "--models"]
TAKES = {
    (): ["--config", "--port", "--loop", "--log-file"],
    ("report",): REPORT,
    ("budgets",): ["--config", "--log-file", "--json"],
    ("reprice",): [*LOGS, "--config", "--out", "--in-place", "--dry-run"],
    ("keys", "list"): [*TARGET, "--log-file", "--json"],
    ("keys", "create"): [*TARGET, *OWNER, "--admin"],
    ("keys", "update", "000000000000"): [*TARGET, *OWNER],
    ("keys", "revoke", "000000000000"): TARGET,
    ("pricing", "show", "gpt-4o"): ["--config", "--provider"],
    ("pricing", "check"): ["--config", "--log-file", "--file"],
    ("pricing", "sync", "gpt-4o"): ["--config", "--provider", "--write"],
}
VALUES = [w for w in WORDS if not w.startswith("--")]
CONFIGS = ["budgets.yml", "priced.yml", "broken.yml", "missing.yml"]
FILES = ["log.jsonl", "none.jsonl", "*.jsonl", ".", "out.txt", "nodir/x"]
NUMBERS = ["-1", "0", "2", "99999", "abc"]
NAMES = ["alice", "=cmd", "", "ü\x1b"]
FITTING = {
    "--config": CONFIGS,
    "--keys-file": ["keys.yml", "out.txt", "log.jsonl"],
    **{o: FILES for o in [*LOGS, "--out", "--output"]},
    **{o: NUMBERS for o in ["--limit", "--top", "-j", "--port"]},
    **{o: NAMES for o in ["--user", "--team"]},
    "--format": ["json", "detailed", "csv", "daily", "summary", "pdf"],
    "--since": ["7d", "all", "24", "xx"],
    "--tz": ["UTC", "local", "Nowhere/Zone"],
    "--budget-monthly": ["50", "abc", "-1", "none"],
}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    path = draw(st.sampled_from(sorted(TAKES)))
    names = st.sampled_from(TAKES[path] + ["--bogus", "--help"])
    argv = list(path)
    for _ in range(draw(st.integers(0, 6))):
        argv.append(draw(names))
        if draw(st.integers(0, 5)):  # a value most of the time (a flag takes none), mostly one that fits
            fitting = FITTING.get(argv[-1], VALUES)
            argv.append(draw(st.sampled_from(fitting if draw(st.integers(0, 3)) else VALUES)))
    return argv


ARGV = st.one_of(command_lines(), command_lines(), command_lines(), st.lists(st.sampled_from(WORDS), max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=ARGV)
def test_any_argv_exits_0_1_or_2_without_a_traceback(files: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setenv("COST_TRACKING_FILE", "log.jsonl")  # commands that need a log find one unless told otherwise
    # Only a valid config with providers could start a server; keep it away from serve.
    serves = not argv or argv[0] not in SUBCOMMANDS
    assume(not (serves and "priced.yml" in argv))
    code, _, err = run_main(argv)
    event(f"exit {code}")
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert_one_error_line(code, err)


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_of_zero_or_less_read_in_this_process(files: Path, jobs: str) -> None:
    """`report --jobs 0` once divided by zero while planning the index's segments."""
    code, out, err = run_main(["report", "--log-file", "log.jsonl", "--since", "100000", "--jobs", jobs])
    assert (code, "Traceback" in err) == (0, False), err
    assert code == run_main(["report", "--log-file", "log.jsonl", "--since", "100000"])[0] == 0
    assert out == run_main(["report", "--log-file", "log.jsonl", "--since", "100000", "--jobs", "1"])[1]


@pytest.mark.parametrize("keys_file", [".", "sub/"])
@pytest.mark.parametrize("command", [["revoke", "000000000000"], ["create", "--user", "alice"], ["list"]])
def test_a_keys_file_that_is_a_directory_is_one_error_line(files: Path, keys_file: str, command: list[str]) -> None:
    """`keys --keys-file .` once ended in a traceback (locking "..lock" beside no file)."""
    (files / "sub").mkdir()
    code, _, err = run_main(["keys", "--keys-file", keys_file, *command])
    assert_one_error_line(code, err, "is a directory")
    assert not list(files.glob("*.lock")) and not list((files / "sub").iterdir())
