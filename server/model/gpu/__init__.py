"""GPU-only model paths (imported only when a CUDA model takes them).

  cuda_graphs.py       DecodeGraphRunner: decode steps captured once per batch bucket and replayed
                       (ep_size 1; routing policy and load counters inside the graph)
The "triton" attention backend these graphs capture is server/layers/attention_triton.py.
"""
