#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the pinned CPU set plus
# epserve itself (editable). Re-installs only when requirements/cpu.txt or pyproject.toml change.
# Sourced by scripts/serve.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPSERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.epserve-stamp"
want="$(cat "$ROOT/requirements/cpu.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "epserve: creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "epserve: installing pinned dependencies (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements/cpu.txt" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" >&2
  echo "$want" > "$STAMP"
fi
export EPSERVE_PYTHON="$VENV/bin/python"
