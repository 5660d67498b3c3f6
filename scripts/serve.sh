#!/usr/bin/env bash
# Start the proxy: sets up ./.venv on first run, then runs `python -m proxy "$@"`.
# Defaults: --config config.yml --host 127.0.0.1 --port 9002
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" tokenizer,fast
cd "$ROOT"
exec "$VENV/bin/python" -m proxy "$@"
