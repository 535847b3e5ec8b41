#!/usr/bin/env bash
# lm-eval through epserve's OpenAI-compatible front end, against lm-eval's own hf backend on the
# same checkpoint: the continuation log-likelihoods of a held-out task must agree (1e-4) under
# the natural router; under a balancing policy the difference is what rerouting costs.
#
#   ./scripts/eval_lmeval.sh                    # natural and greedy_balanced, 48 documents
#   EPSERVE_LMEVAL_POLICIES=natural ./scripts/eval_lmeval.sh
#
# Not part of CI (it installs lm-eval and its dependencies into a venv of its own, .venv-lmeval,
# torch pinned first so lm-eval cannot replace the CPU build). Offline after the install: the
# task's documents are cut here from held-out text (scripts/lmeval/build_windows.py), the model
# is the embedded tiny one. Results: lmeval_out/ (per-document samples, compare.json) and the
# table on stdout, the one docs/EVAL.md records.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${EPSERVE_LMEVAL_OUT:-$ROOT/lmeval_out}"
LMEVAL_VENV="${EPSERVE_LMEVAL_VENV:-$ROOT/.venv-lmeval}"
PORT="${EPSERVE_LMEVAL_PORT:-8093}"
POLICIES="${EPSERVE_LMEVAL_POLICIES:-natural greedy_balanced}"
DOCS="${EPSERVE_LMEVAL_DOCS:-48}"
TORCH="torch==2.13.0"

if [ -z "${EPSERVE_PYTHON:-}" ]; then  # the project's environment (set EPSERVE_PYTHON to bring another)
  source "$ROOT/scripts/env.sh"
fi
EP=(env PYTHONPATH="$ROOT" "$EPSERVE_PYTHON")

if [ ! -x "$LMEVAL_VENV/bin/lm_eval" ]; then
  echo "eval_lmeval: installing lm-eval into $LMEVAL_VENV ($TORCH first)" >&2
  python3 -m venv "$LMEVAL_VENV"
  "$LMEVAL_VENV/bin/python" -m pip install -q "$TORCH"
  printf '%s\ntransformers==5.17.0\n' "$TORCH" > "$LMEVAL_VENV/constraints.txt"
  "$LMEVAL_VENV/bin/python" -m pip install -q -c "$LMEVAL_VENV/constraints.txt" "lm-eval[hf,api]==0.4.13"
fi

mkdir -p "$OUT"
cd "$OUT"  # the task's data file is relative to where lm-eval runs
"${EP[@]}" "$ROOT/scripts/lmeval/build_windows.py" heldout_windows.jsonl --docs "$DOCS"
TINY="$("${EP[@]}" -c 'from server.model.loader import TINY_MODEL_DIR; print(TINY_MODEL_DIR)')"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LMEVAL=("$LMEVAL_VENV/bin/lm_eval" --include_path "$ROOT/scripts/lmeval" --tasks epserve_heldout --log_samples
        --batch_size 1)

echo "eval_lmeval: hf backend on $TINY" >&2
"${LMEVAL[@]}" --model hf --model_args "pretrained=$TINY,dtype=float32" --device cpu --output_path "$OUT/hf"

SERVER=""
stop_server() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=""; fi
}
trap stop_server EXIT
RUNS=()
for policy in $POLICIES; do
  echo "eval_lmeval: epserve, routing=$policy" >&2
  (cd "$ROOT" && exec "$EPSERVE_PYTHON" -m server server.port=0 "server.http_port=$PORT" "routing=$policy") \
    > "$OUT/server-$policy.log" 2>&1 &
  SERVER=$!
  "${EP[@]}" - "$PORT" "$SERVER" <<'PY'
import os, sys, time, urllib.request
port, pid, end = sys.argv[1], int(sys.argv[2]), time.monotonic() + 300
while time.monotonic() < end:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited during start-up; see its log")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read().strip() == b"SERVING":
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit("the server did not become ready in 300 s")
PY
  # One request at a time: a balancing policy's routing depends on which tokens share a step.
  "${LMEVAL[@]}" --model local-completions --output_path "$OUT/$policy" --model_args \
    "model=tiny,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$TINY,num_concurrent=1,max_retries=1,tokenized_requests=True"
  stop_server
  RUNS+=(--run "$policy=$OUT/$policy")
done

"${EP[@]}" "$ROOT/scripts/lmeval/compare.py" --hf "$OUT/hf" "${RUNS[@]}" --equal natural --tolerance 1e-4 \
  --json "$OUT/compare.json"
