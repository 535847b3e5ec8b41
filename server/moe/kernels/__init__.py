"""Triton kernels for the GPU hot path; each has a torch twin used on CPU and in tests.

Module guide (call through `ops`, which picks Triton on CUDA and the torch twin elsewhere):
  ops.py                 front door: fused_moe, grouped_expert_mlp, paged_decode_attention,
                         prefill_attention, write_kv_cache (backend="auto"|"triton"|"torch"|...)
  moe_reference.py       torch twins + torch._grouped_mm baseline; the oracle in tests
  moe_align.py           token->expert alignment (sorted ids padded per expert, block->expert)
  moe_gemm.py            grouped GEMMs (gate_up with SiLU*up epilogue; down with routing weight)
                         and the deterministic k-way combine
  fused_moe.py           the two pipelines: fused_moe_triton, grouped_expert_mlp_triton
  moe_config.py          block sizes: configs/<device>_E_H_I.json (scripts/tune_moe.py) or defaults
  attention_reference.py torch twins of paged decode / varlen prefill / KV write
  attention_decode.py    Triton paged decode (GQA-packed, split-KV) and KV-cache write
  attention_prefill.py   Triton varlen causal prefill over the paged cache (cached prefix ok)
  greedy_route.py        Triton greedy_balanced routing (routing policy)
  checks.py, interpret.py, workspace.py, triton_helpers.py, availability.py: test plumbing
Importing this package (or ops) never imports triton.
"""
