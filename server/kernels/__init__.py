"""Triton kernels that are not MoE (attention, RMSNorm, RoPE) and the plumbing every kernel
shares; each kernel has a torch twin, used on CPU and as the oracle in tests.

Module guide (call through `ops`, which picks Triton on CUDA and the torch twin elsewhere):
  ops.py                 front door and op table: paged_decode_attention, prefill_attention,
                         write_kv_cache, write_latent_cache, mla_decode, mla_prefill, rms_norm,
                         rope (backend="auto"|"triton"|"torch"; mla_decode also
                         "triton_decode" and "dense");
                         server/moe/kernels/ops.py adds the MoE ops to the same table
  availability.py        is Triton importable, is the interpreter on, which backend for a tensor
  attention_reference.py torch twins of paged decode / varlen prefill / KV write
  attention_decode.py    Triton paged decode (GQA-packed, split-KV) and KV-cache write
  attention_prefill.py   Triton varlen causal prefill over the paged cache (cached prefix ok)
  mla_reference.py       MLA over the paged latent cache: torch twins (loop, and batched "dense" decode)
  mla_attention.py       Triton MLA: split-KV decode and varlen prefill, latent-row write
  mla_decode.py          Triton MLA decode only: 64-head blocks x KV splits, fp32 merge (the default)
  mla_decode_config.py   its launch parameters: stored per device and shape (configs/), else defaults
  mla_prefill_expanded.py Triton MLA prefill over decompressed K/V: varlen causal flash attention
  mla_prefill_config.py  which prefill form runs (absorbed | expanded | auto threshold), its tiles
  fp8_blocks.py          128x128 block FP8 arithmetic: scale shapes, e4m3 codes x scale_inv (torch)
  norm_rope.py           one-pass Triton RMSNorm and RoPE, with their torch twins
  triton_helpers.py      @triton.jit helpers (interpreter-exact bf16 dots and rounding)
  workspace.py           kernel buffer allocation, with a poison mode for checks
MoE and routing kernels live in server/moe/kernels. Importing this package (or ops) never
imports triton.
"""
