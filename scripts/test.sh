#!/usr/bin/env bash
# Run the whole test suite: sets up ./.venv with the test extras, then pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
