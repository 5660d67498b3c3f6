#!/usr/bin/env bash
# Run the whole test suite: sets up ./.venv with the test extras, then lints and checks
# the formatting (ruff), type-checks (mypy) and runs pytest; stops at the first that fails.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
cd "$ROOT"
# The README's quickstart test runs its jq recipes as written: install jq where missing.
if ! command -v jq >/dev/null 2>&1; then
  echo "setup: installing jq (the README's recipes use it)" >&2
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -qq jq >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq jq >/dev/null; }
  fi
  command -v jq >/dev/null 2>&1 || { echo "test.sh: FAILED: jq is needed (install it with your package manager)" >&2; exit 1; }
fi
if ! "$VENV/bin/ruff" check --quiet .; then
  echo "test.sh: FAILED: ruff check (findings above; 'ruff check --fix' fixes the safe ones)" >&2
  exit 1
fi
if ! "$VENV/bin/ruff" format --check --quiet .; then
  echo "test.sh: FAILED: ruff format (files above; 'ruff format' rewrites them)" >&2
  exit 1
fi
if ! "$VENV/bin/mypy"; then
  echo "test.sh: FAILED: mypy (errors above; configuration in pyproject.toml [tool.mypy])" >&2
  exit 1
fi
exec "$VENV/bin/python" -m pytest "$@"
