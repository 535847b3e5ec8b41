#!/usr/bin/env bash
# One H100 (<= 8 min): GPU tests of the model's GPU path and decode graphs, then epserve-bench on
# the Qwen3-30B-A3B shape (4 layers, random bf16 weights), B=128 L=64 O=64, for natural,
# greedy_balanced and round_robin_balanced, with transformers measured in the same process.
# Run from the repo root on the device machine with .whl/ carried:  bash scripts/gpu_run_1gpu.sh
# Results: $OUT/bench/{summary.md,summary.json,throughput.png,*_load.png,runs/*.json}, logs in $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, $OUT, environment
set -uo pipefail
EXTRA=${BENCH_EXTRA:-}  # extra bench overrides (CPU dry run: BENCH_EXTRA="model=tiny bench.batch=4 ...")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, hydra; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'hydra', hydra.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/device.txt"

# 1. GPU tests (~2 min): no host sync in eager decode, graphs == eager, Triton path vs torch path.
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/model/test_gpu_graphs.py 2>&1 | tee "$OUT/pytest_gpu_graphs.txt" | tail -25
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu_graphs.txt"

# 2. The benchmark (~3 min): three policies, one process, transformers measured once and shared.
timeout 270 python3 -m server.bench -m routing=natural,greedy_balanced,round_robin_balanced parallel=single \
    "bench.out_dir=$OUT/bench" $EXTRA 2>&1 | tr '\r' '\n' | grep -v -E '(it/s|s/it)\]$' | tee "$OUT/bench_1gpu.log" | tail -15
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_1gpu.log"

# Last: the compact table (full one in $OUT/bench/summary.md).
python3 -m server.bench.report "$OUT/bench"
