"""EP-rank side of the GPU graph tests (tests/model/test_gpu_ep_graphs.py): decode through CUDA
graphs that hold the fixed-capacity dispatch's collectives vs the same steps run eagerly, on
rank r = cuda:r over NCCL (run_on_ranks(..., backend="nccl"); ep 1 is a size-1 NCCL group).
Without CUDA the same steps run on CPU with capture off (under the Triton interpreter and gloo):
a dry run of the logic, not of the capture.

Each rank decodes its own batch (DP attention); every rank replays the bucket of the largest
batch, and the eager steps pad their MoE rows to the same bucket (ForwardBatch.ep_rows), so
both paths see the same gathered rows. A rank may go idle for the last steps: it then replays
the bucket with padding only (graph) or runs an empty batch (eager).
"""
from __future__ import annotations

import os

import torch

QWEN3_2L = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 2,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768,
            "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True}
PAGE = 16


def _device(rank: int) -> str:
    return f"cuda:{rank}" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under the Triton interpreter


def _cpu_dry_run() -> None:
    """Without CUDA: the Triton kernels under the interpreter (what the graphs would capture)."""
    if not torch.cuda.is_available():
        from tests.kernels.support.interpret import enable_interpreter

        enable_interpreter()
        os.environ["EPSERVE_KERNEL_BACKEND"] = "triton"


def build(model: str, policy: str, rank: int, ep: int, dispatch: str = "allgather"):
    """'qwen3' (2 layers at Qwen3-30B-A3B width, random bf16) or 'tiny' (the trained fp32 model)."""
    from server.config import ModelConfig
    from server.model.loader import load_model
    from server.moe.dispatch import DispatchSettings
    from server.moe.routing import build_policy

    cfg = ModelConfig(name="qwen3-2l", shape=QWEN3_2L, dtype="bfloat16") if model == "qwen3" else ModelConfig()
    return load_model(cfg, policy=build_policy(policy), ep_rank=rank, ep_size=ep, device=_device(rank),
                      dispatch=DispatchSettings(dispatch))


def _decode(model, work, kv, steps: int, run, idle_from: int | None):
    """Prefill eagerly, then `steps` greedy decode steps through run(batch); -> logits per step
    ([0, V] where this rank is idle) and the EP-reduced load counts of the decode steps."""
    from server.model.forward_batch import ForwardBatch

    tok = model(work.prefill_batch(), kv).argmax(-1)
    model.load_counters.reset()
    decode, out = work.decode_batches(), []
    for i in range(steps):
        if idle_from is not None and i >= idle_from:
            out.append(run(ForwardBatch.empty(model.device)).clone())
            continue
        logits = run(decode.batch(i, tok)).clone()
        out.append(logits)
        tok = logits.argmax(-1)
    return out, model.load_counters.snapshot(group=None if model.ep_size == 1 else torch.distributed.group.WORLD,
                                             reset=True)


def graph_vs_eager_rank(rank: int, ep: int, policy: str, model_name: str, batches: list[int], steps: int = 6,
                        idle_rank: int | None = None) -> dict:
    from server.bench.workload import StaticWorkload
    from server.model.gpu.cuda_graphs import DecodeGraphRunner

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    _cpu_dry_run()
    model = build(model_name, policy, rank, ep)
    mine = batches[rank]
    work = StaticWorkload.build(batch=mine, input_len=20, output_len=steps + 2, vocab_size=model.spec.vocab_size,
                                block_size=PAGE, device=_device(rank), seed=rank, first_seq=sum(batches[:rank]),
                                total_batch=sum(batches))
    kv_e = model.allocate_kv_cache(work.num_blocks, PAGE)
    kv_g = model.allocate_kv_cache(work.num_blocks, PAGE)
    runner = DecodeGraphRunner(model, kv_g, max_batch=8, max_blocks_per_seq=work.block_tables.shape[1],
                               capture=cuda)  # buckets 1, 2, 4, 8
    bucket = runner.bucket_for(max(batches))
    idle_from = steps - 2 if idle_rank == rank else None

    def eager(batch):
        batch.ep_rows = bucket
        return model(batch, kv_e)

    eager_logits, eager_load = _decode(model, work, kv_e, steps, eager, idle_from)
    graph_logits, graph_load = _decode(model, work, kv_g, steps, lambda b: runner.run(b, bucket), idle_from)
    pairs = [(a, b) for a, b in zip(eager_logits, graph_logits) if a.shape[0]]
    # an eager step with the common row count planned makes no host sync (the graphs' premise)
    batch = work.decode_batches().batch(0, graph_logits[0].argmax(-1))
    no_sync = True
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager(batch)
        except RuntimeError as exc:
            no_sync = str(exc)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {
        "lockstep": runner.lockstep and runner.capture_enabled == cuda,
        "no_sync": no_sync,
        "bitwise": all(torch.equal(a, b) for a, b in pairs),
        "max_diff": max(float((a - b).abs().max()) for a, b in pairs),
        "same_tokens": all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs),
        "same_load": eager_load == graph_load,
        "tokens_counted": graph_load.tokens,
        "rows": [a.shape[0] for a in graph_logits],
    }


def forced_vs_local(policy: str, steps: int = 4) -> dict:
    """ep 1: the forced fixed-capacity path (a size-1 NCCL group, eager) vs the local path on the
    same weights: the same kernels on the same rows, so the same logits."""
    from server.bench.workload import StaticWorkload

    out = {}
    for dispatch in ("allgather", "local"):
        model = build("qwen3", policy, 0, 1, dispatch)
        work = StaticWorkload.build(batch=8, input_len=20, output_len=steps + 2, vocab_size=model.spec.vocab_size,
                                    block_size=PAGE, device=_device(0), seed=0)
        kv = model.allocate_kv_cache(work.num_blocks, PAGE)
        out[dispatch], _ = _decode(model, work, kv, steps, lambda b: model(b, kv), None)
        del model, kv
    pairs = list(zip(out["allgather"], out["local"]))
    return {"bitwise": all(torch.equal(a, b) for a, b in pairs),
            "max_diff": max(float((a - b).abs().max()) for a, b in pairs),
            "same_tokens": all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs)}


def forced_vs_local_rank(rank: int, ep: int, policy: str) -> dict:
    return forced_vs_local(policy)
