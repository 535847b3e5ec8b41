#!/usr/bin/env bash
# Run the whole test suite (CPU; GPU tests are marked and skip without CUDA). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$EPSERVE_PYTHON" -m pytest -q "$@"
