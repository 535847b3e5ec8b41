"""One rank's measurement of one benchmark run (every rank runs this; rank 0 assembles).

Order: build the model (random or checkpoint weights) and this rank's share of the workload,
capture decode graphs (ep_size 1 on CUDA), warm up, reset the load counters, time `repeats`
generations, read the loads, time decode at the small batch, time MoE blocks on eager steps,
time one routing-policy call at decode and prefill sizes, and (ep_size 1) time transformers.
"""
from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model.gpu.cuda_graphs import DecodeGraphRunner, GraphsUnsupported
from ..config import AppConfig
from ..kernels.backend import KernelBackend
from ..launch_plan import build_launch_plan
from ..model.loader import load_model
from ..moe.router import ROUTER_RULES
from ..moe.routing import RoutingContext
from .decode_roofline import (ActiveExpertCounter, copy_rate_gb_s, dense_weight_bytes, expert_bytes_each,
                              kv_bytes_per_token, roofline_report)
from .generate import generate, synchronize
from .moe_timer import MoETimer
from .settings import BenchSettings
from .workload import StaticWorkload

log = logging.getLogger(__name__)

@dataclass
class RankEnv:
    rank: int
    world: int
    device: torch.device
    ep_group: Any = None  # the model's process group (None at ep_size 1)
    barrier: Callable[[], None] | None = None  # lines ranks up before timed regions


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def policy_cost_us(policy, spec, rows: int, env: RankEnv, repeats: int, dtype: torch.dtype) -> float:
    """Mean microseconds per policy call on router outputs of `rows` tokens (launches included)."""
    gen = torch.Generator(device=env.device).manual_seed(1234 + rows)
    logits = torch.randn(rows, spec.num_experts, generator=gen, device=env.device).to(dtype)  # [N, E]
    weights, ids = ROUTER_RULES["softmax_topk"](logits, spec.top_k, renormalize=spec.norm_topk_prob)
    ctx = RoutingContext(layer=0, num_experts=spec.num_experts, top_k=spec.top_k, ep_rank=env.rank,
                         ep_size=env.world, token_offset=env.rank * rows)
    ids = ids.to(torch.int32)
    for _ in range(3):
        policy(ids, weights, logits, ctx)
    synchronize(env.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        policy(ids, weights, logits, ctx)
    synchronize(env.device)
    return (time.perf_counter() - t0) / repeats * 1e6


@torch.inference_mode()
def _moe_times(model, kv, work: StaticWorkload, steps: int) -> tuple[list[float], list[float], torch.Tensor, float]:
    """(prefill ms per MoE layer, decode ms per MoE layer, eager tokens [B, 1+steps], routed experts
    active per decode step summed over layers) from eager steps."""
    timer = MoETimer(model)
    with timer.recording():
        tok = model(work.prefill_batch(), kv).argmax(-1)
        prefill_ms = timer.take_ms()
        decode = work.decode_batches()
        tokens = [tok]
        active = ActiveExpertCounter(model)
        for i in range(min(steps, len(decode))):
            tok = model(decode.batch(i, tok), kv).argmax(-1)
            active.step_done()
            tokens.append(tok)
        decode_ms = timer.take_ms() if steps else []
    return prefill_ms, decode_ms, torch.stack(tokens, dim=1).cpu(), active.mean()


def measure_rank(settings: BenchSettings, env: RankEnv, progress=None) -> dict:
    """This rank's numbers (plain data). Collective calls inside: every rank must run it."""
    opts = settings.bench
    plan = build_launch_plan(AppConfig(model=settings.model, routing=settings.routing, parallel=settings.parallel),
                             ep_size=env.world)
    spec = plan.spec
    t_load = time.perf_counter()
    # the kernel-level loop: dispatch as the model's default (auto), EPLB as parallel.* says (None: off)
    model = load_model(settings.model, policy=plan.policy, ep_rank=env.rank, ep_size=env.world, ep_group=env.ep_group,
                       device=env.device, eplb=plan.eplb, spec=spec, kernels=KernelBackend.for_device(env.device, plan.kernels))
    synchronize(env.device)
    load_s = time.perf_counter() - t_load
    per_rank, small = opts.batch // env.world, opts.small_batch // env.world
    work = StaticWorkload.build(batch=per_rank, input_len=opts.input_len, output_len=opts.output_len,
                                vocab_size=spec.vocab_size, block_size=opts.block_size, device=env.device,
                                seed=opts.seed, first_seq=env.rank * per_rank, total_batch=opts.batch)
    small_work = None
    if small:
        small_work = StaticWorkload.build(batch=small, input_len=opts.input_len, output_len=opts.output_len,
                                          vocab_size=spec.vocab_size, block_size=opts.block_size, device=env.device,
                                          seed=opts.seed + 1, first_seq=env.rank * small, total_batch=opts.small_batch)
    kv = model.allocate_kv_cache(max(work.num_blocks, small_work.num_blocks if small_work else 0), opts.block_size)
    tick = progress.update if progress is not None else (lambda n=1: None)

    graphs, graph_note = None, "off (bench.cuda_graphs=false)"
    if opts.cuda_graphs:
        try:
            graphs = DecodeGraphRunner(model, kv, max_batch=max(per_rank, small), max_blocks_per_seq=work.block_tables.shape[1],
                                       capture=env.device.type == "cuda")
            graph_note = f"captured: buckets {graphs.buckets} in {graphs.capture_seconds:.1f} s"
        except GraphsUnsupported as exc:
            graph_note = f"eager: {exc}"
        except Exception as exc:  # a capture failure: keep measuring eagerly, say so in the results
            log.exception("decode graph capture failed; decode runs eagerly")
            graph_note = f"eager: capture FAILED ({type(exc).__name__}: {str(exc)[:300]})"
    decode_fn = graphs.run if graphs is not None and graphs.capture_enabled else None
    tick(1)

    def run(w: StaticWorkload):
        return generate(model, kv, w, decode_fn, sync_every_step=opts.sync_every_step, barrier=env.barrier)

    for _ in range(opts.warmup):
        run(work)
        tick(1)
    model.load_counters.reset()
    runs = []
    for _ in range(opts.repeats):
        runs.append(run(work))
        tick(1)
    load = model.load_counters.snapshot(env.ep_group if env.world > 1 else None)

    small_decode_s: list[float] = []
    if small_work is not None:
        run(small_work)  # warm-up at this batch
        for _ in range(opts.repeats):
            small_decode_s.append(run(small_work).decode_s)
        tick(1)

    prefill_ms, decode_ms, eager_tokens, active_experts = _moe_times(model, kv, work, opts.moe_timing_steps)
    roofline = None
    if env.world == 1 and not settings.parallel.eplb_enabled and opts.moe_timing_steps:  # one rank: its reads are the step's
        roofline = {"weight_bytes": dense_weight_bytes(model, per_rank), "expert_bytes_each": expert_bytes_each(model),
                    "active_experts_per_step": active_experts, "kv_bytes_per_token": kv_bytes_per_token(kv),
                    "copy_gb_s": copy_rate_gb_s(env.device)}
    tick(1)
    cost = {
        "decode": {"rows": per_rank, "us": policy_cost_us(plan.policy, spec, per_rank, env, opts.policy_cost_repeats, model.dtype)},
        "prefill": {"rows": per_rank * opts.input_len,
                    "us": policy_cost_us(plan.policy, spec, per_rank * opts.input_len, env, opts.policy_cost_repeats, model.dtype)},
    }
    tick(1)
    steps = eager_tokens.shape[1]
    graph_tokens = runs[-1].tokens[:, :steps]
    result = {
        "rank": env.rank,
        "load_s": load_s,
        "prefill_s": [r.prefill_s for r in runs],
        "decode_s": [r.decode_s for r in runs],
        "small_decode_s": small_decode_s,
        "moe_prefill_ms": prefill_ms,
        "moe_decode_ms": decode_ms,
        "policy_cost_us": cost,
        "graphs": graph_note,
        "eager_vs_timed_token_agreement": float((eager_tokens == graph_tokens).float().mean()),
        "decode_roofline_inputs": roofline,
        "expert_bytes_per_layer": model.expert_bytes_loaded // max(spec.num_moe_layers, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": runs[-1].tokens,
        "load": load,
    }
    if env.world == 1 and opts.hf_baseline:
        try:
            result["hf"] = _hf_once(settings, model, work, progress)
        except Exception as exc:  # our numbers still count; the failure is reported beside them
            log.exception("transformers baseline failed")
            result["hf_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    result["spec"] = spec
    result["dtype"] = str(model.dtype).replace("torch.", "")
    del graphs, model, kv
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


#: transformers' numbers per (model, workload, options, device) for this process: a multirun over
#: routing policies measures the baseline once (it does not depend on the policy) and reuses it.
_HF_RESULTS: dict[str, dict] = {}


def _hf_once(settings: BenchSettings, model, work: StaticWorkload, progress) -> dict:
    import json

    from .hf_baseline import measure_hf

    opts = settings.bench
    key = json.dumps([settings.to_dict()["model"], opts.batch, opts.input_len, opts.output_len, opts.seed, opts.repeats,
                      opts.hf_cache, opts.hf_compile, opts.hf_experts, str(model.device)], sort_keys=True, default=str)
    if key not in _HF_RESULTS:
        info = measure_hf(settings.model, model, work.prompts, opts.output_len, repeats=opts.repeats, warmup=opts.warmup,
                          cache=opts.hf_cache, compile_=opts.hf_compile, experts=opts.hf_experts,
                          progress=progress)
        info["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info["measured_in_run"] = settings.tag()
        _HF_RESULTS[key] = info
    elif progress is not None:
        progress.update(opts.repeats)
    return dict(_HF_RESULTS[key])


def device_info(device: torch.device, world: int) -> dict:
    info = {"type": device.type, "count": world, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = platform.processor() or platform.machine()
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def progress_total(settings: BenchSettings) -> int:
    o = settings.bench
    hf = o.repeats if settings.ep_size == 1 and o.hf_baseline else 0
    return 1 + o.warmup + o.repeats + (1 if o.small_batch else 0) + 2 + hf


def summarize(settings: BenchSettings, ranks: list[dict], device: dict) -> dict:
    """Rank results -> the run's JSON document (rank 0)."""
    opts = settings.bench
    r0 = ranks[0]
    spec = r0["spec"]
    world = len(ranks)
    per_repeat_prefill = [max(r["prefill_s"][i] for r in ranks) for i in range(opts.repeats)]
    per_repeat_decode = [max(r["decode_s"][i] for r in ranks) for i in range(opts.repeats)]
    prefill_s, decode_s = _median(per_repeat_prefill), _median(per_repeat_decode)
    steps = opts.output_len - 1
    ours = {
        "prefill_tok_s": opts.batch * opts.input_len / prefill_s,
        "decode_tok_s": opts.batch * steps / decode_s,
        "prefill_s": per_repeat_prefill, "decode_s": per_repeat_decode,
        "decode_step_ms": decode_s / steps * 1e3,
        "graphs": r0["graphs"], "load_s": max(r["load_s"] for r in ranks),
        "eager_vs_timed_token_agreement": r0["eager_vs_timed_token_agreement"],
    }
    small = None
    if opts.small_batch:
        per = [max(r["small_decode_s"][i] for r in ranks) for i in range(opts.repeats)]
        small = {"batch": opts.small_batch, "decode_tok_s": opts.small_batch * steps / _median(per), "decode_s": per,
                 "decode_step_ms": _median(per) / steps * 1e3}
    layers = len(r0["moe_prefill_ms"])
    moe_prefill = [max(r["moe_prefill_ms"][i] for r in ranks) for i in range(layers)]
    moe_decode = [max(r["moe_decode_ms"][i] for r in ranks) for i in range(len(r0["moe_decode_ms"]))]
    load = r0["load"]
    summary = load.summary()
    doc = {
        "schema": "epserve-bench/1",
        "mode": "static (kernel-level loop: builds its own batches, bypasses the scheduler and engine)",
        "tag": settings.tag(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": settings.command,
        "device": device,
        "model": {"name": settings.model.name, "architecture": spec.architecture, "layers": spec.num_layers,
                  "moe_layers": spec.num_moe_layers, "hidden": spec.hidden_size, "experts": spec.num_experts,
                  "top_k": spec.top_k, "moe_intermediate": spec.moe_intermediate_size, "heads": spec.num_heads,
                  "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab_size,
                  "dtype": r0["dtype"], "params_rank0": r0["params"], "expert_bytes_per_layer_rank0": r0["expert_bytes_per_layer"],
                  "weights": "random (model.shape)" if settings.model.shape is not None else (settings.model.path or settings.model.name)},
        "routing": {"name": settings.routing.name, **{k: v for k, v in settings.routing.params.items()}},
        "parallel": {"ep_size": world, "backend": settings.parallel.backend, "eplb": _eplb(settings.parallel)},
        "workload": {"batch": opts.batch, "input_len": opts.input_len, "output_len": opts.output_len,
                     "decode_steps": steps, "sync_every_step": opts.sync_every_step, "repeats": opts.repeats},
        "epserve": ours,
        "small_batch": small,
        "moe_ms_per_layer": {"prefill": moe_prefill, "decode": moe_decode,
                             "prefill_mean": _mean(moe_prefill), "decode_mean": _mean(moe_decode),
                             "prefill_tokens": opts.batch * opts.input_len, "decode_tokens": opts.batch,
                             # rank 0's expert weights per layer over the decode MoE time: the HBM rate if
                             # every local expert is read once per step (true at B=128, top-8 of 128)
                             "decode_gb_s_all_experts_read": (r0["expert_bytes_per_layer"] / (_mean(moe_decode) * 1e-3) / 1e9
                                                              if moe_decode else None)},
        "load": {**summary, "expert_max_over_mean_per_layer": load.expert_max_over_mean(),
                 "rank_max_over_mean_per_layer": load.rank_max_over_mean(),
                 "ranks_per_token_per_layer": load.mean_ranks_per_token(),
                 "expert_tokens": load.expert_tokens, "rank_tokens": load.rank_tokens(),
                 "counted": "timed generations (prefill + decode), padding rows excluded"},
        "policy_cost_us": r0["policy_cost_us"],
        "decode_roofline": roofline_report(r0.get("decode_roofline_inputs"), opts.batch, opts.input_len, steps,
                                           ours["decode_step_ms"]),
        "hf": None,
        "hf_error": r0.get("hf_error"),
        "speedup_vs_hf": None,
    }
    hf = r0.get("hf")
    if hf is not None:
        hf_tokens = hf.pop("tokens")
        ours_tokens = r0["tokens"]
        hf["first_token_agreement"] = float((hf_tokens[:, 0] == ours_tokens[:, 0]).float().mean())
        hf["token_agreement"] = float((hf_tokens == ours_tokens).float().mean())
        doc["hf"] = hf
        doc["speedup_vs_hf"] = {"prefill": ours["prefill_tok_s"] / hf["prefill_tok_s"],
                                "decode": ours["decode_tok_s"] / hf["decode_tok_s"]}
    return doc


def _eplb(parallel) -> dict | None:
    """EPLB settings of the run (server/moe/eplb); None when off. Loads are then per physical slot."""
    if not parallel.eplb_enabled:
        return None
    return {"redundant_experts": parallel.redundant_experts, "stats": parallel.eplb_stats,
            "policy": parallel.eplb_policy, "interval": parallel.eplb_interval}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
