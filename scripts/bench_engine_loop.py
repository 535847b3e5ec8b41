"""The engine's own step loop, in process (no gRPC, no asyncio, no text): time per decode step
and where the host time goes, with overlapped scheduling on and off in the same run.

A direct driver of EngineCore (server/core/engine_core.py): B requests (prompt P tokens, N new
tokens each, half greedy, half seeded sampling) are added at once, then `core.step()` runs
until every request has finished. Timers wrap the loop's phases:

  plan     scheduler.plan (the stepping thread)
  stage    the batch's inputs built into the step buffers + the host-to-device copy
  forward  model forward or decode-graph replay (on CUDA: the host time of the launch)
  sample   the sampler, the next-token scatter and the tokens' copy to the host
  wait     the stepping thread waiting for a step it launched (the device, or the step thread)
  apply    scheduler.update, token-level stops and the step's StepOutputs

Phases are CPU time of the thread that ran them (wait: wall time), per forward step, summed
over the repeats. "host/step" is the process's CPU time per step minus the forward's: the
loop's own work, wherever it runs (run with --threads 1 on CPU, so the forward's CPU time is
its thread's). On CUDA `sample` is the host time of its launches; on CPU it is the sampler's
arithmetic.
"decode/step" is wall time per step after the prefill step, in the fastest repeat. On CPU the
forward is host work too: with overlap it runs on the step thread beside plan and apply.

With --features, every request also asks for what the sampling features cost: repetition,
presence and frequency penalties, min_p on the rows that draw, min_tokens and 5 top logprobs.

  python scripts/bench_engine_loop.py --batch 16 128 256                       # CPU, tiny model
  python scripts/bench_engine_loop.py --model qwen3_30b_a3b --batch 16 128 256  # one GPU
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from server.config import AppConfig
from server.worker import model_runner
from server.core.step_io import EngineRequest
from server.engine.api import SamplingParams, StopParams
from server.core.startup import build_engine_core

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plan", "stage", "forward", "sample", "wait", "apply")
HAS_OVERLAP = "overlap" in {f.name for f in __import__("dataclasses").fields(__import__("server.config").config.EngineConfig)}


def model_section(name: str, layers: int | None, dtype: str | None) -> dict:
    if name == "tiny":
        return {"name": "tiny"}
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    if layers:
        cfg["shape"]["num_hidden_layers"] = layers
    if dtype:
        cfg["dtype"] = dtype
    return cfg


class PhaseTimer:
    """CPU seconds of the calling thread per phase (robust on a shared machine); `wait` is wall
    time (a thread blocked on a future uses no CPU)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()

    def wrap(self, name: str, fn):
        clock = time.perf_counter if name == "wait" else time.thread_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += clock() - t0
        return timed


def instrument(core, timer: PhaseTimer) -> None:
    runner = core.executor.runner
    core.scheduler.plan = timer.wrap("plan", core.scheduler.plan)
    core._apply = timer.wrap("apply", core._apply)
    if hasattr(runner, "_stage"):
        runner._stage = timer.wrap("stage", runner._stage)
    else:  # a revision before the step buffers (for a before/after comparison)
        model_runner.build_forward_batch = timer.wrap("stage", model_runner.build_forward_batch)
    runner.model.forward = timer.wrap("forward", runner.model.forward)
    if runner.decode_graphs is not None:
        runner.decode_graphs.replay = timer.wrap("forward", runner.decode_graphs.replay)
    model_runner.sample = timer.wrap("sample", model_runner.sample)
    submit = getattr(core.executor, "submit", None)
    if submit is None:
        return

    def timed_submit(plan):
        future = submit(plan)
        future.result = timer.wrap("wait", future.result)
        return future
    core.executor.submit = timed_submit


FEATURES = dict(sampling=dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2, min_p=0.05),
                stops=dict(min_tokens=4), request=dict(logprobs=True, top_logprobs=5))


def requests(batch: int, prompt_len: int, new_tokens: int, vocab: int, first_id: int,
             features: bool = False) -> list[EngineRequest]:
    extra = FEATURES if features else dict(sampling={}, stops={}, request={})
    return [EngineRequest(first_id + i, tuple((i * 7919 + j * 31) % min(vocab, 250) for j in range(prompt_len)),
                          SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=1.0 if i % 4 else 0.9, seed=i,
                                         **extra["sampling"]),
                          StopParams(max_new_tokens=new_tokens, ignore_eos=True, **extra["stops"]), **extra["request"])
            for i in range(batch)]


def run_once(core, reqs) -> tuple[dict[int, list[int]], int, float, float]:
    """-> (tokens per request, forward steps, wall seconds, seconds from the first token to the end)."""
    for r in reqs:
        core.add_request(r)
    tokens: dict[int, list[int]] = {r.req_id: [] for r in reqs}
    steps0 = core.stats().steps
    t0 = time.perf_counter()
    t_first = None
    while core.has_work():
        out = core.step()
        for req_id, toks in zip(out.req_ids, out.token_ids):
            tokens[req_id] += toks
        if t_first is None and out.req_ids:
            t_first, steps_first = time.perf_counter(), out.forward_steps
    t_end = time.perf_counter()
    steps = core.stats().steps - steps0
    return tokens, steps, t_end - t0, (t_end - t_first) / max(1, core.stats().steps - steps_first)


def measure(args, batch: int, overlap: bool) -> dict:
    app = AppConfig.from_dict({
        "model": model_section(args.model, args.layers, args.dtype),
        "engine": {"max_num_seqs": batch, "kv_block_size": 16, "max_queue": max(256, batch),
                   "kv_cache_tokens": batch * (args.prompt_len + args.new_tokens + 32),
                   "max_num_batched_tokens": max(4096, batch * args.prompt_len),
                   **({"overlap": overlap} if HAS_OVERLAP else {})}})
    core = build_engine_core(app)
    try:
        vocab = core.spec.vocab_size
        run_once(core, requests(batch, args.prompt_len, args.new_tokens, vocab, 0, args.features))  # warm-up
        timer = PhaseTimer()
        instrument(core, timer)
        runs, steps = [], 0
        cpu0 = time.process_time()
        for rep in range(args.repeats):
            tokens, n, wall, decode_s = run_once(core, requests(batch, args.prompt_len, args.new_tokens, vocab,
                                                                (rep + 1) * batch, args.features))
            assert all(len(t) == args.new_tokens for t in tokens.values()), "a request ended early"
            runs.append((decode_s, wall))
            steps += n
        cpu = time.process_time() - cpu0
    finally:
        core.shutdown()
    decode_s, wall = min(runs)  # the least disturbed repeat (a shared machine)
    per = {k: timer.seconds[k] / steps * 1e3 for k in PHASES}
    return {"batch": batch, "overlap": overlap, "steps": steps, "decode_ms_per_step": decode_s * 1e3,
            "host_ms_per_step": (cpu - timer.seconds["forward"]) / steps * 1e3, "phase_ms_per_step": per,
            "tok_s": batch * args.new_tokens / wall, "tokens": [tokens[k] for k in sorted(tokens)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, or a conf/model/*.yaml with a shape (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's num_hidden_layers")
    parser.add_argument("--dtype", default=None, help="override the model's dtype (e.g. float32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 128, 256])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per setting (after one warm-up)")
    parser.add_argument("--features", action="store_true",
                        help="every request uses penalties, min_p, min_tokens and top logprobs")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'B':>4} {'overlap':>7} {'decode/step':>11} {'host/step':>9} " + " ".join(f"{p:>7}" for p in PHASES)
          + f" {'tok/s':>8}  (ms per step; tok/s of the fastest repeat)")
    for batch in args.batch:
        pair = {}
        for overlap in (False, True) if HAS_OVERLAP else (False,):
            r = measure(args, batch, overlap)
            pair[overlap] = r
            rows.append({k: v for k, v in r.items() if k != "tokens"})
            print(f"{batch:>4} {str(overlap):>7} {r['decode_ms_per_step']:11.3f} {r['host_ms_per_step']:9.3f} "
                  + " ".join(f"{r['phase_ms_per_step'][p]:7.3f}" for p in PHASES) + f" {r['tok_s']:8.0f}", flush=True)
        if not HAS_OVERLAP:
            continue
        same = pair[False]["tokens"] == pair[True]["tokens"]
        print(f"{batch:>4} overlap/off decode-step ratio {pair[True]['decode_ms_per_step'] / pair[False]['decode_ms_per_step']:.3f}; "
              f"same tokens: {same}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(torch.cuda.get_device_name()
                                   if torch.cuda.is_available() else "cpu"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
