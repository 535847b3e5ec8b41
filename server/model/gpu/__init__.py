"""GPU-only model paths (imported only when a CUDA model takes them).

  cuda_graphs.py       DecodeGraphRunner: decode steps captured once per batch bucket and replayed
                       (routing policy, EPLB replica choice, load counters and, with a
                       fixed-capacity EP dispatcher, its collectives inside the graph; every
                       EP rank replays the same bucket each step)
The "triton" attention backend these graphs capture is server/layers/attention_triton.py.
"""
