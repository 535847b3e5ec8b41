"""The last phase of capacity_route.capacitated_topk_fused: capacities, the moves that bring
every bin within its capacity, and the ids ordered by score.

The moves are the exact greedy: one at a time, always the one that loses least (take the best
free expert of an under-capacity bin, give up the worst held one of an over-capacity bin; ties:
lower token, then lower expert). Finding it by a pass over every token per move made a prefill
call's moves serial passes over thousands of tokens, so the search is lazy instead:
`candidates_kernel` stores each token's best move in parallel, and `moves_kernel` (one program
per call) repeatedly takes the token with the best stored gain and recomputes that token's
move against the current loads (and, after a move, the token's next one). A move only ever
takes a bin out of the over or under set, never into one, so a token's true best gain can only
fall below its stored one: a recomputed gain equal to the stored one is the best of all
tokens, and the move is made; a lower one is stored and the search goes on. Same moves as the eager search. The stored gains are searched
in two levels (the best of each chunk of tokens kept in registers), so a pick reads one chunk
of gains, not all n. With a pass over all n gains per pick, optimal_balanced at 8192 tokens and
E=256 took 12 ms per call on an H100 with 5 price steps against 6.7 ms with 20: the moves that
fewer steps leave, each found by passes over every gain, cost more than the steps saved.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .capacity_route_kernels import _pack, _unpack


@triton.jit
def caps_kernel(load_ptr, cap_ptr, price_cap, floor_share, extra, B: tl.constexpr, BC: tl.constexpr,
                EXACT: tl.constexpr):
    """One program per call: exact shares give the `extra` most loaded bins (ties: lower bin)
    one pair more than floor_share; otherwise every bin may take price_cap (the ceiling)."""
    r = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, B)
    for b0 in range(0, B, BC):
        bb = b0 + tl.arange(0, BC)
        if EXACT:
            mine = tl.load(load_ptr + r * B + bb)  # [BC]
            every = tl.load(load_ptr + r * B + bins)  # [B]
            ahead = (every[None, :] > mine[:, None]) | ((every[None, :] == mine[:, None]) & (bins[None, :] < bb[:, None]))
            rank = tl.sum(ahead.to(tl.int32), axis=1)
            tl.store(cap_ptr + r * B + bb, floor_share + (rank < extra).to(tl.int32))
        else:
            tl.store(cap_ptr + r * B + bb, tl.zeros([BC], tl.int32) + price_cap)


@triton.jit
def _best_moves(s, ids, valid, over, under, E: tl.constexpr):
    """scores s [T, E], ids [T, KP] (-1: none), valid [T], over/under [E] bool (the expert's bin
    is above / below its capacity) -> (gain [T] (-inf: no move), give [T], take [T])."""
    e = tl.arange(0, E)
    held = tl.max((ids[:, :, None] == e[None, None, :]).to(tl.int32), axis=1) > 0  # [T, E]
    give_s = tl.where(held & over[None, :], s, float("inf"))
    take_s = tl.where(~held & under[None, :], s, -float("inf"))
    gain = tl.where(valid, tl.max(take_s, axis=1) - tl.min(give_s, axis=1), -float("inf"))
    gain = tl.where(gain == gain, gain, -float("inf"))  # inf - inf: no move for this token
    return gain, tl.argmin(give_s, axis=1).to(tl.int32), tl.argmax(take_s, axis=1).to(tl.int32)


@triton.jit
def _bin_state(load_ptr, cap_ptr, E: tl.constexpr, W: tl.constexpr):
    """[E] bool pair: is each expert's bin over / under its capacity now."""
    e = tl.arange(0, E)
    load_e = tl.load(load_ptr + e // W, cache_modifier=".cg")
    cap_e = tl.load(cap_ptr + e // W, cache_modifier=".cg")
    return load_e > cap_e, load_e < cap_e


@triton.jit
def candidates_kernel(scores_ptr, ids_ptr, load_ptr, cap_ptr, gain_ptr, n, E: tl.constexpr, W: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, T: tl.constexpr):
    """The gain of each of T tokens' best move under the loads after the priced top-k (which
    move it is, moves_kernel recomputes when it picks the token)."""
    B: tl.constexpr = E // W
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * T + tl.arange(0, T)  # [T]
    e = tl.arange(0, E)
    kk = tl.arange(0, KP)
    over, under = _bin_state(load_ptr + r * B, cap_ptr + r * B, E, W)
    s = tl.load(scores_ptr + r * n * E + t[:, None] * E + e[None, :], mask=(t < n)[:, None], other=0.0)  # [T, E]
    ids = tl.load(ids_ptr + r * n * K + t[:, None] * K + kk[None, :], mask=(t < n)[:, None] & (kk < K)[None, :],
                  other=-1)  # [T, KP]
    gain, _, _ = _best_moves(s, ids, t < n, over, under, E)
    tl.store(gain_ptr + r * n + t, gain, mask=t < n)


@triton.jit
def moves_kernel(scores_ptr, ids_ptr, ok_ptr, load_ptr, cap_ptr, gain_ptr, n, max_picks,
                 E: tl.constexpr, W: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, TG: tl.constexpr,
                 NC: tl.constexpr):
    """One program per call: the lazy greedy of the module docstring until no bin is over its
    capacity (or max_picks picks); ok[r] says whether every bin ended within its capacity.
    The stored gains are searched in two levels: the best of each chunk of TG tokens is kept in
    registers (NC chunks), so a pick reads one chunk, not all n gains."""
    B: tl.constexpr = E // W
    r = tl.program_id(0).to(tl.int64)
    s_base, i_base, g_base = scores_ptr + r * n * E, ids_ptr + r * n * K, gain_ptr + r * n
    l_base, c_base = load_ptr + r * B, cap_ptr + r * B
    e = tl.arange(0, E)
    kk = tl.arange(0, KP)
    bins = tl.arange(0, B)
    chunks = tl.arange(0, NC)
    lane = tl.arange(0, TG)
    chunk_best = tl.full([NC], -float("inf"), tl.float32)  # [NC] best stored gain of each chunk
    for c0 in range(0, tl.cdiv(n, TG)):
        t = c0 * TG + lane
        g = tl.load(g_base + t, mask=t < n, other=-float("inf"))  # [TG]
        chunk_best = tl.where(chunks == c0, tl.max(g, axis=0), chunk_best)
    cap = tl.load(c_base + bins)
    excess = tl.sum(tl.maximum(tl.load(l_base + bins) - cap, 0), axis=0)
    picks = 0
    while (excess > 0) & (picks < max_picks):
        best = tl.max(chunk_best, axis=0)
        c = tl.argmax(chunk_best, axis=0)  # ties: the lower chunk, then the lower token in it
        t = c * TG + lane
        g = tl.load(g_base + t, mask=t < n, other=-float("inf"), cache_modifier=".cg")  # [TG]
        tok = c * TG + tl.argmax(g, axis=0)
        if best == -float("inf"):
            picks = max_picks  # no move exists (cannot happen without a group limit): give up
        else:
            over, under = _bin_state(l_base, c_base, E, W)
            s = tl.load(s_base + tok * E + e)[None, :]  # [1, E]
            row = tl.load(i_base + tok * K + kk, mask=kk < K, other=-1, cache_modifier=".cg")  # [KP]
            gain, give, take = _best_moves(s, row[None, :], tl.full([1], 1, tl.int1), over, under, E)
            now, give1, take1 = tl.max(gain, axis=0), tl.max(give, axis=0), tl.max(take, axis=0)
            if now == best:  # still the best move of all tokens: make it
                tl.store(i_base + tok * K + kk, tl.where(row == give1, take1, row), mask=kk < K)
                tl.atomic_add(l_base + give1 // W, -1)
                tl.atomic_add(l_base + take1 // W, 1)
                tl.debug_barrier()
                over, under = _bin_state(l_base, c_base, E, W)
                row = tl.where(row == give1, take1, row)
                gain, give, take = _best_moves(s, row[None, :], tl.full([1], 1, tl.int1), over, under, E)
                now = tl.max(gain, axis=0)
            tl.store(g_base + tok, now)
            chunk_best = tl.where(chunks == c, tl.max(tl.where(t == tok, now, g), axis=0), chunk_best)
            picks += 1
        tl.debug_barrier()
        excess = tl.sum(tl.maximum(tl.load(l_base + bins, cache_modifier=".cg") - cap, 0), axis=0)
    tl.store(ok_ptr + r, (excess == 0).to(tl.int8))


@triton.jit
def order_kernel(scores_ptr, ids_ptr, n, E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, T: tl.constexpr):
    """T tokens' ids reordered by the router's score, best first (ties: lower id)."""
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * T + tl.arange(0, T)
    kk = tl.arange(0, KP)
    m = (t < n)[:, None] & (kk < K)[None, :]
    ptrs = ids_ptr + r * n * K + t[:, None] * K + kk[None, :]
    ids = tl.load(ptrs, mask=m, other=0)  # [T, KP]
    sc = tl.load(scores_ptr + r * n * E + t[:, None] * E + ids, mask=m, other=-3.0e38)
    key = tl.where(m, _pack(sc, ids, E), -9223372036854775807)
    _, ordered = _unpack(tl.sort(key, dim=1, descending=True), E)
    tl.store(ptrs, ordered, mask=m)
