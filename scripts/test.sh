#!/usr/bin/env bash
# Run the whole test suite (CPU; GPU tests are marked and skip without CUDA), then list the 20
# slowest tests so a slow CI run shows where its time went. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$EPSERVE_PYTHON" -m pytest -q --durations=20 "$@"
