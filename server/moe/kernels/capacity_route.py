"""The capacitated top-k behind `optimal_balanced` and `rank_balanced` in a fixed chain of
Triton launches (server/moe/routing/capacity_solver.py says what is solved and why).

The torch path is about 2,000 small kernels per call (20 price steps, 16 repair rounds, each a
few dozen dense ops): on a GPU its launches, not its arithmetic, are the cost (3.8-5.3 ms per
call in a CUDA graph on an H100 at 128 tokens). A first kernel held a whole call in one program
(one SM): the price steps, serial over token blocks and bins, still took 1.8-4.3 ms per call
at 128 tokens on an H100. So the work is spread instead, per price step, over two launches
whose programs each take one block of one call (capacity_route_kernels.py):

  1. per step: `tau_kernel`, one program per block of tokens, writes the step's thresholds to a
     scratch buffer; `price_kernel`, one program per block of bins, moves those bins' prices
     (the cap-th largest threshold of a bin on order-preserving integer keys, the same value as
     the torch path's top-k: by bisection in registers, or by radix select over chunks where a
     bin holds more than PRICE_CHUNK thresholds);
  2. `assign_kernel`, per block of tokens: the priced top-k and the bin loads;
  3. the exact shares, then exact greedy moves one at a time, always the one that loses least
     (the torch path runs parallel rounds instead), found by a lazy search over each token's
     best move (capacity_moves_kernels.py). Without a group limit or expert cap such a move
     exists while any bin is over (capacity_repair.py's argument), so the moves always finish;
     the price steps leave few;
  4. `order_kernel`, per block of tokens: ids ordered by score, best first (ties: lower id),
     as the torch path's.

A batch of R calls (every EP rank's, in the what-if) takes the same launches, with R times the
programs. The chain is 2 x steps + 5 Triton launches (and a few torch ops for the scratch and the
scores' spread) whatever the data: a CUDA graph holds it.

Shapes it takes (`fused_capacity_applies`): E and E/bins powers of two, E <= 256, k <= 16,
n <= MAX_TOKENS, no group limit, no per-expert cap. Others run the torch path.
"""
from __future__ import annotations

import torch

try:
    import triton

    from . import capacity_moves_kernels as moves
    from . import capacity_route_kernels as kernels
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    triton = None

MAX_TOKENS = 16384  # the thresholds scratch is bins x tokens x min(k, width) floats per call
TILE_ELEMENTS = 16384  # register tile budget per program (elements of the largest temporary)
PRICE_CHUNK = 4096  # a bin's thresholds up to this many are bisected in registers, more in chunks
GAIN_CHUNK = 1024  # tokens per chunk of the moves' search: the best stored gain of each is kept
PRICE_TILE = 1024  # thresholds per price program when several bins share one (small programs, many SMs)


def triton_available() -> bool:
    return triton is not None


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fused_capacity_applies(n: int, num_experts: int, top_k: int, width: int) -> bool:
    """Whether capacitated_topk_fused takes this shape (the module docstring lists why)."""
    return (triton is not None and 0 < n <= MAX_TOKENS and num_experts <= 256 and top_k <= 16 and top_k < num_experts
            and num_experts == _pow2(num_experts) and width == _pow2(width) and num_experts % width == 0)


def capacitated_topk_fused(scores: torch.Tensor, top_k: int, width: int, exact: bool, ceiling: int, steps: int,
                           damping: float, price_chunk: int = PRICE_CHUNK,
                           gain_chunk: int = GAIN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, n, E] float32 (finite, clamped as capacity_solver does) -> (ids [R, n, k]
    int32 by score, ok [R] bool: every bin within its capacity). Bins: `width` consecutive
    experts; exact shares (floor or ceil of n*k/bins) or `ceiling` pairs each. price_chunk (a
    power of two): a bin with more thresholds is searched in chunks of it; gain_chunk (a power of
    two): tokens per chunk of the moves' two-level search (tests lower both)."""
    calls, n, num_experts = scores.shape
    bins = num_experts // width
    m = min(top_k, width)
    mp, dp, kp, n_pad = _pow2(m), _pow2(min(num_experts, top_k + m)), _pow2(top_k), max(16, _pow2(n))
    floor_share, extra = divmod(n * top_k, bins)
    price_cap = floor_share if exact else ceiling
    widest = max(bins * mp * dp, num_experts * kp, num_experts * 2)  # per token, the largest temporary
    tile_t = max(1, min(16, TILE_ELEMENTS // widest))
    tile_t = 1 << (tile_t.bit_length() - 1)  # tokens per block: a power of two
    slots = n_pad * mp  # thresholds per bin
    chunk = min(slots, price_chunk)
    bins_per_block = max(1, min(bins, PRICE_TILE // slots)) if slots <= price_chunk else 1
    scores = scores.contiguous()
    dev = scores.device
    ids = torch.empty(calls, n, top_k, dtype=torch.int32, device=dev)
    ok = torch.empty(calls, dtype=torch.int8, device=dev)
    tau = torch.empty(calls, bins, n_pad, mp, dtype=torch.float32, device=dev)
    price = torch.zeros(calls, bins, dtype=torch.float32, device=dev)
    load = torch.zeros(calls, bins, dtype=torch.int32, device=dev)
    cap = torch.empty(calls, bins, dtype=torch.int32, device=dev)
    # prices never go past the spread of the call's scores (capacity_prices.solve_bin_prices)
    spread = ((scores.amax(dim=(1, 2)) - scores.amin(dim=(1, 2))).clamp(max=kernels.BIG / 4) + 1.0).contiguous()  # [R]
    tokens = (calls, triton.cdiv(n, tile_t))
    shape = dict(E=num_experts, W=width, K=top_k)
    for _ in range(steps):
        kernels.tau_kernel[tokens](scores, tau, price, n, **shape, M=m, MP=mp, DP=dp, N_PAD=n_pad, T=tile_t,
                                   num_warps=8)
        kernels.price_kernel[(calls, bins // bins_per_block)](tau, price, spread, n, price_cap, B=bins, M=m, MP=mp,
                                                              N_PAD=n_pad, BB=bins_per_block, CH=chunk,
                                                              DAMPING=damping, EXACT=exact, num_warps=4)
    kernels.assign_kernel[tokens](scores, ids, price, load, n, **shape, KP=kp, T=tile_t, num_warps=4)
    moves.caps_kernel[(calls,)](load, cap, price_cap, floor_share, extra, B=bins,
                                BC=max(1, min(bins, TILE_ELEMENTS // bins)), EXACT=exact, num_warps=8)
    gain = torch.empty(calls, n, dtype=torch.float32, device=dev)
    tile_c = 1 << (max(1, min(16, TILE_ELEMENTS // (kp * num_experts))).bit_length() - 1)  # the held mask [T, KP, E]
    moves.candidates_kernel[(calls, triton.cdiv(n, tile_c))](scores, ids, load, cap, gain, n, **shape, KP=kp, T=tile_c,
                                                            num_warps=4)
    gain_chunk = min(gain_chunk, max(16, _pow2(n)))
    moves.moves_kernel[(calls,)](scores, ids, ok, load, cap, gain, n, 4 * n * top_k, **shape, KP=kp, TG=gain_chunk,
                                 NC=_pow2(triton.cdiv(n, gain_chunk)), num_warps=8)
    moves.order_kernel[tokens](scores, ids, n, E=num_experts, K=top_k, KP=kp, T=tile_t, num_warps=4)
    return ids, ok.bool()
