#!/usr/bin/env python3
"""How many parallel iterations would greedy_balanced's rounds need? (CPU, no GPU.)

Inside one round of E/k tokens the rule is sequential: token j takes its k best experts among
those tokens 0..j-1 left (a serial dictatorship). The CUDA kernel walks that chain one token at
a time (~170-240 SM cycles per token on an H100, BENCHMARKS.md section 3). Two parallel
formulations reach the same picks in fewer dependent steps, and this script counts the steps
they need, checking that both land on the sequential answer:

* Jacobi: every token re-picks at once from what the previous iteration's earlier tokens took,
  until no token's picks change (counted with the pass that finds no change).
* Deferred acceptance (tokens propose, every expert keeps the lowest token index that asked):
  each iteration, a token with free slots asks as many next experts of its list as it has free
  slots. With one common priority over tokens its result is the serial one, in any order
  (counted: iterations in which some token asks).

    python scripts/simulate_parallel_greedy.py                       # randn scores, 256 rounds
    python scripts/simulate_parallel_greedy.py --kind biased --rounds 64

An iteration of either is a parallel step whose cost on the GPU was measured separately
(docs/gpu_runs/2026-11-27_session4/README.md: ~1,000-1,400 cycles per Jacobi iteration).
"""
from __future__ import annotations

import argparse

import torch


def round_preferences(scores: torch.Tensor) -> torch.Tensor:
    """[T, E] scores -> [T, E] expert ids, best first; equal scores: lower id first (the rule's order)."""
    return torch.sort(-scores.float(), dim=1, stable=True).indices


def serial_picks(prefs: torch.Tensor, top_k: int, fixed: list[set[int]] | None = None) -> list[set[int]]:
    """The rule itself: token j takes the first k experts of its list that tokens before it left."""
    picks = list(fixed or [])
    taken = set().union(*picks) if picks else set()
    for j in range(len(picks), prefs.shape[0]):
        mine = [e for e in prefs[j].tolist() if e not in taken][:top_k]
        picks.append(set(mine))
        taken.update(mine)
    return picks


def jacobi_iterations(prefs: torch.Tensor, top_k: int, first: int, last: int) -> tuple[int, list[set[int]]]:
    """Tokens [first, last) all at once from the serial picks of tokens < first."""
    lists = [p.tolist() for p in prefs]
    fixed = serial_picks(prefs[:first], top_k)
    before = set().union(*fixed) if fixed else set()
    picks = [set([e for e in lists[j] if e not in before][:top_k]) for j in range(first, last)]
    iterations = 1
    while True:
        taken_below, new = set(before), []
        for j in range(first, last):
            new.append(set([e for e in lists[j] if e not in taken_below][:top_k]))
            taken_below |= picks[j - first]  # the previous iteration's picks of earlier tokens
        iterations += 1  # this pass ran on the GPU too: it is how the warps learn nothing changed
        if new == picks:
            return iterations, fixed + picks
        picks = new


def deferred_acceptance_iterations(prefs: torch.Tensor, top_k: int, last: int) -> tuple[int, list[set[int]]]:
    """Tokens [0, last): synchronous proposal rounds until nobody proposes."""
    lists = [p.tolist() for p in prefs[:last]]
    holder: dict[int, int] = {}  # expert -> lowest token index holding it
    held, nxt, iterations = [0] * last, [0] * last, 0
    while True:
        proposals = []
        for j in range(last):
            want = top_k - held[j]
            proposals += [(j, e) for e in lists[j][nxt[j]:nxt[j] + want]]
            nxt[j] += want
        if not proposals:
            break
        iterations += 1
        for j, e in proposals:
            owner = holder.get(e)
            if owner is None or j < owner:
                holder[e] = j
                held[j] += 1
                if owner is not None:
                    held[owner] -= 1
    picks = [set() for _ in range(last)]
    for e, j in holder.items():
        picks[j].add(e)
    return iterations, picks


def percentiles(values: list[int]) -> str:
    v = sorted(values)
    return f"p50 {v[len(v) // 2]}  p90 {v[(9 * len(v)) // 10]}  max {v[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=256)
    ap.add_argument("--kind", choices=("randn", "biased"), default="randn",
                    help="biased: + a per-expert bias from -3 to 3, as trained routers often have")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    e, k = args.experts, args.top_k
    if e % k:
        raise SystemExit(f"--experts ({e}) must be a multiple of --top-k ({k}): rounds exist only then")
    tokens = e // k
    small_from = 0 if e <= 32 else -(-(e - 32) // k)  # the kernel's first token with <= 32 experts left
    half = min(16, small_from)
    gen = torch.Generator().manual_seed(args.seed)
    jac_half, jac_all, da_all = [], [], []
    for _ in range(args.rounds):
        scores = torch.randn(tokens, e, generator=gen)
        if args.kind == "biased":
            scores = scores + torch.linspace(-3, 3, e)
        prefs = round_preferences(scores.to(torch.bfloat16))
        truth = serial_picks(prefs, k)[:small_from]
        for out, fn in ((jac_half, lambda: jacobi_iterations(prefs, k, half, small_from)),
                        (jac_all, lambda: jacobi_iterations(prefs, k, 0, small_from)),
                        (da_all, lambda: deferred_acceptance_iterations(prefs, k, small_from))):
            iterations, picks = fn()
            if picks != truth:
                raise SystemExit("a parallel formulation disagreed with the sequential rule")
            out.append(iterations)
    print(f"E={e} k={k}, {args.rounds} rounds of {tokens} tokens, {args.kind} bf16 scores; "
          f"tokens 0..{small_from - 1} (the kernel's list phase); every result equals the sequential rule")
    print(f"  sequential chain:                       {small_from} dependent steps per round")
    print(f"  Jacobi, tokens {half}..{small_from - 1} after the first {half}: {percentiles(jac_half)} iterations")
    print(f"  Jacobi, tokens 0..{small_from - 1}:                   {percentiles(jac_all)} iterations")
    print(f"  deferred acceptance, tokens 0..{small_from - 1}:      {percentiles(da_all)} iterations")


if __name__ == "__main__":
    main()
