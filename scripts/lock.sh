#!/usr/bin/env bash
# Regenerate scripts/requirements.lock: every run-time dependency of the Docker image
# (the package with its tokenizer, fast and reports extras), pinned with hashes, so an image
# built next month installs the same bytes. Run after changing pyproject.toml's
# dependencies; tests/unit/test_lockfile.py fails until the lock agrees with it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${TMPDIR:-/tmp}/llm-proxy-lock-tools"
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install --quiet pip-tools; }
cd "$ROOT"
"$TOOLS/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
  --allow-unsafe --all-build-deps --extra tokenizer --extra fast --extra reports --output-file scripts/requirements.lock pyproject.toml
