"""The price steps and the priced top-k of capacity_route.capacitated_topk_fused (that module
says why the solve is split this way; the moves are in capacity_moves_kernels.py). Each kernel
is one phase of the torch path (capacity_solver.py) for a batch of R calls: program_id(0) is
the call, program_id(1) the token block or bin block.

Scratch per call: tau [R, B, N_PAD, MP] f32 (thresholds of one price step), price/load/cap [R, B].
"""
from __future__ import annotations

import triton
import triton.language as tl

BIG = 1.0e9  # capacity_prices.BIG
BIG_C = tl.constexpr(BIG)
KEY_MIN = tl.constexpr(-2147483648)
KEY_MAX = tl.constexpr(2147483647)


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
def tau_kernel(scores_ptr, tau_ptr, price_ptr, n, E: tl.constexpr, W: tl.constexpr, K: tl.constexpr,
               M: tl.constexpr, MP: tl.constexpr, DP: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr):
    """One price step's thresholds for T tokens: tau[b, t, j] such that token t takes >= j+1
    experts of bin b iff price[b] < tau (capacity_prices.bin_thresholds)."""
    B: tl.constexpr = E // W
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * T + tl.arange(0, T)  # [T]
    tau_base = tau_ptr + r * B * N_PAD * MP
    e = tl.arange(0, E)  # [E]
    s = tl.load(scores_ptr + r * n * E + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
    adj = s - tl.load(price_ptr + r * B + e // W)[None, :]  # [T, E]
    own_s = tl.where(adj > -BIG_C / 2, s, -BIG_C)
    vals, idx = _unpack(tl.topk(_pack(adj, e[None, :], E), DP, dim=1), E)  # [T, DP] best adjusted first
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
        bins = tl.arange(0, B)  # [B]
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


@triton.jit
def _tau_keys(tau_base, bb, q, n, M: tl.constexpr, MP: tl.constexpr, L: tl.constexpr):
    """Order keys of tau for bins bb [BB] at flat slots q [Q] (q = t*MP + j) -> ([BB, Q] int64, [Q] valid)."""
    valid = ((q // MP) < n) & ((q % MP) < M)  # [Q]
    tv = tl.load(tau_base + bb[:, None] * L + q[None, :], mask=valid[None, :], other=0.0)
    return tl.where(valid[None, :], _float_key(tv), KEY_MIN).to(tl.int64), valid


@triton.jit
def price_kernel(tau_ptr, price_ptr, spread_ptr, n, price_cap, B: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                 N_PAD: tl.constexpr, BB: tl.constexpr, CH: tl.constexpr, DAMPING: tl.constexpr, EXACT: tl.constexpr):
    """BB bins' prices move DAMPING of the way to the midpoint of the c-th and (c+1)-th largest
    tau of the bin (capacity_prices.price_for_capacity), c = its capacity. The c-th largest of
    the order keys is found in registers by bisection when a bin's n*MP slots fit CH, else
    (BB = 1, a prefill-sized call) by radix select over chunks of CH: 4 passes of 256-way
    histograms instead of 32 bisection passes, then one pass for its neighbours."""
    L: tl.constexpr = N_PAD * MP
    r = tl.program_id(0).to(tl.int64)
    bb = tl.program_id(1) * BB + tl.arange(0, BB)  # [BB]
    tau_base = tau_ptr + r * B * L
    nm = n * M
    c = tl.minimum(price_cap, nm)  # the threshold rank each bin's price sits at
    cc = tl.maximum(c, 1)
    if L <= CH:
        kl = tl.full([BB], KEY_MIN, tl.int64)
        kh = tl.full([BB], KEY_MAX, tl.int64)
        key, valid = _tau_keys(tau_base, bb, tl.arange(0, L), n, M, MP, L)  # [BB, L]
        for _bit in range(32):  # largest key with >= cc keys at or above it: the cc-th largest
            mid = (kl + kh + 1) >> 1
            ge = tl.sum((valid[None, :] & (key >= mid[:, None])).to(tl.int32), axis=1) >= cc
            kl = tl.where(ge, mid, kl)
            kh = tl.where(ge, kh, mid - 1)
        top_key = tl.max(key, axis=1)
        at_or_above = tl.sum((valid[None, :] & (key >= kl[:, None])).to(tl.int32), axis=1)
        below_key = tl.max(tl.where(valid[None, :] & (key < kl[:, None]), key, KEY_MIN), axis=1)
    else:  # BB = 1: radix select over the chunks, 8 bits of the key a pass, most significant first
        digits = tl.arange(0, 256)
        prefix = tl.sum(tl.zeros([BB], tl.int64), axis=0)  # the key's high bits chosen so far (offset by 2^31)
        rank = cc  # the rank-th largest among the keys that share the prefix
        for shift in tl.static_range(24, -1, -8):
            hist = tl.zeros([256], tl.int32)
            for q0 in range(0, n * MP, CH):
                key, valid = _tau_keys(tau_base, bb, q0 + tl.arange(0, CH), n, M, MP, L)  # [1, CH]
                unsigned = tl.reshape(key, (CH,)) + 2147483648  # [CH] in [0, 2^32), the same order
                hit = valid & ((unsigned >> (shift + 8)) == prefix)
                hist += tl.histogram(((unsigned >> shift) & 255).to(tl.int32), 256, mask=hit)
            at_least = tl.cumsum(hist, axis=0, reverse=True)  # [256] keys whose digit is >= d
            d = tl.max(tl.where(at_least >= rank, digits, -1), axis=0)
            rank -= tl.sum(tl.where(digits > d, hist, 0), axis=0)
            prefix = (prefix << 8) | d.to(tl.int64)
        kl = tl.zeros([BB], tl.int64) + (prefix - 2147483648)
        top_key = tl.full([BB], KEY_MIN, tl.int64)
        at_or_above = tl.zeros([BB], tl.int32)
        below_key = tl.full([BB], KEY_MIN, tl.int64)
        for q0 in range(0, n * MP, CH):
            key, valid = _tau_keys(tau_base, bb, q0 + tl.arange(0, CH), n, M, MP, L)
            top_key = tl.maximum(top_key, tl.max(key, axis=1))
            at_or_above += tl.sum((valid[None, :] & (key >= kl[:, None])).to(tl.int32), axis=1)
            below_key = tl.maximum(below_key, tl.max(tl.where(valid[None, :] & (key < kl[:, None]), key, KEY_MIN), axis=1))
    kth = _key_float(kl.to(tl.int32))  # [BB]
    upper = tl.where(c == 0, _key_float(top_key.to(tl.int32)) + 1.0, kth)
    nxt = tl.where(at_or_above >= c + 1, kth, _key_float(below_key.to(tl.int32)))  # the (c+1)-th largest
    lower = tl.where(c + 1 <= nm, nxt, -BIG_C)
    lower = tl.where(c == 0, kth, lower)  # c = 0: the largest
    target = (tl.minimum(tl.maximum(upper, -BIG_C), BIG_C) + tl.minimum(tl.maximum(lower, -BIG_C), BIG_C)) / 2
    spread = tl.load(spread_ptr + r)
    target = tl.maximum(tl.minimum(target, spread), -spread)
    if not EXACT:
        target = tl.maximum(target, 0.0)
    price = tl.load(price_ptr + r * B + bb)
    tl.store(price_ptr + r * B + bb, price + DAMPING * (target - price))


@triton.jit
def assign_kernel(scores_ptr, ids_ptr, price_ptr, load_ptr, n, E: tl.constexpr, W: tl.constexpr, K: tl.constexpr,
                  KP: tl.constexpr, T: tl.constexpr):
    """Priced top-k of T tokens (ids in score-minus-price order) and their pairs added to the bin loads."""
    B: tl.constexpr = E // W
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * T + tl.arange(0, T)  # [T]
    e = tl.arange(0, E)
    kk = tl.arange(0, KP)
    s = tl.load(scores_ptr + r * n * E + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
    adj = s - tl.load(price_ptr + r * B + e // W)[None, :]
    _, ids = _unpack(tl.topk(_pack(adj, e[None, :], E), KP, dim=1), E)  # [T, KP]
    m = (t < n)[:, None] & (kk < K)[None, :]
    tl.store(ids_ptr + r * n * K + t[:, None] * K + kk[None, :], ids, mask=m)
    tl.atomic_add(load_ptr + r * B + ids // W, tl.full([T, KP], 1, tl.int32), mask=m)
