"""Run the model's GPU path (Triton attention + fused MoE + the decode-graph runner's static
buffers) on CPU under Triton's interpreter, in a fresh process, and compare it with the torch
path. Used by tests/kernels/test_gpu_path_interpreter.py:

    python -m tests.helpers.gpu_path_worker <case> '<json params>'   -> last stdout line: JSON

EPSERVE_KERNEL_BACKEND=triton makes a model built on CPU take the kernel path (read when the model
is built); the interpreter must be on before triton is imported, hence the subprocess.
"""
from __future__ import annotations

import json
import os
import sys


def _setup() -> None:
    from tests.kernels.support.interpret import enable_interpreter

    enable_interpreter()
    os.environ["EPSERVE_KERNEL_BACKEND"] = "triton"
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)


def _backend(name: str) -> None:
    os.environ["EPSERVE_KERNEL_BACKEND"] = name


#: a small random DeepSeek-V3 shape (MLA, grouped sigmoid router, shared + dense layers) whose
#: widths the kernels accept (latent 32 + rope 16)
DEEPSEEK_SHAPE = {
    "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
    "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "n_shared_experts": 1, "initializer_range": 0.2, "dtype": "float32",
}


def _model(policy: str, family: str = "tiny"):
    from server.config import ModelConfig
    from server.model.loader import load_model
    from server.moe.routing import build_policy

    cfg = ModelConfig() if family == "tiny" else ModelConfig(name="deepseek-small", shape=DEEPSEEK_SHAPE)
    return load_model(cfg, policy=build_policy(policy))


def _prompts() -> list[tuple[int, list[int]]]:
    return [(0, list(b"Hello world")), (1, list(b"MoE")), (2, list(b"expert parallel!"))]


def paths_agree(policy: str = "natural", decode_steps: int = 3, family: str = "tiny") -> dict:
    """Prefill + greedy decode on the kernel path and on the torch path: same logits, tokens, loads."""
    import torch

    from tests.helpers.paged_driver import PagedDriver

    results = {}
    for backend in ("triton", "torch"):
        _backend(backend)
        model = _model(policy, family)
        driver = PagedDriver(model, num_blocks=32, block_size=16, seed=1)
        steps = [driver.step(_prompts())]
        for _ in range(decode_steps):
            nxt = [(sid, [int(logits.argmax())]) for sid, logits in steps[-1].items()]
            steps.append(driver.step(nxt))
        logits = [torch.stack([step[sid] for sid, _ in _prompts()]) for step in steps]  # [S, V] per step
        meta_type = type(_metadata_probe(model, driver)).__name__
        results[backend] = (logits, model.load_counters.snapshot().expert_tokens, meta_type)
    (k_logits, k_load, k_meta), (t_logits, t_load, t_meta) = results["triton"], results["torch"]
    max_diff = max(float((a - b).abs().max()) for a, b in zip(k_logits, t_logits))
    same_tokens = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(k_logits, t_logits))
    return {"ok": max_diff < 1e-3 and same_tokens and k_load == t_load and k_meta == "KernelAttentionMetadata"
            and t_meta == "PagedAttentionMetadata",
            "max_diff": max_diff, "same_tokens": same_tokens, "same_load": k_load == t_load,
            "metadata": [k_meta, t_meta]}


def _metadata_probe(model, driver):
    batch = driver.build_batch([(99, [1, 2])])
    return model.attention_backend.build(batch, driver.block_size)


def graph_runner_static(policy: str = "round_robin_balanced", num_seqs: int = 3, token_offset: int = 5,
                        family: str = "tiny") -> dict:
    """The graph runner's static-buffer step (capture off) vs model.forward on the same decode batch:
    padding rows change neither the real rows' logits nor the load counters."""
    import copy

    import torch

    from server.model.gpu.cuda_graphs import DecodeGraphRunner
    from tests.helpers.paged_driver import PagedDriver

    model = _model(policy, family)
    prompts = _prompts()[:num_seqs]
    driver = PagedDriver(model, num_blocks=32, block_size=16, seed=2)
    first = driver.step(prompts, token_offset=token_offset)
    work = [(sid, [int(first[sid].argmax())]) for sid, _ in prompts]
    batch = driver.build_batch(work, token_offset=token_offset)
    kv_copy = [tuple(t.clone() for t in layer) for layer in driver.kv]
    model.load_counters.reset()
    direct = model(batch, driver.kv)  # [S, V]
    direct_load = model.load_counters.snapshot(reset=True)
    runner = DecodeGraphRunner(model, kv_copy, max_batch=4, max_blocks_per_seq=8, buckets=(1, 2, 4), capture=False)
    # stale rows from an earlier, larger step must not leak into this one
    runner.context_lens.fill_(30)
    runner.slot_mapping.fill_(7)
    via_runner = runner.run(batch).clone()
    runner_load = model.load_counters.snapshot(reset=True)
    offset_tensor_batch = copy.copy(batch)
    offset_tensor_batch.token_offset = torch.tensor(token_offset)
    via_tensor_offset = runner.run(offset_tensor_batch).clone()
    tensor_load = model.load_counters.snapshot(reset=True)
    kv_same = all(torch.allclose(a, b, atol=1e-5) for x, y in zip(driver.kv, kv_copy) for a, b in zip(x, y))
    diff = float((direct - via_runner).abs().max())
    return {"ok": diff < 1e-4 and direct_load == runner_load == tensor_load and kv_same
            and torch.equal(via_runner, via_tensor_offset) and runner.bucket_for(num_seqs) == 4,
            "max_diff": diff, "same_load": direct_load == runner_load, "tensor_offset_load": tensor_load == direct_load,
            "kv_same": kv_same, "tokens": direct_load.tokens}


def engine_graph_replay(policy: str = "round_robin_balanced") -> dict:
    """The engine's ModelRunner with decode graphs (capture off) over its own step buffers vs
    without: overlapped steps (plan n+1 before applying n), 3 sequences of different lengths
    (padded to the 4-bucket, then 2, then 1), greedy and seeded sampling: same tokens."""
    from server.engine.api import GenerationRequest, SamplingParams, StopParams
    from server.worker.model_runner import ModelRunner
    from server.core.scheduler import Scheduler
    from server.core.sequence import Sequence
    from server.model.gpu.cuda_graphs import DecodeGraphRunner

    prompts = _prompts()

    def generate(graphs: bool):
        model = _model(policy)
        runner = ModelRunner(model, rank=0, num_blocks=32, block_size=16, device="cpu", max_num_seqs=4,
                             max_model_len=128, max_num_batched_tokens=64)
        replays = [0]
        if graphs:
            runner.decode_graphs = DecodeGraphRunner(model, runner.kv_caches, max_batch=4, max_blocks_per_seq=runner.width,
                                                     buckets=(1, 2, 4), capture=False, inputs=runner.graph_inputs())
            replay = runner.decode_graphs.replay
            runner.decode_graphs.replay = lambda s, b=None: (replays.__setitem__(0, replays[0] + 1), replay(s, b))[1]
        sch = Scheduler(num_ranks=1, num_blocks=32, block_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_queue=8)
        seqs = []
        for (sid, prompt), new, temp in zip(prompts, (3, 5, 7), (0.0, 0.8, 0.0)):
            req = GenerationRequest(f"r{sid}", tuple(prompt), SamplingParams(temperature=temp, seed=sid),
                                    StopParams(max_new_tokens=new))
            seqs.append(Sequence.create(sid, req, seed=sid, max_total_len=len(prompt) + new, now=0.0))
            sch.add(seqs[-1])
        inflight = []
        while sch.has_work() or inflight:
            plan = sch.plan()
            if plan.ranks[0].run_forward:
                inflight.append((plan, runner.launch(plan.ranks[0])))
            while len(inflight) > (1 if plan.ranks[0].run_forward else 0):
                done, pending = inflight.pop(0)
                for seq, _, _ in sch.update(done, [pending.result()]):
                    if len(seq) >= seq.max_total_len:
                        sch.finish(seq)
        return [s.token_ids[s.num_prompt_tokens:] for s in seqs], replays[0]

    eager, _ = generate(False)
    graphed, replays = generate(True)
    return {"ok": eager == graphed and replays > 0, "eager": eager, "graphs": graphed, "replays": replays}



def _ep_runner_rank(rank: int, ep: int, policy: str) -> dict:
    """One EP rank of `ep_graph_runner_static` (a spawned process: switch the interpreter on first)."""
    _setup()
    import copy

    import torch

    from server.config import ModelConfig
    from server.model.forward_batch import ForwardBatch
    from server.model.gpu.cuda_graphs import DecodeGraphRunner
    from server.model.loader import load_model
    from server.moe.dispatch import DispatchSettings
    from server.moe.routing import build_policy
    from tests.helpers.paged_driver import PagedDriver

    model = load_model(ModelConfig(), policy=build_policy(policy), ep_rank=rank, ep_size=ep,
                       dispatch=DispatchSettings("allgather"))
    prompts = _prompts() if rank == 0 else [(10 + rank, list(b"rank %d" % rank))]  # 3 sequences on rank 0, 1 elsewhere
    offset = 0 if rank == 0 else 3 * 1 + (rank - 1)  # decode tokens of lower ranks
    driver = PagedDriver(model, num_blocks=32, block_size=16, seed=3 + rank)
    first = driver.step(prompts)  # prefill: uneven lengths, rows agreed by the dispatcher
    work = [(sid, [int(first[sid].argmax())]) for sid, _ in prompts]
    batch = driver.build_batch(work, token_offset=offset)
    kv_copy = [tuple(t.clone() for t in layer) for layer in driver.kv]
    model.load_counters.reset()
    direct = model(batch, driver.kv)  # eager, unpadded
    direct_load = model.load_counters.snapshot(reset=True)
    runner = DecodeGraphRunner(model, kv_copy, max_batch=4, max_blocks_per_seq=8, buckets=(1, 2, 4), capture=False)
    via_runner = runner.run(batch, bucket=4).clone()  # every rank the same bucket: rank 0 pads 1 row, others 3
    runner_load = model.load_counters.snapshot(reset=True)
    # an idle step for every rank but 0: they replay the bucket with padding rows only
    mine = copy.copy(batch) if rank == 0 else ForwardBatch.empty(model.device)
    idle_direct = model(mine, driver.kv)
    idle_runner = runner.run(mine, bucket=4).clone()
    diff = float((direct - via_runner).abs().max())
    idle_diff = float((idle_direct - idle_runner).abs().max()) if rank == 0 else 0.0
    engine = _ep_model_runner_steps(model, rank, ep)
    return {"ok": diff < 1e-4 and idle_diff < 1e-4 and direct_load == runner_load and runner.lockstep
            and idle_runner.shape[0] == mine.num_seqs and engine["ok"],
            "max_diff": diff, "idle_diff": idle_diff, "same_load": direct_load == runner_load,
            "tokens": direct_load.tokens, "engine": engine}


def _ep_model_runner_steps(model, rank: int, ep: int) -> dict:
    """The engine's ModelRunner on a scheduler's plans (every rank keeps an identical scheduler
    replica and all-gathers the sampled tokens, as rank 0's engine would), once with decode
    graphs over its step buffers (capture off) and once without, on separate KV caches: the same
    tokens every step. The run has uneven ranks, chunked prefill, idle ranks in graph steps, and
    steps in which rank 0 cannot replay (its policy object was swapped, so it runs eagerly
    padded to the bucket the others replay)."""
    import copy

    import torch
    import torch.distributed as dist

    from server.engine.api import GenerationRequest, StopParams
    from server.worker.model_runner import ModelRunner
    from server.core.scheduler import Scheduler
    from server.core.sequence import Sequence
    from server.model.gpu.cuda_graphs import DecodeGraphRunner

    kw = dict(rank=rank, num_blocks=32, block_size=16, device=torch.device("cpu"), max_num_seqs=4, max_model_len=64,
              max_num_batched_tokens=16)
    graphed, eager = ModelRunner(model, **kw), ModelRunner(model, **kw)
    graphed.decode_graphs = DecodeGraphRunner(model, graphed.kv_caches, max_batch=4, max_blocks_per_seq=graphed.width,
                                              capture=False, inputs=graphed.graph_inputs())
    replays: list[tuple[int, int]] = []
    replay = graphed.decode_graphs.replay

    def counting(num_seqs, bucket=None):
        replays.append((num_seqs, bucket))
        return replay(num_seqs, bucket)

    graphed.decode_graphs.replay = counting
    sch = Scheduler(num_ranks=ep, num_blocks=32, block_size=16, max_num_seqs=4, max_num_batched_tokens=16, max_queue=16)
    lengths, max_new = [6, 19, 3], [4, 1, 3]  # 19 > the 16-token chunk: two prefill steps
    for i, (n, m) in enumerate(zip(lengths, max_new)):
        req = GenerationRequest(f"r{i}", tuple((i * 13 + j) % 200 for j in range(n)), stops=StopParams(max_new_tokens=m))
        sch.add(Sequence.create(i, req, seed=i, max_total_len=n + m, now=0.0))
    policy = model.runtime.policy
    same, decode_steps, fallback_steps = True, 0, 0
    for step in range(200):
        if not sch.has_work():
            break
        plan = sch.plan()
        if not plan.ranks[0].run_forward:
            continue
        mine = plan.ranks[rank]
        swap = rank == 0 and plan.ranks[0].decode_batch is not None and decode_steps == 1
        if swap:  # same routing, another object: the graphs no longer match the policy on this rank only
            model.runtime.policy = copy.copy(policy)
            fallback_steps += 1
        got = graphed.run(mine)
        model.runtime.policy = policy
        want = eager.run(mine)
        same &= got.tokens.tolist() == want.tokens.tolist()
        decode_steps += plan.ranks[0].decode_batch is not None
        results = [None] * ep
        dist.all_gather_object(results, want)
        for seq, _, _ in sch.update(plan, results):
            if seq.num_generated >= seq.request.stops.max_new_tokens:
                sch.finish(seq)
    idle = sum(1 for n, _ in replays if n == 0)
    ok = same and not sch.has_work() and decode_steps >= 2 and all(b is not None for _, b in replays)
    return {"ok": ok, "same_tokens": same, "decode_steps": decode_steps, "replays": len(replays), "idle_replays": idle,
            "fallback_steps": fallback_steps}


def ep_graph_runner_static(ep: int = 2, policy: str = "greedy_balanced") -> dict:
    """The graph runner's static-buffer step at ep_size `ep` (gloo, the fixed-capacity dispatcher,
    capture off): every rank replays the same bucket with its own padding, an idle rank with
    padding only, and the real rows equal an eager unpadded step on every rank."""
    from tests.helpers.ep_ranks import run_on_ranks

    ranks = run_on_ranks(_ep_runner_rank, ep, policy)
    idle = sum(r["engine"]["idle_replays"] for r in ranks)
    fallback = ranks[0]["engine"]["fallback_steps"]
    return {"ok": all(r["ok"] for r in ranks) and idle > 0 and fallback > 0, "ranks": ranks}


CASES = {"paths_agree": paths_agree, "graph_runner_static": graph_runner_static,
         "engine_graph_replay": engine_graph_replay, "ep_graph_runner_static": ep_graph_runner_static}

if __name__ == "__main__":
    _setup()
    case, params = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(CASES[case](**params)))
