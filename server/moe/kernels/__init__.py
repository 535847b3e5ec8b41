"""Triton kernels of the MoE block and of the routing policies; each has a torch twin used on
CPU and in tests. Attention, norm and RoPE kernels, and the plumbing all kernels share
(availability, workspace, triton_helpers), are in server/kernels.

Module guide (the model calls the MoE ops through `ops`):
  ops.py                 fused_moe, grouped_expert_mlp, expert_mlp_rows in the kernel-op table
                         (server/kernels/ops.py); backends "triton" | "torch" | "grouped_mm"
  moe_reference.py       torch twins + torch._grouped_mm baseline; the oracle in tests
  variants.py            which compiled variants a fused-MoE call of n rows uses (the warm-up's list)
  moe_align.py           token->expert alignment (sorted ids padded per expert, block->expert)
  moe_gemm.py            grouped GEMMs (gate_up with SiLU*up epilogue; down with routing weight)
                         and the deterministic k-way combine
  fused_moe.py           the pipelines: fused_moe_triton, grouped_expert_mlp_triton, expert_mlp_rows_triton
  moe_config.py          block sizes: configs/<device>_E_H_I.json (scripts/tune_moe.py) or defaults
  fp8_quant.py           per-row, per-128-channel e4m3 activation quantisation (+ torch twin)
  moe_gemm_fp8.py        block-FP8 (W8A8) grouped GEMMs: e4m3 codes, fp32 scales per 128-wide K block
  fused_moe_fp8.py       the FP8 pipelines (same alignment and combine as fused_moe.py)
  fp8_config.py          FP8 block sizes: configs/<device>_E_H_I_fp8.json or defaults; BLOCK_K divides 128
  moe_reference_fp8.py   fp32 twins of the FP8 pipelines; block quantiser for tests and benchmarks
  greedy_route.py        Triton greedy_balanced routing (routing policy)
  greedy_route_cuda.py   CUDA greedy_balanced kernel (greedy_route.cu), built on first use
  uniform_random_route.py Triton uniform_random routing (routing policy)
Kernel checks and the interpreter / sm_90 compile harness are test plumbing: tests/kernels/support.
Importing this package (or ops) never imports triton.
"""
