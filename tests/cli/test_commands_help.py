"""The command tree as a user explores it: ``--help`` at every level, ``--version``,
hidden aliases kept out of the help, and subcommands loaded only when they run."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxy.cli import report
from proxy.cli.app import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m proxy"


def invoke(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args), prog_name=PROG, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_root_help_lists_every_command_and_the_default() -> None:
    for flag in ("--help", "-h"):
        code, out, err = invoke(flag)
        assert (code, err) == (0, "")
        assert out.startswith(f"Usage: {PROG} [OPTIONS] COMMAND [ARGS]...")
        listed = re.findall(r"^  (\w+)  ", out.split("Commands:")[1], re.MULTILINE)
        assert (
            listed
            == sorted(["serve", "report", "keys", "budgets", "pricing", "reprice", "log", "stats", "export", "demo", "simulate"])
            == sorted(COMMANDS)
        )
        assert "--version" in out and "it serves" in out


# (command path, options its help must name)
HELP = [
    (["serve"], ["--config", "--host", "--port", "--log-file", "--loop", "--verbose"]),
    (["report"], ["--log-file", "--since", "--period", "--tz", "--format", "--group-by", "-g", "-j", "-o", "-a", "--tag", "Filters"]),
    (["keys"], ["--config", "--keys-file", "create", "list", "update", "revoke"]),
    (["keys", "create"], ["--user", "--team", "--budget-monthly", "--models", "--admin", "--config", "--keys-file"]),
    (["keys", "list"], ["--log-file", "--json", "--config", "--keys-file"]),
    (["keys", "update"], ["KEY_ID", "--budget-monthly", "--models", "--user", "--team"]),
    (["keys", "revoke"], ["KEY_ID", "--config"]),
    (["budgets"], ["--config", "--log-file", "--json"]),
    (["pricing"], ["--config", "show", "check", "sync"]),
    (["pricing", "show"], ["MODEL", "--provider", "--config"]),
    (["pricing", "check"], ["--log-file", "--config"]),
    (["pricing", "sync"], ["MODELS...", "--provider", "--write", "--config"]),
    (["reprice"], ["--config", "--log-file", "--out", "--in-place", "--dry-run"]),
]


@pytest.mark.parametrize("path,names", HELP, ids=[" ".join(p) for p, _ in HELP])
def test_help_at_every_level(path: list[str], names: list[str]) -> None:
    code, out, err = invoke(*path, "--help")
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: {PROG} {' '.join(path)} [OPTIONS]")
    for name in names:
        assert name in out, name
    # The old flag names still work (tests below) but are not advertised.
    assert not re.search(r"(^|[\s,])(--file|-f|--in)(?![\w-])", out), out


def test_report_choices_come_from_the_report_layer() -> None:
    from proxy.core.periods import NAMED_PERIODS
    from proxy.reports.request import FORMATS

    _, out, _ = invoke("report", "--help")
    assert f"[{'|'.join(FORMATS)}]" in out and f"[{'|'.join(NAMED_PERIODS)}]" in out


def test_version() -> None:
    code, out, err = invoke("--version")
    assert (code, out, err) == (0, f"llm-cost-proxy {importlib.metadata.version('llm-cost-proxy')}\n", "")


def test_analyze_costs_script_is_the_report_under_its_own_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--help"], prog="analyze_costs.py") == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: analyze_costs.py [OPTIONS]")
    assert "  analyze_costs.py --since 7d --format daily" in out  # the examples name it too
    # And as a user runs it: a thin entry point that finds the package from anywhere.
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze_costs.py"), "-h"], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0 and p.stdout.startswith("Usage: analyze_costs.py [OPTIONS]"), p.stderr


LAZY = """
import sys
from proxy.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith(("aiohttp", "proxy.reports", "proxy.cli.", "proxy.web")))
print(code, " ".join(loaded), file=sys.stderr)
"""


def _loaded(tmp_path: Path, *args: str) -> tuple[int, set[str]]:
    p = subprocess.run(
        [sys.executable, "-c", LAZY, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    code, _, mods = p.stderr.strip().splitlines()[-1].partition(" ")
    return int(code), set(mods.split())


def test_subcommands_load_only_what_they_use(tmp_path: Path) -> None:
    code, mods = _loaded(tmp_path, "--help")
    assert code == 0 and mods == {"proxy.cli.app", "proxy.cli.base"}
    code, mods = _loaded(tmp_path, "keys", "--keys-file", "keys.yml", "list", "--log-file", "none.jsonl")
    assert code == 0 and "proxy.cli.keys" in mods
    assert not {m for m in mods if m.startswith(("aiohttp", "proxy.web", "proxy.reports"))}
    code, mods = _loaded(tmp_path, "serve", "--help")
    assert code == 0 and "proxy.cli.serve" in mods and "aiohttp" in mods
    # The proxy serves the analytics API, so the report engine is part of it; the
    # report command's own module is not.
    assert "proxy.reports.analytics" in mods and "proxy.cli.report" not in mods
