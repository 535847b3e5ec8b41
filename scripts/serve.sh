#!/usr/bin/env bash
# Start the epserve gRPC server on the embedded model (any Hydra overrides may follow):
#   ./scripts/serve.sh routing=fake_balance parallel=ep2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$EPSERVE_PYTHON" -m server "$@"
