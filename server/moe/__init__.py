"""The MoE block and everything it is made of.

Module guide (one MoE block: gate -> router -> policy -> counters -> dispatch -> experts):
  layer.py       MoELayer: the block itself, one per MoE decoder layer
  runtime.py     MoERuntime (shared by every layer: the swappable policy, counters, dispatcher,
                 EPLB replicas) and MoEStepContext (built once per forward: routing contexts,
                 real rows of a padded batch, the common EP row count)
  router.py      router rules (ROUTER_RULES): logits -> the model's own top-k
  routing/       routing policies and their registry (routing/__init__.py)
  load_stats.py  per-layer, per-expert counters on the device
  dispatch/      dispatch/combine: local, fixed-capacity all-gather (graph-safe), variable-split
                 all-to-all, and auto (by step size); registry in dispatch/__init__.py
  experts.py     LocalExperts and the expert paths (torch loop, fused Triton kernels)
  fp8_expert_path.py  the path of experts kept as FP8 blocks (block-FP8 Triton kernels)
  kernels/       MoE and routing kernels (kernels/__init__.py)
  eplb/          expert placement, replicas and rebalancing (eplb/__init__.py)
Building blocks shared with the decoder (gated MLP, activations) come from server/layers.
"""
