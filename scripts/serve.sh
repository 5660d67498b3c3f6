#!/usr/bin/env bash
# Start the proxy: sets up ./.venv on first run, then runs `python -m proxy "$@"`.
# Defaults: --config config.yml --host 127.0.0.1 --port 9002
# `serve.sh --demo [OPTIONS]` runs `python -m proxy demo [OPTIONS]` instead: the proxy
# in front of a simulated provider, no provider key needed (docs/demo.md).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" tokenizer,fast,reports
cd "$ROOT"
if [[ "${1:-}" == "--demo" ]]; then
  shift
  exec "$VENV/bin/python" -m proxy demo "$@"
fi
exec "$VENV/bin/python" -m proxy "$@"
