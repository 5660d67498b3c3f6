#!/usr/bin/env bash
# Run the whole test suite: sets up ./.venv with the test extras, then lints and checks
# the formatting (ruff), type-checks (mypy) and runs pytest; stops at the first that fails.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
cd "$ROOT"
# What the tests drive besides Python: jq (the README's recipes, run as written) and
# Chromium (the dashboard's browser test, through Playwright). Installed where missing.
need_pkg() {  # need_pkg COMMAND PACKAGE WHY
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "setup: installing $2 ($3)" >&2
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -qq "$2" >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq "$2" >/dev/null; }
  fi
  command -v "$1" >/dev/null 2>&1 || { echo "test.sh: FAILED: $1 is needed for $3 (install $2 with your package manager)" >&2; exit 1; }
}
need_pkg jq jq "the README's recipes use it"
need_pkg chromium chromium "the dashboard's browser test"
need_pkg prometheus prometheus "the Grafana dashboard's queries, run by a real Prometheus (promtool lints /metrics)"
need_pkg redis-server redis-server "the Redis budget backend tests"
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
# The tests run in parallel, a worker per CPU (pytest-xdist): CPU-bound, they took ~450 s
# in one process on CI's 2 cores. worksteal gives each worker an equal run of the tests in
# file order (a module's shared fixture is set up once) and lets one that runs out take
# half of what another has left. Not loadfile/loadscope: schemathesis gives every operation
# of tests/e2e/test_api_schema.py one node id, and those run only one of them.
# "-n 0" after this runs the tests in this one process.
exec "$VENV/bin/python" -m pytest -n logical --dist worksteal "$@"
