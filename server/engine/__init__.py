"""The engine: scheduler, KV cache, sampler, stops, and the EP rank orchestration.

Module guide (one job per file):
  api.py           the public surface the gRPC layer uses (dataclasses, errors, Engine protocol)
  engine_start.py  start_engine(AppConfig): the core in its own process or on a thread, an EngineClient on it
  core_client.py   EngineClient: the front end's Engine over the core (requests, text, streams)
  core_link.py     the client's live connection: event loop in use, reader, failure, shutdown
  request_table.py what the client awaits from the core: live requests, calls, frame confirmations
  core_pipes.py    the front end's end of the two ZeroMQ pipes (ipc:// or inproc://)
  messages.py      the typed messages on those pipes and their one codec (one per loop turn in, per step out)
  core_liveness.py the front end's judgement that the core still runs (heartbeat silence)
  core_host.py     what every host of the core does: connect, build, READY, run the loop
  core_loop.py     CoreLoop: the one driver of EngineCore (input, step, output and watch threads)
  core_process.py  the engine-core process: its entry point and the front end's handle on it
  core_thread.py   the same core host on a thread of the front end's process
  launcher.py      build_engine_core(AppConfig); spawns or joins EP ranks (torchrun)
  core.py          EngineCore: add_request / abort / step() -> StepOutputs, synchronous, no text
  core_types.py    EngineRequest and StepOutputs (one batched object per step)
  scheduler.py     rank 0's single scheduler: queue, rank choice, KV blocks, chunked prefill, preemption
  block_manager.py paged KV-cache block ids of one rank
  sequence.py      one request as the scheduler sees it
  request_checks.py the invariants a request must meet to be admitted (validation is the rpc layer's)
  step_plan.py     what rank 0 sends each rank per step, and what comes back
  plan_builder.py  one rank's share of a step, packed into numpy arrays in one go
  slot_table.py    a rank's per-slot state (block tables, sampling) that plans only update
  input_buffers.py a rank's persistent step inputs: pinned host staging, one device copy per step
  executor.py      running a step plan: in-process (ep 1) or scatter/gather over a gloo group
  rank_worker.py   an EP rank's start-up and plan loop
  model_runner.py  plan -> ForwardBatch -> model.forward -> sampled tokens, on one rank
  policy_switch.py a plan's `routing`: switch the rank's routing policy between steps (graphs per policy)
  distributed.py   process groups, devices, backends, torchrun environment
  rendezvous.py    the ranks' TCPStore bound to the master address, gloo/NCCL pinned to loopback
  step_watchdog.py a step far longer than recent steps means a hung rank (engine.step_timeout_s)
  warmup.py        start-up warm-up: every compiled kernel variant a step can need, before the first request
  slow_steps.py    one WARNING for a step far slower than the recent ones, with what it held
  routed_experts.py routed experts per token for the requests that ask (recorded in the forward)
  group_signals.py the engine's processes ignore Ctrl-C on the process group and follow the drain
  sampler.py       greedy / temperature / top-k / top-p, reproducible per (seed, position)
  stops.py         token-level stops and stop strings
  detokenizer.py   incremental text deltas (no broken UTF-8)
  output.py        new token ids -> GenerationChunk per request (text, stop strings, usage)
  stream.py        chunks -> stream messages (merged; server.stream_interval)
"""
_EXPORTS = {"EngineStartError": "api", "run_worker_rank": "launcher", "start_engine": "engine_start",
            "torchrun_rank": "launcher"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Lazy: `import server.engine.api` must stay light (no torch.distributed, no model code)."""
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
