# Sourced by serve.sh and test.sh: make ./.venv with the project installed, once.
# Re-installs only when pyproject.toml changes, so repeated runs start at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLM_PROXY_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python 3.11+ is needed (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV (first run only)" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  # Say what is being installed, a line per package, instead of a minute of silence;
  # pip's full output goes to a log that is shown if it fails.
  echo "setup: installing llm-cost-proxy${EXTRAS:+ with [$EXTRAS]} and its dependencies into $VENV (about a minute, once)" >&2
  PIPLOG="$VENV/pip-install.log"
  show() {  # each package as pip starts on it, then the summary line
    while IFS= read -r line; do
      case "$line" in
        "Collecting "*) line="${line#Collecting }"; echo "setup:   ${line%% *}" >&2 ;;
        "Successfully installed "*) echo "setup: done: installed ${line#Successfully installed }" >&2 ;;
      esac
    done
  }
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
      -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2>&1 | tee "$PIPLOG" | show; then
    tail -n 30 "$PIPLOG" >&2
    echo "setup: FAILED: pip install (the whole output is in $PIPLOG)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
