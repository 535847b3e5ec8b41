"""One EP rank (rank 0's share runs inside the engine-core process, ranks 1.. in their own).

Module guide (one job per file):
  rank.py           an EP rank's start-up (the launch plan from rank 0, the model shard) and plan loop
  step_plan.py      what rank 0 sends each rank per step, and what comes back
  kv_sizing.py      how many KV blocks a rank gets (free device memory on CUDA, engine.kv_cache_tokens on CPU)
  model_runner.py   plan -> ForwardBatch -> model.forward -> sampled tokens, on one rank
  pending_step.py   a launched step's outputs on their way to the host (non-blocking copies, an event)
  input_buffers.py  a rank's persistent step inputs: pinned host staging, one device copy per step
  slot_table.py     a rank's per-slot state (block tables, sampling) that plans only update
  sampler.py        greedy / temperature / top-k / top-p / min_p, reproducible per (seed, position)
  penalties.py      repetition / presence / frequency penalties: per-slot seen-token counts on the device
  sampling_extras.py the features beyond temperature (penalties, min_p, min_tokens, top-N and prompt
                    logprobs): their staging, device state and host-side flags
  policy_switch.py  a plan's `routing`: switch the rank's routing policy between steps (graphs per policy)
  routed_experts.py routed experts per token for the requests that ask (recorded in the forward)
  warmup.py         start-up warm-up: every compiled kernel variant a step can need, before the first request
  distributed.py    process groups, devices, backends, torchrun environment
  rendezvous.py     the ranks' TCPStore bound to the master address, gloo/NCCL pinned to loopback
  group_signals.py  the engine's processes ignore Ctrl-C on the process group and follow the drain
"""
