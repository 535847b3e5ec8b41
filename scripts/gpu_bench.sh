#!/usr/bin/env bash
# The GPU tests and the benchmarks behind BENCHMARKS.md, on a GPU machine where epserve is
# installed (`pip install -e .`, or its dependencies importable and PYTHONPATH at the repo).
# Run from the repository root.
#
#   bash scripts/gpu_bench.sh [-o DIR] [-n EP_SIZES] WHAT...
#
#   tests     every GPU-marked test: pytest -m gpu tests/ (tests that need more GPUs than the
#             machine has skip themselves)
#   balance   what balance buys, through the real engine (bench.mode=engine): LightLLM's workload,
#             natural / greedy_balanced / round_robin_balanced switched in place and interleaved,
#             10 rounds, CIs and the balance bound; one GPU, then each -n EP size if given.
#             Results: DIR/bench_balance/balance/<tag>.{json,md,png}
#   1gpu      epserve-bench bench.mode=static (the kernel-level loop) on one GPU, Qwen3-30B-A3B shape (4 layers, random bf16), B=128 L=64
#             O=64: natural, greedy_balanced, round_robin_balanced, with transformers measured
#             once in the same process
#   policies  scripts/bench_policies.py --device cuda: one routing-policy call, E=256, k=8
#   engine    scripts/bench_engine_loop.py: EngineCore's decode step at B=16, 128, 256 (L=64, O=64),
#             engine.overlap false and true in the same process, with the host time per phase
#   mla       scripts/bench_mla_decode.py: MLA decode over the latent cache (128 heads, 512 + 64),
#             the head-block kernel, the varlen kernel and batched matmuls, against copy
#             bandwidth and matmul rate measured in the same run
#   deepseek  epserve-bench bench.mode=static on one GPU, DeepSeek-V3 shape cut to 4 layers (1 dense + 3 MoE, random
#             bf16, ~74 GB), B=128 L=64 O=64, decode in CUDA graphs: natural and greedy_balanced
#             with transformers on the same weights in the same process, then natural with
#             EPSERVE_MLA_DECODE=dense (the batched-matmul decode instead of the head-block kernel)
#   fp8       the DeepSeek-V3 shape of `deepseek` (DS_LAYERS layers, default 4; 3 fit an 80 GB card),
#             random weights drawn as an FP8 block checkpoint stores them (model.quantization=fp8:
#             e4m3 experts and dense linears on the block-FP8 kernels) beside the same shape in bf16,
#             natural routing, B=128 and bench.small_batch=8, no transformers run. Results:
#             DIR/bench_fp8/{summary.md,...}
#   ep        at each EP size (>= 3: one hot rank at 2.5x the mean needs 3 ranks): natural,
#             skewed hot_ranks 1.5 and 2.5, greedy_balanced, round_robin_balanced, then
#             hot_ranks 2.5 with EPLB (REDUNDANT experts placed from that routing's statistics)
#   eplb      at each EP size: skewed hot_ranks 1.8 as routed, with EPLB placement only (R=0),
#             with REDUNDANT replicas, and greedy_balanced (the output-changing upper bound)
#   dispatch  scripts/bench_ep_dispatch.py, one command: decode step time at B=128 and B=8 of the
#             fixed-capacity EP dispatch in CUDA graphs vs the local path on one GPU (forced,
#             size-1 group), then at each EP size vs one GPU's local path and the variable-split
#             path, and a last table of tok/s by EP size against the targets; eager prefill with
#             both dispatches (MODEL's shape, 4 layers)
#
#   whatif    the EP what-if on this one GPU (bench.mode=whatif, LightLLM's workload plus decode at 256 per
#             rank): first Qwen3-30B-A3B's 4-layer shape at ep 1 beside the real engine (the composition's
#             check), then at each -n EP size (default 8 16 32) Qwen3-30B-A3B at 48 layers and DeepSeek-V3
#             at 61 layers, routing from the tiny model's held-out trace and from each model's published
#             skew profile. Results: DIR/bench_whatif/whatif/<tag>.{json,md,png}
#
#   -o DIR       results (default ./gpu_out): DIR/device.txt, one log per step, and per
#                benchmark DIR/<bench_...>/{summary.md,summary.json,throughput.png,runs/*.json}
#   -n EP_SIZES  EP sizes for ep/eplb, e.g. "2,4" (default: every GPU of the machine)
#
# Environment: MODEL (conf/model/<MODEL>.yaml, default qwen3_30b_a3b), DS_LAYERS (fp8), REDUNDANT (default 16,
# a multiple of every EP size), BENCH_EXTRA (Hydra overrides added to every bench run), PYTHON
# (default python3). NVLink multicast is off unless the caller sets NCCL_NVLS_ENABLE,
# TORCH_SYMM_MEM_DISABLE_MULTICAST and NVSHMEM_DISABLE_NVLS otherwise.
# CPU smoke run (gloo, tiny model, a few minutes):
#   MODEL=tiny BENCH_EXTRA="bench.batch=4 bench.input_len=8 bench.output_len=4 bench.small_batch=0" \
#   REDUNDANT=4 bash scripts/gpu_bench.sh -o /tmp/smoke -n 4 ep
set -euo pipefail

DIR=gpu_out
SIZES=""
while getopts "o:n:h" opt; do
  case $opt in
    o) DIR=$OPTARG ;;
    n) SIZES=${OPTARG//,/ } ;;
    *) sed -n '2,58p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,58p' "$0"; exit 2; }

PY=${PYTHON:-python3}
MODEL=${MODEL:-qwen3_30b_a3b}
R=${REDUNDANT:-16}
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} \
       NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1} PYTHONUNBUFFERED=1
mkdir -p "$DIR"

logged() {  # logged LOG CMD...: run CMD, its output (progress bars dropped) to the screen and LOG
  local log=$1; shift
  "$@" 2>&1 | tr '\r' '\n' | { grep --line-buffered -v -E $'%\\||^[[:space:]\e[A]*$' || true; } | tee -a "$DIR/$log"
}

bench() {  # bench OUT_SUBDIR LOG [-m] OVERRIDES...: one static-mode epserve-bench run (-m: a multirun) into DIR/OUT_SUBDIR
  local sub=$1 log=$2 multi=(); shift 2
  if [ "$1" = -m ]; then multi=(-m); shift; fi
  logged "$log" "$PY" -m server.bench "${multi[@]}" bench.mode=static "model=$MODEL" "bench.out_dir=$DIR/$sub" "$@" \
      "${EXTRA[@]}"
}

balance() {  # balance OVERRIDES...: one engine-mode experiment into DIR/bench_balance
  logged balance.log "$PY" -m server.bench "model=$MODEL" bench.workload=lightllm bench.repeats=10 \
      "bench.out_dir=$DIR/bench_balance" "$@" "${EXTRA[@]}"
}

stats() {  # stats EP TARGET FILE: EPLB statistics of skewed hot_ranks routing (CPU, seconds)
  "$PY" -m server.moe.eplb.build_stats policy --model "conf/model/$MODEL.yaml" --ep-size "$1" \
      --routing name=skewed mode=hot_ranks "target=$2" --tokens 16384 -o "$3"
}

ep_sizes() {
  if [ -n "$SIZES" ]; then echo "$SIZES"; return; fi
  local gpus
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$gpus" -gt 1 ] || { echo "ep/eplb need 2+ GPUs (or -n EP_SIZES)" >&2; exit 2; }
  echo "$gpus"
}

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" 2>/dev/null || true
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' || true
  date -u +%F
} > "$DIR/device.txt"

for what in "$@"; do
  case $what in
    tests)
      logged pytest_gpu.txt "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ ;;
    balance)
      balance parallel=single
      for ep in $SIZES; do balance "parallel=ep$ep"; done ;;
    1gpu)
      bench bench_1gpu bench_1gpu.log -m routing=natural,greedy_balanced,round_robin_balanced parallel=single
      "$PY" -m server.bench.report "$DIR/bench_1gpu" ;;
    policies)
      logged policies.log "$PY" scripts/bench_policies.py --device cuda --out "$DIR/policies.json" ;;
    engine)
      logged engine_loop.log "$PY" scripts/bench_engine_loop.py --model "$MODEL" --batch 16 128 256 \
          --prompt-len 64 --new-tokens 64 --json "$DIR/engine_loop.json" ;;
    mla)
      logged mla_decode.log "$PY" scripts/bench_mla_decode.py --out "$DIR/mla_decode.json" ;;
    deepseek)
      ds=(bench.mode=static model=deepseek_v3 model.shape.num_hidden_layers=4 model.shape.first_k_dense_replace=1
          parallel=single bench.hf_experts=grouped_mm "bench.out_dir=$DIR/bench_deepseek")
      logged deepseek.log "$PY" -m server.bench -m routing=natural,greedy_balanced "${ds[@]}" "${EXTRA[@]}"
      EPSERVE_MLA_DECODE=dense logged deepseek.log "$PY" -m server.bench routing=natural "${ds[@]}" \
          bench.tag=deepseek_v3-single-natural-dense_mla "${EXTRA[@]}"
      "$PY" -m server.bench.report "$DIR/bench_deepseek" ;;
    fp8)
      f8=(bench.mode=static model=deepseek_v3 "model.shape.num_hidden_layers=${DS_LAYERS:-4}"
          model.shape.first_k_dense_replace=1 parallel=single routing=natural bench.hf_baseline=false
          "bench.out_dir=$DIR/bench_fp8")
      logged fp8.log "$PY" -m server.bench -m model.quantization=fp8,auto "${f8[@]}" "${EXTRA[@]}"
      "$PY" -m server.bench.report "$DIR/bench_fp8" ;;
    ep)
      for ep in $(ep_sizes); do
        common=("parallel=ep$ep" bench.hf_baseline=false)
        bench bench_ep "ep$ep.log" -m routing=skewed routing.mode=hot_ranks routing.target=1.5,2.5 "${common[@]}"
        bench bench_ep "ep$ep.log" -m routing=natural,greedy_balanced,round_robin_balanced "${common[@]}"
        stats "$ep" 2.5 "$DIR/eplb_stats_ep${ep}_hot2.5.json"
        bench bench_ep "ep$ep.log" routing=skewed routing.mode=hot_ranks routing.target=2.5 "${common[@]}" \
            "parallel.redundant_experts=$R" "parallel.eplb_stats=$DIR/eplb_stats_ep${ep}_hot2.5.json"
      done
      "$PY" -m server.bench.report "$DIR/bench_ep" ;;
    eplb)
      for ep in $(ep_sizes); do
        common=("parallel=ep$ep" bench.hf_baseline=false)
        hot=(routing=skewed routing.mode=hot_ranks routing.target=1.8)
        file="$DIR/eplb_stats_ep${ep}_hot1.8.json"
        stats "$ep" 1.8 "$file"
        bench bench_eplb "eplb_ep$ep.log" "${hot[@]}" "${common[@]}"
        bench bench_eplb "eplb_ep$ep.log" "${hot[@]}" "${common[@]}" parallel.redundant_experts=0 "parallel.eplb_stats=$file"
        bench bench_eplb "eplb_ep$ep.log" "${hot[@]}" "${common[@]}" "parallel.redundant_experts=$R" "parallel.eplb_stats=$file"
        bench bench_eplb "eplb_ep$ep.log" routing=greedy_balanced "${common[@]}"
      done
      "$PY" -m server.bench.report "$DIR/bench_eplb" ;;
    dispatch)
      sizes="1 ${SIZES:-2 4 8}"  # sizes above the machine's GPU count are skipped (and said so)
      # shellcheck disable=SC2086
      logged dispatch.log "$PY" scripts/bench_ep_dispatch.py --model "$MODEL" --ep $sizes --batch 128 8 \
          --json "$DIR/dispatch.json" ;;
    whatif)
      wi=("$PY" -m server.bench bench.mode=whatif bench.workload=lightllm "bench.out_dir=$DIR/bench_whatif")
      logged whatif.log "${wi[@]}" model=qwen3_30b_a3b parallel.ep_size=1 'bench.sweep=[]' bench.whatif_validate=true \
          'bench.policies=[natural]' 'bench.eplb_redundant_per_rank=[]' "${EXTRA[@]}"
      for ep in ${SIZES:-8 16 32}; do
        for model in "qwen3_30b_a3b model.shape.num_hidden_layers=48" deepseek_v3; do
          profile=$([ "${model%% *}" = deepseek_v3 ] && echo trtllm_r1_ep32_decode || echo aic_qwen3_power_law)
          # shellcheck disable=SC2086
          for source in bench.routing_source=trace "bench.routing_source=profile bench.profile=$profile"; do
            logged whatif.log "${wi[@]}" model=$model "parallel.ep_size=$ep" 'bench.sweep=[256]' $source "${EXTRA[@]}"
          done
        done
      done ;;
    *)
      echo "unknown WHAT: $what (tests, balance, 1gpu, policies, engine, mla, deepseek, ep, eplb, dispatch, whatif)" >&2
      exit 2 ;;
  esac
done
