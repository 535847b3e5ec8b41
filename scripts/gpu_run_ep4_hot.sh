#!/usr/bin/env bash
# 4 H100s (<= 8 min): rank-level skew (skewed hot_ranks, one hot rank at per-expert max/mean 1.5
# and 2.5) vs natural vs greedy_balanced vs round_robin_balanced vs EPLB (16 redundant experts
# placed from the hot-rank statistics), Qwen3-30B-A3B shape, 4 layers, B=128 L=64 O=64.
#   bash scripts/gpu_run_ep4_hot.sh        (repo root, .whl/ carried; results in $OUT)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, $OUT, environment
set -uo pipefail
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/device.txt"
run() {  # one multirun of the benchmark at ep4; JSON in $OUT/bench_ep4/runs/
  timeout 240 python3 -m server.bench "$@" parallel=ep4 bench.hf_baseline=false bench.rank_timeout_s=150 \
      "bench.out_dir=$OUT/bench_ep4" 2>&1 | tr '\r' '\n' | grep -v -E '(it/s|s/it)\]$' \
      | tee -a "$OUT/bench_ep4.log" | tail -2
}
run -m routing=skewed routing.mode=hot_ranks routing.target=1.5,2.5
run -m routing=natural,greedy_balanced,round_robin_balanced
python3 -m server.moe.eplb.build_stats policy --model conf/model/qwen3_30b_a3b.yaml --ep-size 4 \
    --routing name=skewed mode=hot_ranks target=2.5 --tokens 16384 -o "$OUT/hot_ep4_stats.json"
run routing=skewed routing.mode=hot_ranks routing.target=2.5 parallel.redundant_experts=16 \
    "parallel.eplb_stats=$OUT/hot_ep4_stats.json"
python3 -m server.bench.report "$OUT/bench_ep4"
