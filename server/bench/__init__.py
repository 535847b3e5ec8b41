"""`epserve-bench`: what does balance buy, measured on the product's path; the EP what-if; and
a static mode.

Module guide (entry: cli.py, `python -m server.bench` / console script `epserve-bench`):
  cli.py            Hydra entry (conf/bench/config.yaml + the server's model/routing/parallel groups)
  settings.py       frozen BenchSettings built once from the composed config
  -- bench.mode=engine (default): the real launcher, scheduler and model runner --
  experiment.py     ranks start once; policies switched in place, interleaved; phases, sweep, probe
  request_sets.py   seeded request sets: fixed lengths, or lightllm (lengths spread around L)
  drive.py          one request set through the EngineCore, timed per phase; the in-place switch
  probe.py          an eager run watched per step: per-rank loads, MoE times, balancedness
  bound.py          the speed-up perfect rank balance could give a phase, and uplift / bound
  stats.py          median, 95% bootstrap CI, spread, paired per-repetition ratios
  summary.py        measurements -> the run's JSON document
  balance_report.py JSON, Markdown table and PNG of a run
  served.py         bench.served: the same requests through gRPC (server subprocess, N clients)
  -- bench.mode=whatif: each policy at EP N from one device (the package's own guide) --
  whatif/           ranks' local work and expert kernels measured one after the other through
                    the engine's code, the collectives modelled (conf/interconnect), composed
  -- bench.mode=static: the kernel-level loop, a regression check beside transformers --
  static_run.py     every EP rank (ranks from the launcher), results to rank 0
  workload.py       StaticWorkload: B prompts of L random tokens, block tables, prefill/decode batches
  generate.py       greedy generation loop (prefill, then decode eager or through CUDA graphs), timed
  measure.py        one rank's whole measurement: model, graphs, timings, MoE times, loads, policy cost
  decode_roofline.py the decode step against the bytes it must read over the measured copy rate
  hf_baseline.py    the same weights in transformers, timed with its own generate()
  report.py         run JSON, summary markdown table, PNGs (load heatmap, throughput per run)
  dispatch_paths.py the EP dispatch paths (local, allgather with bf16 or fp8 rows, alltoall, one GPU) timed in one run,
                    per rank (scripts/bench_ep_dispatch.py)
  moe_timer.py      CUDA events (host clock on CPU) around every MoE block (both modes)
"""
