"""Finding the project's environment when a command is run with another Python.

The README's commands are ``python scripts/analyze_costs.py`` and ``python -m proxy``,
run from the project root, and cron runs them with whatever ``python`` is on its PATH.
That interpreter usually lacks the dependencies, which ``./scripts/serve.sh`` installed
into ``./.venv``. Rather than fail with ``ModuleNotFoundError``, the entry points
re-run themselves, unchanged, with the project's environment. Standard library only:
this runs before anything that needs a dependency is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# What the command line needs before it can say anything (the web server's own
# dependencies come with these in every install).
NEEDED = ("click", "orjson", "yaml", "aiohttp")
_AGAIN = "LLM_PROXY_REEXEC"  # set on the re-run, so a broken environment cannot loop


def project_python(root: Path | None = None) -> Path:
    """The project environment's interpreter: ``$LLM_PROXY_VENV`` or ``./.venv`` (what
    scripts/_venv.sh creates)."""
    root = root or Path(__file__).resolve().parent.parent
    venv = Path(os.environ.get("LLM_PROXY_VENV") or root / ".venv")
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def missing_dependencies() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def ensure_dependencies() -> None:
    """Return when this interpreter can run the command; else re-run the command line
    as given with the project's interpreter, or exit with one line saying how to set up."""
    missing = missing_dependencies()
    if not missing:
        return
    python = project_python()
    if python.is_file() and os.access(python, os.X_OK) and not os.environ.get(_AGAIN):
        os.environ[_AGAIN] = "1"
        # sys.orig_argv is the command line exactly as typed (`python -m proxy report …`).
        os.execv(python, [str(python), *sys.orig_argv[1:]])
    where = f"{python.parent.parent} has them missing too" if python.is_file() else "./.venv is not set up"
    sys.stderr.write(
        f"error: {sys.executable} lacks {', '.join(missing)} ({where}): "
        "run ./scripts/serve.sh once, which sets up ./.venv, or pip install -e .\n"
    )
    raise SystemExit(2)
