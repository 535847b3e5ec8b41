"""The engine's own step loop, in process (no gRPC): time per decode step and where the host
time goes, with overlapped scheduling on and off in the same run.

B requests (prompt P tokens, N new tokens each, half greedy, half seeded sampling) are
submitted at once to a ServingEngine started in this process, and consumed by asyncio tasks
as a client of the in-process engine would. Timers wrap the loop's phases:

  plan     scheduler.plan (engine thread)
  stage    the batch's inputs built into the step buffers + the host-to-device copy
  forward  model forward or decode-graph replay (host time of the launch on CUDA)
  sample   the sampler and the sampled tokens' scatter/copy
  apply    scheduler.update + stop checks + detokenize + hand-off to the streams (engine thread)
  wall     the whole generation / decode steps

"host/step" = wall minus forward: the loop's own cost where it is not hidden. On CPU the
forward is host work too; with overlap it runs on the step thread beside plan and apply.

  python scripts/bench_engine_loop.py --batch 16 128 256                       # CPU, tiny model
  python scripts/bench_engine_loop.py --model qwen3_30b_a3b --batch 16 128 256  # one GPU
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path

import torch

from server.config import AppConfig
from server.engine import model_runner
from server.engine.api import GenerationRequest, SamplingParams, StopParams
from server.engine.launcher import start_engine

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plan", "stage", "forward", "sample", "apply")


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
    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def instrument(eng, timer: PhaseTimer) -> None:
    runner = eng.executor.runner
    eng.scheduler.plan = timer.wrap("plan", eng.scheduler.plan)
    eng._apply = timer.wrap("apply", eng._apply)
    runner._stage = timer.wrap("stage", runner._stage)
    runner.model.forward = timer.wrap("forward", runner.model.forward)
    if runner.decode_graphs is not None:
        runner.decode_graphs.replay = timer.wrap("forward", runner.decode_graphs.replay)
    model_runner.sample = timer.wrap("sample", model_runner.sample)


def requests(batch: int, prompt_len: int, new_tokens: int, vocab: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", tuple((i * 7919 + j * 31) % min(vocab, 250) for j in range(prompt_len)),
                              SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=1.0 if i % 4 else 0.9, seed=i),
                              StopParams(max_new_tokens=new_tokens, ignore_eos=True)) for i in range(batch)]


async def _consume(eng, reqs) -> list[list[int]]:
    async def one(req):
        out = []
        async for chunk in eng.generate(req):
            out += chunk.token_ids
        return out
    return await asyncio.gather(*[one(r) for r in reqs])


def measure(args, batch: int, overlap: bool) -> dict:
    app = AppConfig.from_dict({
        "model": model_section(args.model, args.layers, args.dtype),
        "engine": {"max_num_seqs": batch, "kv_block_size": 16, "max_queue": max(256, batch),
                   "kv_cache_tokens": batch * (args.prompt_len + args.new_tokens + 32),
                   "max_num_batched_tokens": max(4096, batch * args.prompt_len), "overlap": overlap}})
    eng = start_engine(app)
    try:
        reqs = requests(batch, args.prompt_len, args.new_tokens, eng.vocab_size)
        asyncio.run(_consume(eng, reqs))  # warm-up: kernels, graphs' first replays, allocator
        timer = PhaseTimer()
        instrument(eng, timer)
        steps0 = eng._steps
        t0 = time.perf_counter()
        tokens = asyncio.run(_consume(eng, reqs))
        wall = time.perf_counter() - t0
        steps = eng._steps - steps0
    finally:
        eng.shutdown()
    assert all(len(t) == args.new_tokens for t in tokens), "a request ended early"
    per = {k: timer.seconds[k] / steps * 1e3 for k in PHASES}
    return {"batch": batch, "overlap": overlap, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "host_ms_per_step": (wall - timer.seconds["forward"]) / steps * 1e3, "phase_ms_per_step": per,
            "tok_s": batch * args.new_tokens / wall, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, or a conf/model/*.yaml with a shape (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's num_hidden_layers")
    parser.add_argument("--dtype", default=None, help="override the model's dtype (e.g. float32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 128, 256])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'B':>4} {'overlap':>7} {'wall/step':>9} {'host/step':>9} " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'tok/s':>9}  (ms per decode step)")
    for batch in args.batch:
        pair = {}
        for overlap in (False, True):
            r = measure(args, batch, overlap)
            pair[overlap] = r
            rows.append({k: v for k, v in r.items() if k != "tokens"})
            print(f"{batch:>4} {str(overlap):>7} {r['wall_ms_per_step']:9.2f} {r['host_ms_per_step']:9.2f} "
                  + " ".join(f"{r['phase_ms_per_step'][p]:8.2f}" for p in PHASES) + f" {r['tok_s']:9.0f}", flush=True)
        same = pair[False]["tokens"] == pair[True]["tokens"]
        print(f"{batch:>4} overlap/off wall ratio {pair[True]['wall_ms_per_step'] / pair[False]['wall_ms_per_step']:.3f}; "
              f"same tokens: {same}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(torch.cuda.get_device_name()
                                   if torch.cuda.is_available() else "cpu"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
