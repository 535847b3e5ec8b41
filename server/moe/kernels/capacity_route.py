"""One Triton program per call for the capacitated top-k behind `optimal_balanced` and
`rank_balanced` (server/moe/routing/capacity_solver.py says what is solved and why).

The torch path is about 2,000 small kernels per call (20 price steps, 16 repair rounds, each a
few dozen dense ops): on a GPU its launches, not its arithmetic, are the cost, about 4 ms per
MoE layer in a decode graph on an H100, a step 14x slower than natural routing. Here one program
holds a whole call (a batch of R calls, e.g. every EP rank's, is a grid of R programs): the
same price steps in registers over blocks of tokens, the thresholds of each step in a small
scratch buffer that the program itself reads back after a barrier.

Same prices as the torch path (the same damped Jacobi steps on the same thresholds; the
cap-th largest threshold of a bin is found by bisection on order-preserving integer keys
instead of a top-k, which gives the same value). The last pairs are moved differently: the
torch path runs parallel rounds of moves; a single program can afford the exact greedy instead,
one move at a time, always the one that loses least (take the best free expert of an
under-capacity bin, give up the worst held one of an over-capacity bin). Without a group limit
or expert cap such a move exists while any bin is over (capacity_repair.py's argument), so the
moves always finish; each pass over the call is one move, and the price steps leave few.
Ids come back ordered by score, best first (ties: lower id), as the torch path's.

Shapes it takes (`fused_capacity_applies`): E and E/bins powers of two, E <= 256, k <= 16,
n <= MAX_TOKENS, no group limit, no per-expert cap. Others run the torch path.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    triton = None

BIG = 1.0e9  # capacity_prices.BIG
MAX_TOKENS = 1024  # one program per call: beyond this a call is a prefill chunk, better spread over SMs
TILE_ELEMENTS = 16384  # register tile budget per program (elements of the largest temporary)


if triton is not None:
    BIG_C = tl.constexpr(BIG)

    @triton.jit
    def _float_key(x):
        """float32 -> int32 whose signed order is the floats' order (an involution)."""
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _key_float(k):
        bits = tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.int32)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _pack(x, e, E: tl.constexpr):
        """(value, expert) -> int64, larger = higher value, then lower expert."""
        return (_float_key(x).to(tl.int64) << 32) | (E - 1 - e).to(tl.int64)

    @triton.jit
    def _unpack(key, E: tl.constexpr):
        return _key_float((key >> 32).to(tl.int32)), (E - 1 - (key & 0xFFFFFFFF)).to(tl.int32)

    @triton.jit
    def _capacity_kernel(scores_ptr, ids_ptr, ok_ptr, tau_ptr, price_ptr, load_ptr, cap_ptr,
                         n, price_cap, floor_share, extra, max_moves,
                         E: tl.constexpr, W: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, M: tl.constexpr,
                         MP: tl.constexpr, DP: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr,
                         BB: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr, DAMPING: tl.constexpr,
                         EXACT: tl.constexpr):
        """scores [R, n, E] f32 -> ids [R, n, K] int32 (by score), ok [R] int8. Scratch per call:
        tau [R, B, N_PAD, MP] f32, price/load/cap [R, B]."""
        B: tl.constexpr = E // W
        r = tl.program_id(0).to(tl.int64)
        s_base = scores_ptr + r * n * E
        i_base = ids_ptr + r * n * K
        tau_base = tau_ptr + r * B * N_PAD * MP
        p_base, l_base, c_base = price_ptr + r * B, load_ptr + r * B, cap_ptr + r * B
        e = tl.arange(0, E)  # [E]
        bins = tl.arange(0, B)  # [B]
        tl.store(p_base + bins, tl.zeros([B], tl.float32))
        tl.store(l_base + bins, tl.zeros([B], tl.int32))
        # spread of the scores: prices never go past it (capacity_prices.solve_bin_prices)
        hi = tl.full([T], -3.0e38, tl.float32)
        lo = tl.full([T], 3.0e38, tl.float32)
        for t0 in range(0, n, T):
            t = t0 + tl.arange(0, T)
            s = tl.load(s_base + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
            hi = tl.maximum(hi, tl.where(t < n, tl.max(s, axis=1), -3.0e38))
            lo = tl.minimum(lo, tl.where(t < n, tl.min(s, axis=1), 3.0e38))
        spread = tl.minimum(tl.max(hi, axis=0) - tl.min(lo, axis=0), BIG_C / 4) + 1.0
        nm = n * M
        c = tl.minimum(price_cap, nm)  # the threshold rank each bin's price sits at
        tl.debug_barrier()
        for _step in range(STEPS):
            # thresholds tau[b, t, j]: token t takes >= j+1 experts of bin b iff price[b] < tau
            for t0 in range(0, n, T):
                t = t0 + tl.arange(0, T)  # [T]
                s = tl.load(s_base + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
                adj = s - tl.load(p_base + e // W, cache_modifier=".cg")[None, :]  # [T, E]
                own_s = tl.where(adj > -BIG_C / 2, s, -BIG_C)
                top = tl.topk(_pack(adj, e[None, :], E), DP, dim=1)  # [T, DP] best adjusted first
                vals, idx = _unpack(top, E)
                if W == 1:
                    d = tl.arange(0, DP)[None, :]
                    kth = tl.sum(tl.where(d == K - 1, vals, 0.0), axis=1)  # [T]
                    if DP > K:
                        nxt = tl.sum(tl.where(d == K, vals, 0.0), axis=1)
                    else:
                        nxt = tl.full([T], -BIG_C, tl.float32)
                    outside = tl.where(adj >= kth[:, None], nxt[:, None], kth[:, None])  # [T, E]
                    tau = own_s - outside
                    tau = tl.minimum(tl.maximum(tl.where(own_s <= -BIG_C / 2, -BIG_C, tau), -BIG_C), BIG_C)
                    tl.store(tau_base + e[None, :] * N_PAD + t[:, None], tau, mask=(t < n)[:, None])
                else:
                    own = tl.topk(tl.reshape(own_s, (T, B, W)), MP, dim=2)  # [T, B, MP] best of each bin
                    notin = (idx // W)[:, None, :] != bins[None, :, None]  # [T, B, DP]
                    cnt = tl.cumsum(notin.to(tl.int32), axis=2)
                    j = tl.arange(0, MP)
                    want = (K - j)[None, None, :, None]  # [1, 1, MP, 1]: rank needed outside the bin
                    sel = notin[:, :, None, :] & (cnt[:, :, None, :] == want)  # [T, B, MP, DP]
                    outside = tl.max(tl.where(sel, vals[:, None, None, :], -BIG_C), axis=3)  # [T, B, MP]
                    tau = own - outside
                    tau = tl.minimum(tl.maximum(tl.where(own <= -BIG_C / 2, -BIG_C, tau), -BIG_C), BIG_C)
                    ptrs = tau_base + bins[None, :, None] * (N_PAD * MP) + t[:, None, None] * MP + j[None, None, :]
                    tl.store(ptrs, tau, mask=(t < n)[:, None, None] & (j < M)[None, None, :])
            tl.debug_barrier()
            # each bin's price moves DAMPING of the way to the midpoint of its c-th and (c+1)-th largest tau
            for b0 in range(0, B, BB):
                bb = b0 + tl.arange(0, BB)  # [BB]
                q = tl.arange(0, N_PAD * MP)
                valid = ((q // MP) < n) & ((q % MP) < M)  # [N_PAD*MP]
                tv = tl.load(tau_base + bb[:, None] * (N_PAD * MP) + q[None, :], mask=valid[None, :], other=0.0,
                             cache_modifier=".cg")
                key = tl.where(valid[None, :], _float_key(tv), -2147483648).to(tl.int64)  # [BB, N_PAD*MP]
                kl = tl.full([BB], -2147483648, tl.int64)
                kh = tl.full([BB], 2147483647, tl.int64)
                cc = tl.maximum(c, 1)
                for _bit in range(32):  # largest key with >= cc keys at or above it: the cc-th largest
                    mid = (kl + kh + 1) >> 1
                    ge = tl.sum((valid[None, :] & (key >= mid[:, None])).to(tl.int32), axis=1) >= cc
                    kl = tl.where(ge, mid, kl)
                    kh = tl.where(ge, kh, mid - 1)
                kth = _key_float(kl.to(tl.int32))  # [BB]
                top1 = _key_float(tl.max(key, axis=1).to(tl.int32))
                upper = tl.where(c == 0, top1 + 1.0, kth)
                at_or_above = tl.sum((valid[None, :] & (key >= kl[:, None])).to(tl.int32), axis=1)
                below = _key_float(tl.max(tl.where(valid[None, :] & (key < kl[:, None]), key, -2147483648),
                                          axis=1).to(tl.int32))
                nxt = tl.where(at_or_above >= c + 1, kth, below)  # the (c+1)-th largest
                lower = tl.where(c + 1 <= nm, nxt, -BIG_C)
                lower = tl.where(c == 0, kth, lower)  # c = 0: the largest
                target = (tl.minimum(tl.maximum(upper, -BIG_C), BIG_C) + tl.minimum(tl.maximum(lower, -BIG_C), BIG_C)) / 2
                target = tl.maximum(tl.minimum(target, spread), -spread)
                if not EXACT:
                    target = tl.maximum(target, 0.0)
                price = tl.load(p_base + bb, cache_modifier=".cg")
                tl.store(p_base + bb, price + DAMPING * (target - price))
            tl.debug_barrier()
        # priced top-k, loads per bin
        kk = tl.arange(0, KP)
        for t0 in range(0, n, T):
            t = t0 + tl.arange(0, T)
            s = tl.load(s_base + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)
            adj = s - tl.load(p_base + e // W, cache_modifier=".cg")[None, :]
            _, ids = _unpack(tl.topk(_pack(adj, e[None, :], E), KP, dim=1), E)  # [T, KP]
            m = (t < n)[:, None] & (kk < K)[None, :]
            tl.store(i_base + t[:, None] * K + kk[None, :], ids, mask=m)
            tl.atomic_add(l_base + ids // W, tl.full([T, KP], 1, tl.int32), mask=m)
        tl.debug_barrier()
        # capacities: exact shares give the `extra` most loaded bins (ties: lower bin) one more
        for b0 in range(0, B, BC):
            bb = b0 + tl.arange(0, BC)
            if EXACT:
                mine = tl.load(l_base + bb, cache_modifier=".cg")  # [BC]
                every = tl.load(l_base + bins, cache_modifier=".cg")  # [B]
                ahead = (every[None, :] > mine[:, None]) | ((every[None, :] == mine[:, None]) & (bins[None, :] < bb[:, None]))
                rank = tl.sum(ahead.to(tl.int32), axis=1)
                tl.store(c_base + bb, floor_share + (rank < extra).to(tl.int32))
            else:
                tl.store(c_base + bb, tl.zeros([BC], tl.int32) + price_cap)
        tl.debug_barrier()
        # moves, one at a time, least loss first, until no bin is over its capacity
        load, cap = tl.load(l_base + bins, cache_modifier=".cg"), tl.load(c_base + bins, cache_modifier=".cg")
        excess = tl.sum(tl.maximum(load - cap, 0), axis=0)
        moves = 0
        while (excess > 0) & (moves < max_moves):
            load_e = tl.load(l_base + e // W, cache_modifier=".cg")  # [E] load of each expert's bin
            cap_e = tl.load(c_base + e // W, cache_modifier=".cg")
            over, under = load_e > cap_e, load_e < cap_e
            best_gain = -float("inf")
            best_tok = 0
            best_give = 0
            best_take = 0
            for t0 in range(0, n, T):
                t = t0 + tl.arange(0, T)
                s = tl.load(s_base + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
                ids = tl.load(i_base + t[:, None] * K + kk[None, :], mask=(t < n)[:, None] & (kk < K)[None, :],
                              other=-1, cache_modifier=".cg")  # [T, KP]
                held = tl.max((ids[:, :, None] == e[None, None, :]).to(tl.int32), axis=1) > 0  # [T, E]
                give_s = tl.where(held & over[None, :], s, float("inf"))
                give = tl.argmin(give_s, axis=1)  # [T] lowest held score in an over bin
                take_s = tl.where(~held & under[None, :], s, -float("inf"))
                take = tl.argmax(take_s, axis=1)  # [T] best free expert of an under bin
                gain = tl.where(t < n, tl.max(take_s, axis=1) - tl.min(give_s, axis=1), -float("inf"))  # [T]
                gain = tl.where(gain == gain, gain, -float("inf"))  # inf - inf: no move for this token
                g = tl.max(gain, axis=0)
                at = tl.argmax(gain, axis=0)
                pick = tl.arange(0, T) == at
                better = g > best_gain
                best_tok = tl.where(better, t0 + at, best_tok)
                best_give = tl.where(better, tl.sum(tl.where(pick, give, 0), axis=0), best_give)
                best_take = tl.where(better, tl.sum(tl.where(pick, take, 0), axis=0), best_take)
                best_gain = tl.where(better, g, best_gain)
            if best_gain > -float("inf"):
                row = tl.load(i_base + best_tok * K + kk, mask=kk < K, other=-1, cache_modifier=".cg")  # [KP]
                tl.store(i_base + best_tok * K + kk, tl.where(row == best_give, best_take, row), mask=kk < K)
                tl.atomic_add(l_base + best_give // W, -1)
                tl.atomic_add(l_base + best_take // W, 1)
                moves += 1
            else:
                moves = max_moves  # no move exists (cannot happen without a group limit): give up
            tl.debug_barrier()
            load = tl.load(l_base + bins, cache_modifier=".cg")
            excess = tl.sum(tl.maximum(load - cap, 0), axis=0)
        tl.store(ok_ptr + r, (excess == 0).to(tl.int8))
        # ids by score, best first (ties: lower id)
        for t0 in range(0, n, T):
            t = t0 + tl.arange(0, T)
            m = (t < n)[:, None] & (kk < K)[None, :]
            ids = tl.load(i_base + t[:, None] * K + kk[None, :], mask=m, other=0, cache_modifier=".cg")  # [T, KP]
            sc = tl.load(s_base + t[:, None] * E + ids, mask=m, other=-3.0e38)
            key = tl.where(m, _pack(sc, ids, E), -9223372036854775807)
            _, ordered = _unpack(tl.sort(key, dim=1, descending=True), E)
            tl.store(i_base + t[:, None] * K + kk[None, :], ordered, mask=m)


def triton_available() -> bool:
    return triton is not None


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fused_capacity_applies(n: int, num_experts: int, top_k: int, width: int) -> bool:
    """Whether capacitated_topk_fused takes this shape (the module docstring lists why)."""
    return (triton is not None and 0 < n <= MAX_TOKENS and num_experts <= 256 and top_k <= 16 and top_k < num_experts
            and num_experts == _pow2(num_experts) and width == _pow2(width) and num_experts % width == 0)


def capacitated_topk_fused(scores: torch.Tensor, top_k: int, width: int, exact: bool, ceiling: int, steps: int,
                           damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, n, E] float32 (finite, clamped as capacity_solver does) -> (ids [R, n, k]
    int32 by score, ok [R] bool: every bin within its capacity). Bins: `width` consecutive
    experts; exact shares (floor or ceil of n*k/bins) or `ceiling` pairs each."""
    calls, n, num_experts = scores.shape
    bins = num_experts // width
    m = min(top_k, width)
    mp, dp, n_pad = _pow2(m), _pow2(min(num_experts, top_k + m)), max(16, _pow2(n))
    floor_share, extra = divmod(n * top_k, bins)
    price_cap = floor_share if exact else ceiling
    widest = max(bins * mp * dp, num_experts * _pow2(top_k), num_experts * 2)  # per token, the largest temporary
    tile_t = max(1, min(16, TILE_ELEMENTS // widest))
    tile_t = 1 << (tile_t.bit_length() - 1)  # tokens per block: a power of two
    dev = scores.device
    ids = torch.empty(calls, n, top_k, dtype=torch.int32, device=dev)
    ok = torch.empty(calls, dtype=torch.int8, device=dev)
    tau = torch.empty(calls, bins, n_pad, mp, dtype=torch.float32, device=dev)
    price = torch.empty(calls, bins, dtype=torch.float32, device=dev)
    load = torch.empty(calls, bins, dtype=torch.int32, device=dev)
    cap = torch.empty(calls, bins, dtype=torch.int32, device=dev)
    bb = max(1, min(bins, TILE_ELEMENTS // (n_pad * mp)))
    bc = max(1, min(bins, TILE_ELEMENTS // bins))
    _capacity_kernel[(calls,)](scores.contiguous(), ids, ok, tau, price, load, cap, n, price_cap, floor_share, extra,
                               n * top_k, E=num_experts, W=width, K=top_k, KP=_pow2(top_k), M=m, MP=mp, DP=dp,
                               N_PAD=n_pad, T=tile_t,
                               BB=bb, BC=bc, STEPS=steps, DAMPING=damping, EXACT=exact, num_warps=8)
    return ids, ok.bool()
