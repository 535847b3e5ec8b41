"""GPU-only model paths (imported only when a CUDA tensor takes them).

  kernel_attention.py  KernelAttentionMetadata: the "triton" attention backend (attention.py's
                       registry): KV write, paged decode and varlen prefill kernels, no host sync
  cuda_graphs.py       DecodeGraphRunner: decode steps captured once per batch bucket and replayed
                       (ep_size 1; routing policy and load counters inside the graph)
"""
