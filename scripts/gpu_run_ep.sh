#!/usr/bin/env bash
# 2 or 4 H100s (<= 8 min): the NCCL EP test of the model (grouped expert kernels on dispatched
# rows), then epserve-bench at each EP size given (default: every GPU of the machine):
# skewed natural routing (target max/mean 1.5, 2, 3) vs greedy_balanced vs round_robin_balanced,
# Qwen3-30B-A3B shape (4 layers), B=128 L=64 O=64, plus decode at B=8 (small-batch).
# Run from the repo root with .whl/ carried:  bash scripts/gpu_run_ep.sh        (or: ... 2 / ... 4)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, $OUT, environment
set -uo pipefail
EXTRA=${BENCH_EXTRA:-}  # extra bench overrides (CPU dry run: BENCH_EXTRA="model=tiny bench.batch=4 ...")
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
SIZES=${*:-$GPUS}
echo "GPUs: $GPUS, EP sizes: $SIZES" | tee -a "$OUT/device.txt"

# 1. NCCL EP oracle test (4 families vs transformers and a dense reference, ~1 min).
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/model/test_model_gpu.py -k nccl 2>&1 \
    | tee "$OUT/pytest_gpu_ep.txt" | tail -15
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu_ep.txt"

# 2. The EP benchmark: ~35 s per run, 5 runs per EP size (ranks spawned per run, NCCL).
for EP in $SIZES; do
  timeout 190 python3 -m server.bench -m routing=skewed routing.target=1.5,2,3 "parallel=ep$EP" \
      bench.hf_baseline=false bench.rank_timeout_s=150 "bench.out_dir=$OUT/bench_ep" $EXTRA 2>&1 \
      | tr '\r' '\n' | grep -v -E '(it/s|s/it)\]$' | tee -a "$OUT/bench_ep$EP.log" | tail -6
  timeout 130 python3 -m server.bench -m routing=greedy_balanced,round_robin_balanced "parallel=ep$EP" \
      bench.hf_baseline=false bench.rank_timeout_s=120 "bench.out_dir=$OUT/bench_ep" $EXTRA 2>&1 \
      | tr '\r' '\n' | grep -v -E '(it/s|s/it)\]$' | tee -a "$OUT/bench_ep$EP.log" | tail -6
done

# Last: the compact table (full one in $OUT/bench_ep/summary.md).
python3 -m server.bench.report "$OUT/bench_ep"
