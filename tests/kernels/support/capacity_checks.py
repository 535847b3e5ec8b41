"""The fused capacity solver (server/moe/kernels/capacity_route.py) against the torch
path (server/moe/routing/capacity_solver.py) on one call: run under Triton's interpreter by
tests/kernels/test_capacity_route_interpreter.py, on CUDA by tests/routing/test_capacity_gpu.py."""
from __future__ import annotations

import torch

from server.moe.kernels.capacity_route import capacitated_topk_fused
from server.moe.routing.capacity_prices import DAMPING
from server.moe.routing.capacity_solver import Capacities, capacitated_topk


def skewed_scores(n: int, num_experts: int, skew: float, seed: int, device: str = "cpu") -> torch.Tensor:
    """[n, E] log-probabilities of a router with uneven expert popularity."""
    g = torch.Generator().manual_seed(seed)
    popularity = skew * torch.randn(num_experts, generator=g)
    return (torch.randn(n, num_experts, generator=g) * 1.5 + popularity).log_softmax(-1).to(device)


def check_call(scores: torch.Tensor, top_k: int, width: int, exact: bool, ceiling: int = 0, steps: int = 20) -> dict:
    """Fused vs torch on scores [n, E]: the guarantees asserted here, the figures returned."""
    n, num_experts = scores.shape
    bins = num_experts // width
    ids, ok = capacitated_topk_fused(scores[None].float(), top_k, width, exact, ceiling, steps, DAMPING)
    ids, ok = ids[0].long(), bool(ok[0])
    ref, ref_ok = capacitated_topk(scores.float(), top_k, Capacities(width=width, exact=exact, ceiling=ceiling),
                                   price_steps=steps)
    assert ok, "the kernel's moves did not finish"
    assert ((ids >= 0) & (ids < num_experts)).all(), ids
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all(), "a token holds one expert twice"
    load = torch.bincount((ids // width).reshape(-1), minlength=bins)
    pairs = n * top_k
    if exact:
        assert int(load.min()) >= pairs // bins and int(load.max()) <= -(-pairs // bins), load
    else:
        assert int(load.max()) <= ceiling, (load, ceiling)
    picked = scores.float().gather(1, ids)  # [n, k]
    assert (picked.diff(dim=1) <= 0).all(), "ids not ordered by score"
    objective = float(picked.sum())
    return {"equal": bool(torch.equal(ids, ref.long())), "objective": objective,
            "torch_objective": float(scores.float().gather(1, ref.long()).sum()), "torch_ok": bool(ref_ok),
            "natural_objective": float(scores.float().topk(top_k, dim=1).values.sum())}


def check_chunked_bisection(scores: torch.Tensor, top_k: int, width: int, exact: bool, ceiling: int, steps: int,
                            price_chunk: int) -> bool:
    """Prefill-sized bins bisect their thresholds in chunks (price_kernel's loop); the prices,
    so the ids, must be exactly those of the in-register bisection."""
    args = (scores[None].float(), top_k, width, exact, ceiling, steps, DAMPING)
    return torch.equal(capacitated_topk_fused(*args, price_chunk=price_chunk)[0], capacitated_topk_fused(*args)[0])


def check_gain_chunks(scores: torch.Tensor, top_k: int, width: int) -> bool:
    """One price step leaves many pairs to move: the moves' two-level search over chunks of 16
    tokens must make exactly the moves of a search over one chunk."""
    args = (scores[None].float(), top_k, width, True, 0, 1, DAMPING)
    return torch.equal(capacitated_topk_fused(*args, gain_chunk=16)[0], capacitated_topk_fused(*args, gain_chunk=64)[0])


def check_price_step_chunked(n: int, bins: int, m: int, price_cap: int, seed: int) -> bool:
    """One price step on thresholds with ties, negatives and +/-BIG: the radix select over
    chunks must move every bin's price exactly as the in-register bisection does."""
    from server.moe.kernels.capacity_route_kernels import BIG, price_kernel

    g = torch.Generator().manual_seed(seed)
    mp, n_pad = 1 << max(0, (m - 1).bit_length()), max(16, 1 << (n - 1).bit_length())
    tau = (torch.randn(1, bins, n_pad, mp, generator=g) * 3).round(decimals=1)  # ties
    tau[torch.rand(tau.shape, generator=g) < 0.05] = BIG
    tau[torch.rand(tau.shape, generator=g) < 0.05] = -BIG
    spread = torch.tensor([20.0])
    prices = []
    for chunk in (n_pad * mp, 8):
        price = torch.randn(1, bins, generator=torch.Generator().manual_seed(seed + 1))
        bb = 1 if chunk < n_pad * mp else bins
        price_kernel[(1, bins // bb)](tau, price, spread, n, price_cap, B=bins, M=m, MP=mp, N_PAD=n_pad, BB=bb,
                                      CH=chunk, DAMPING=0.85, EXACT=True)
        prices.append(price)
    return torch.equal(prices[0], prices[1])


def check_batch_independent(scores: torch.Tensor, top_k: int, width: int) -> bool:
    """scores [R, n, E]: a launch of R programs gives each call what a launch of one gives it."""
    together, _ = capacitated_topk_fused(scores.float(), top_k, width, True, 0, 20, DAMPING)
    alone = [capacitated_topk_fused(s[None].float(), top_k, width, True, 0, 20, DAMPING)[0][0] for s in scores]
    return all(torch.equal(together[i], alone[i]) for i in range(scores.shape[0]))
