"""Greedy generation of the static workload, timed: one prefill step, then O-1 decode steps.

Times are wall-clock around fully synchronised regions (device work included). With
`sync_every_step` each step's tokens are copied to the host before the next step starts, as
a server streaming tokens must; without it the loop only queues work (an upper bound).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.forward_batch import ForwardBatch
from .workload import StaticWorkload

DecodeFn = Callable[[ForwardBatch], torch.Tensor]  # batch -> [S, V] logits


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationTimes:
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor  # [B, O] generated ids (host)


@torch.inference_mode()
def generate(model, kv_caches, work: StaticWorkload, decode: DecodeFn | None = None, *, sync_every_step: bool = True,
             barrier: Callable[[], None] | None = None) -> GenerationTimes:
    """Run the workload once. `decode` runs a decode batch (default: model.forward, eager);
    `barrier` lines EP ranks up before each timed region."""
    device = work.device
    decode = decode or (lambda batch: model(batch, kv_caches))
    steps = work.decode_batches()
    if barrier:
        barrier()
    synchronize(device)
    t0 = time.perf_counter()
    logits = model(work.prefill_batch(), kv_caches)  # [B, V]
    tok = logits.argmax(-1)  # [B]
    out = [tok.cpu()] if sync_every_step else [tok]
    synchronize(device)
    t1 = time.perf_counter()
    if barrier:
        barrier()
        synchronize(device)
        t1b = time.perf_counter()
    else:
        t1b = t1
    for i in range(len(steps)):
        logits = decode(steps.batch(i, tok))  # [B, V]
        tok = logits.argmax(-1)
        out.append(tok.cpu() if sync_every_step else tok)
    synchronize(device)
    t2 = time.perf_counter()
    tokens = torch.stack([t.cpu() for t in out], dim=1)  # [B, O]
    return GenerationTimes(prefill_s=t1 - t0, decode_s=t2 - t1b, tokens=tokens)
