"""EPLB: output-preserving expert balance by replicating hot experts.

Balanced routing policies (greedy_balanced, ...) give the upper bound but change what the
model computes. EPLB keeps the model's routing and instead changes where experts live: R
redundant physical slots per MoE layer hold copies of hot experts, and copies are packed
onto ranks so every rank gets about the same work. Each token still goes to the experts the
router chose; only which copy serves it changes, so outputs do not change.

Module guide (one job per file):
  algorithm.py    replicate-then-pack for one layer: replicate, balanced_packing, the
                  hierarchical (groups -> nodes -> ranks) and global variants (DeepSeek's
                  published algorithm, our implementation).
  placement.py    ExpertPlacement: [layer][physical slot] -> logical expert; slot q lives on
                  rank q // (slots / ep_size). Block layout, balanced construction, expected
                  per-rank loads.
  replica_map.py  ReplicaMap: logical -> physical ids inside the forward (token t takes copy
                  t mod copies), device tables rewritten in place (CUDA-graph safe).
  transfer.py     moving expert weights between ranks when a layer is re-placed (from peers,
                  one all_to_all per layer; see its docstring for why not from disk).
  rebalance.py    ExpertRebalancer: live counters -> new placement -> weights moved; every
                  rank joins at the same step (the engine's step plan says when).
  stats.py        the statistics file format (also reads bench JSON and client JSON).
  build_stats.py  stats from a policy alone, a routing trace or a live server (CLI).
  settings.py     parallel.* keys checked against the model; the start-up placement.

Wiring: config keys parallel.redundant_experts / eplb_stats / eplb_interval / eplb_policy /
eplb_num_groups / eplb_num_nodes (server/config.py); server/eplb_setup.py checks them before
ranks start; the loader builds the model with the placement (each rank reads the experts of
its slots); MoELayer maps policy ids through the ReplicaMap before counting and dispatch;
ExpertLoadCounters keep logical counts (GetExpertLoad) and physical per-slot counts (per-rank
loads); the engine marks every eplb_interval-th step for a rebalance.
"""
from .placement import ExpertPlacement
from .replica_map import ReplicaMap
from .settings import EplbConfigError, EplbSettings, resolve_eplb

__all__ = ["EplbConfigError", "EplbSettings", "ExpertPlacement", "ReplicaMap", "resolve_eplb"]
