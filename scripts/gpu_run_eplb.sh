#!/usr/bin/env bash
# EPLB on 2 or 4 GPUs (~5 min per EP size): skewed natural routing vs the same routing with
# EPLB (redundant experts placed from stats of that routing) vs greedy_balanced (the
# output-changing upper bound). Qwen3-30B-A3B shape (4 layers, random bf16), B=128 L=64 O=64.
# Throughput and per-rank max/mean land in $OUT/bench_eplb/summary.md ("rank max/mean" column).
#   bash scripts/gpu_run_eplb.sh            # every GPU of the machine
#   bash scripts/gpu_run_eplb.sh 2 4        # EP sizes to run (each needs that many GPUs)
#   CPU smoke: MODEL=tiny BENCH_EXTRA="bench.batch=4 bench.input_len=8 bench.output_len=4 bench.small_batch=0" \
#              CUDA_VISIBLE_DEVICES= bash scripts/gpu_run_eplb.sh 2
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, $OUT, environment
set -uo pipefail
PY=${PYTHON:-python3}
MODEL=${MODEL:-qwen3_30b_a3b}       # conf/model/$MODEL.yaml
R=${REDUNDANT:-16}                  # redundant experts per layer (a multiple of every EP size run)
ZIPF=${ZIPF_TARGET:-3}              # skewed zipf: per-expert max/mean
HOT=${HOT_TARGET:-1.8}              # skewed hot_ranks: one hot rank at this per-rank max/mean
EXTRA=${BENCH_EXTRA:-}
MODES=${EPLB_MODES:-"zipf hot_ranks"}  # skewed modes to run
UPPER=${EPLB_UPPER:-1}              # 0: skip the greedy_balanced run (when gpu_run_ep.sh made it)
mkdir -p "$OUT/eplb_stats" "$OUT/bench_eplb"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
SIZES=${*:-$GPUS}
echo "GPUs: $GPUS, EP sizes: $SIZES, model $MODEL, R=$R" | tee "$OUT/bench_eplb/device.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv \
    | tee -a "$OUT/bench_eplb/device.txt"

bench() {  # one benchmark run; its JSON goes to $OUT/bench_eplb/runs/
  timeout 240 $PY -m server.bench model=$MODEL bench.hf_baseline=false bench.rank_timeout_s=200 \
      "bench.out_dir=$OUT/bench_eplb" "$@" $EXTRA 2>&1 \
      | tr '\r' '\n' | grep -v -E '(it/s|s/it)\]$' | tee -a "$OUT/bench_eplb/ep$EP.log" | tail -3
}

for EP in $SIZES; do
  # 0. GPU checks of EPLB itself: replica map inside a CUDA graph, CUDA model, NCCL ep2 weight moves.
  timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/eplb/test_eplb_gpu.py 2>&1 | tail -4 \
      | tee -a "$OUT/bench_eplb/ep$EP.log"
  for MODE in $MODES; do
    TARGET=$([ "$MODE" = zipf ] && echo "$ZIPF" || echo "$HOT")
    ROUTING="routing=skewed routing.mode=$MODE routing.target=$TARGET"
    STATS="$OUT/eplb_stats/${MODEL}_ep${EP}_${MODE}${TARGET}.json"
    # 1. Stats of this routing (CPU, seconds): what a deployment learns from GetExpertLoad or a trace.
    $PY -m server.moe.eplb.build_stats policy --model "conf/model/$MODEL.yaml" --ep-size "$EP" \
        --routing name=skewed mode=$MODE target=$TARGET --tokens 16384 -o "$STATS" || exit 1
    # 2. The skew as routed, then the same routing with EPLB: placement only (R=0) and R copies.
    bench "parallel=ep$EP" $ROUTING
    bench "parallel=ep$EP" $ROUTING parallel.redundant_experts=0 "parallel.eplb_stats=$STATS"
    bench "parallel=ep$EP" $ROUTING parallel.redundant_experts=$R "parallel.eplb_stats=$STATS"
  done
  # 3. The output-changing upper bound.
  [ "$UPPER" = 0 ] || bench "parallel=ep$EP" routing=greedy_balanced
done

$PY -m server.bench.report "$OUT/bench_eplb"
