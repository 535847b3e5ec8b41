"""A decode step against its own memory roofline: the bytes one step must read, over the copy
bandwidth measured in the same run.

At serving batches a decode step is memory-bound: each weight it uses is read once and the KV
cache once, and the few FLOPs per byte hide behind the reads. So the least time a step can
take is (bytes it must read) / (the device's copy rate), and the measured step time over that
says how much of the memory system the engine uses (1.0: on the roofline). The bytes, for one
rank at ep_size 1:

  * every weight but the routed experts and the input embedding, as stored (FP8 dense linears:
    codes plus scales; the tied embedding is the output projection and read whole);
  * of the input embedding, the step's B rows;
  * the routed experts that receive at least one token in that step, at their stored bytes
    (FP8: codes plus scales), counted per step and layer from the load counters in an eager
    pass over the same decode steps (the timed run replays graphs);
  * the KV cache of every sequence at that step's context length, every layer (MLA: the
    latent rows), as the cache stores it.

Writes (one KV row per sequence and layer, activations) and the activations' own reads are
left out: they are a small fraction at B=128 and would only lower the bound. Expert reads
are counted once per active expert, the least a grouped GEMM can read; so the bound is one no
kernel can beat, not a model of ours.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

COPY_BYTES = 256 << 20  # per buffer: far above any L2, small beside the model


@dataclass(frozen=True)
class DecodeRoofline:
    weight_bytes: int  # read every step: dense weights (+ the step's embedding rows)
    expert_bytes: float  # mean over the counted steps: active experts x bytes per expert
    kv_bytes: float  # mean over the timed steps
    active_experts_per_step: float  # summed over MoE layers, mean over the counted steps
    copy_gb_s: float
    step_ms: float  # measured (timed run, median)

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes + self.expert_bytes + self.kv_bytes

    @property
    def roofline_ms(self) -> float:
        return self.bytes_per_step / (self.copy_gb_s * 1e9) * 1e3

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_per_step": self.bytes_per_step, "roofline_ms": self.roofline_ms,
                "x_roofline": self.roofline_ms / self.step_ms if self.step_ms > 0 else None}


def dense_weight_bytes(model, batch: int) -> int:
    """Bytes of every stored weight but the routed experts, with the input embedding counted as
    `batch` rows unless it is also the output projection (tied)."""
    experts = {id(t) for e in model.moe_experts() for t in e.parameters()}
    embed = model.model.embed_tokens.weight
    total = 0
    for t in list(model.parameters()) + [b for name, b in model.named_buffers() if name.endswith(("_codes", "_scale_inv"))]:
        if id(t) in experts:
            continue
        if t is embed and model.lm_head is not None:
            total += batch * t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(kv_caches: list[tuple[torch.Tensor, ...]]) -> int:
    """Bytes the cache stores per token over all layers (each tensor [blocks, block_size, ...])."""
    return sum(t[0, 0].numel() * t.element_size() for layer in kv_caches for t in layer)


def expert_bytes_each(model) -> float:
    """Stored bytes of one routed expert (codes and scales when FP8)."""
    layers = model.moe_experts()
    return sum(e.num_bytes for e in layers) / max(sum(e.num_local for e in layers), 1)


def copy_rate_gb_s(device: torch.device, nbytes: int = COPY_BYTES) -> float:
    """Device copy rate, read plus written bytes per second (GB/s): triton's do_bench median on
    CUDA, the best of a few timed copies elsewhere."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        from triton.testing import do_bench

        seconds = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") / 1e3
    else:
        seconds = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = min(seconds, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / seconds / 1e9


class ActiveExpertCounter:
    """Routed experts with >= 1 token per step, summed over layers, from the model's load counters:
    each step's count stays on the device (the eager pass also times the MoE blocks, so no host
    sync between its steps) and `mean` reads them all once."""

    def __init__(self, model) -> None:
        self.counters = model.load_counters
        self.before = self.counters.expert_tokens.clone()  # [L, E]
        self.per_step: list[torch.Tensor] = []  # 0-d int64 each

    def step_done(self) -> None:
        now = self.counters.expert_tokens.clone()
        self.per_step.append(((now - self.before) > 0).sum())
        self.before = now

    def mean(self) -> float:
        return float(torch.stack(self.per_step).double().mean()) if self.per_step else float("nan")


def mean_context(input_len: int, steps: int) -> float:
    """Mean context length over the timed decode steps (step i attends over input_len + i + 1)."""
    return input_len + (steps + 1) / 2 if steps else float(input_len)


def roofline_report(inputs: dict | None, batch: int, input_len: int, steps: int, step_ms: float) -> dict | None:
    """The bench's rank-0 roofline inputs (weight_bytes, expert_bytes_each, active_experts_per_step,
    kv_bytes_per_token, copy_gb_s) and the timed decode step -> the JSON the run document keeps
    (None where no inputs were measured: past ep_size 1, or with EPLB)."""
    if inputs is None:
        return None
    bound = DecodeRoofline(weight_bytes=inputs["weight_bytes"],
                           expert_bytes=inputs["active_experts_per_step"] * inputs["expert_bytes_each"],
                           kv_bytes=inputs["kv_bytes_per_token"] * batch * mean_context(input_len, steps),
                           active_experts_per_step=inputs["active_experts_per_step"], copy_gb_s=inputs["copy_gb_s"],
                           step_ms=step_ms)
    return bound.to_json()
