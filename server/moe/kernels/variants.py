"""Which compiled kernel variants a fused-MoE call of n rows uses, and one n for each.

The kernels do not specialise on counts (do_not_specialize), so what selects a compiled
variant is the config get_moe_config picks for the row count (tiles, warps, stages) and, for
the slot alignment, align_variant's constexprs. Both are threshold functions of n: each
variant owns one contiguous run of counts. The engine's start-up warm-up runs one call per
run, so no count a step can bring compiles anything later (server/worker/warmup.py).
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from .moe_align import align_variant
from .moe_config import get_moe_config


def topk_variant(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 device: torch.device | None) -> Hashable:
    """fused_moe_triton on [num_tokens, top_k] router slots: (config, alignment constexprs)."""
    rows = num_tokens * top_k
    cfg = get_moe_config(num_experts, hidden, inter, rows, dtype, device)
    return cfg, align_variant(rows, cfg.BLOCK_M)


def rows_variant(num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 device: torch.device | None, grouped: bool) -> Hashable:
    """grouped_expert_mlp_triton (grouped=True: align_from_offsets, no count constexprs) or
    expert_mlp_rows_triton (the slot alignment with k = 1) on num_rows dispatched rows."""
    cfg = get_moe_config(num_experts, hidden, inter, num_rows, dtype, device)
    return (cfg,) if grouped else (cfg, align_variant(num_rows, cfg.BLOCK_M))


def distinct_runs(variant: Callable[[int], Hashable], n_max: int) -> list[int]:
    """The first n of each run of equal variant(n) over 1..n_max, in order. Exact when every
    value occupies one contiguous run (threshold functions); costs O(runs * log n_max) calls,
    not n_max (a rank may receive ep_size * tokens * k rows: hundreds of thousands)."""
    starts: list[int] = []
    n = 1
    while n <= n_max:
        value = variant(n)
        starts.append(n)
        lo, step = n, 1  # variant(lo) == value
        while lo + step <= n_max and variant(lo + step) == value:
            lo += step
            step *= 2
        hi = min(lo + step, n_max + 1)  # past the run (or past the end)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if variant(mid) == value:
                lo = mid
            else:
                hi = mid
        n = lo + 1
    return starts
