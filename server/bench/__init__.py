"""`epserve-bench`: a static generation workload on the real model path, beside transformers.

Module guide (entry: cli.py, `python -m server.bench` / console script `epserve-bench`):
  cli.py          Hydra entry (conf/bench/config.yaml + the server's model/routing/parallel groups)
  settings.py     frozen BenchSettings built once from the composed config
  workload.py     StaticWorkload: B prompts of L random tokens, block tables, prefill/decode batches
  generate.py     greedy generation loop (prefill, then decode eager or through CUDA graphs), timed
  measure.py      one rank's whole measurement: model, graphs, timings, MoE times, loads, policy cost
  moe_timer.py    CUDA events (host clock on CPU) around every MoE block
  hf_baseline.py  the same weights in transformers, timed with its own generate()
  ep.py           parallel=epN: one process per rank (NCCL on GPUs, gloo on CPU), results to rank 0
  report.py       run JSON, summary markdown table, PNGs (load heatmap, throughput per run)
"""
