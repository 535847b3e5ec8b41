"""bench.mode=whatif: what each routing policy buys at EP 8 to 256, answered from one device.

In DP attention + EP every collective is a barrier, so a step waits, layer by layer, for its
slowest rank. Each rank's work is measured here on one device, one rank after the other,
through the engine's own code; only the wire between them is modelled.

Module guide (entry: document.run_whatif, from server/bench/cli.py):
  plans.py        the real Scheduler's step plans for a request set at EP N (no ranks)
  sources.py      routing sources: the router's top-k per step and layer (registry SOURCES)
  recorded.py     source=model (the model's router on real text, through the real engine)
                  and source=trace (a routing=record file)
  profiles.py     source=profile: a named skew profile, conf/routing_profile/*.yaml
  shape_map.py    routing recorded on one shape carried to another; router scores for policies
  layout.py       per rank: the policy, EPLB's replica choice, the dispatcher's rows -> the
                  ids its expert kernel reads, and the loads behind them
  expert_timer.py a rank's expert kernel timed on its rows (production kernel, CUDA graphs,
                  L2 flushed; cached by the experts' row tiles)
  expert_precision.py  bench.expert_precision: dtype or fp8 experts (the engine's FP8 rule
                  decides where fp8 can run); random e4m3 experts with 128x128 block scales
  local_work.py   the dispatchers without their collectives and experts; probe model shapes
  rank_timer.py   each rank's own work per step through a real ModelRunner on probe models
  wire.py         alpha-beta collectives per interconnect profile, conf/interconnect/*.yaml
  compose.py      a step's time from its parts as the barriers run it; phase sums
  phase_stats.py  loads per phase: pairs, active experts, balancedness, critical path
  run.py          WhatIf: one variant (policy, or natural + EPLB) over one request set
  document.py     the whole run -> its document; validate.py: the real engine beside it at ep 1
  report.py       JSON, Markdown table, PNG
"""
