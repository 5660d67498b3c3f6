"""The README's commands run with a Python that lacks the dependencies (the ``python``
on PATH, cron's): they re-run themselves with the project's ./.venv, or say in one line
how to set it up. Each test uses a real bare virtualenv as that other Python."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from proxy.bootstrap import NEEDED
from tests.support.analyze_cli import ROOT


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter with none of the project's dependencies."""
    where = tmp_path_factory.mktemp("bare")
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(where)
    python = where / "bin" / "python"
    probe = subprocess.run(
        [python, "-c", f"import importlib.util as u; print([n for n in {NEEDED!r} if u.find_spec(n)])"], capture_output=True, text=True
    )
    assert probe.stdout.strip() == "[]", probe  # really bare
    return python


def run(python: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("LLM_PROXY_VENV", "LLM_PROXY_REEXEC", "VIRTUAL_ENV")}
    e.update(env or {})
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=120)


def test_analyze_costs_with_a_bare_python_runs_in_the_project_env(bare_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "cost-tracking.jsonl"
    log.write_text("")
    p = run(bare_python, "scripts/analyze_costs.py", "--since", "24", "--format", "summary", "--log-file", str(log))
    assert p.returncode == 0, p.stderr
    assert "ModuleNotFoundError" not in p.stderr
    assert p.stdout.strip()  # a report, even of an empty log


def test_python_dash_m_proxy_with_a_bare_python(bare_python: Path) -> None:
    p = run(bare_python, "-m", "proxy", "--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("llm-cost-proxy ")


def test_without_a_project_env_one_line_says_how_to_set_it_up(bare_python: Path, tmp_path: Path) -> None:
    for args in (["scripts/analyze_costs.py"], ["-m", "proxy", "report"]):
        p = run(bare_python, *args, env={"LLM_PROXY_VENV": str(tmp_path / "none")})
        assert p.returncode == 2, p
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "./scripts/serve.sh" in lines[0], p.stderr
        assert "Traceback" not in p.stderr


def test_a_broken_project_env_does_not_loop(bare_python: Path) -> None:
    # The project env is itself bare: one re-run, then the one-line error.
    p = run(bare_python, "-m", "proxy", "--version", env={"LLM_PROXY_VENV": str(bare_python.parent.parent)})
    assert p.returncode == 2 and "has them missing too" in p.stderr, p
