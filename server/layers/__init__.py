"""Model building blocks that know nothing of MoE routing or of a whole model: the MoE block
(server/moe) and the decoder (server/model) are both made of these.

Module guide:
  activation.py        `hidden_act` name -> function (transformers' ACT2FN names)
  layernorm.py         RMSNorm (transformers' rounding order; one Triton pass on CUDA)
  mlp.py               GatedMLP: down(act(gate(x)) * up(x)) (dense layers, shared experts)
  rotary_embedding.py  RoPE tables (default / linear / YaRN scaling) and their application
  attention.py         paged attention: per-step metadata, KV-cache write, the torch loop (also
                       over an MLA latent cache), and the backend registry (torch on CPU, Triton on CUDA)
  attention_triton.py  KernelAttentionMetadata: the "triton" backend (decode / prefill kernels)
Kernels come from server/kernels; nothing here imports server/moe or server/model.
"""
