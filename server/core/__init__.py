"""The engine core: rank 0's scheduler and the loop that drives it, in the engine-core process
(or on a thread of the front end's: core/thread.py).

Module guide (one job per file):
  process.py        the engine-core process: its entry point and the front end's handle on it
  thread.py         the same core host on a thread of the front end's process
  host.py           what every host of the core does: connect, build, READY, run the loop
  loop.py           CoreLoop: the one driver of EngineCore (input, step, output and watch threads)
  messages.py       the typed messages on the pipes to the front end, and their one codec
  startup.py        build_engine_core(AppConfig): the launch plan, spawn or join the EP ranks, load rank 0
  engine_core.py    EngineCore: add_request / abort / step() -> StepOutputs, synchronous, no text
  step_io.py        EngineRequest and StepOutputs (one batched object per step)
  scheduler.py      the single scheduler: queue, rank choice, KV blocks, chunked prefill, preemption, n forks
  block_manager.py  paged KV-cache block ids of one rank (reference-counted: n sequences share prompt blocks)
  sequence.py       one request as the scheduler sees it
  plan_builder.py   one rank's share of a step, packed into numpy arrays in one go
  executor.py       running a step plan: in this process (ep 1) or scatter/gather over a gloo group
  stops.py          the token-level stop rule applied to every sampled token
  prompt_lp_outputs.py  prompt logprobs (and their top-N) from the ranks to the first token's outputs
  step_watchdog.py  a step far longer than recent steps means a hung rank (engine.step_timeout_s)
  slow_steps.py     one WARNING for a step far slower than the recent ones, with what it held
"""
