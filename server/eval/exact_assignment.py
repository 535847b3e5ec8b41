"""The exact optimum of a capacitated top-k, by linear programming (scipy, CPU): the yardstick
for optimal_balanced and rank_balanced.

Variables x[i, e] in [0, 1]; each token's row sums to k; the pairs of each bin of `width`
consecutive experts lie in [low, high]; maximise sum(scores * x). The constraint matrix is an
interval matrix (token rows, bin columns), hence totally unimodular, so a simplex vertex is an
integral assignment: the exact optimum, with k distinct experts per token. scipy is a
development dependency (the `dev` extra); nothing on the serving path imports this module.
"""
from __future__ import annotations

import numpy as np
import torch


def exact_capacitated_topk(scores: torch.Tensor, top_k: int, width: int, low: int, high: int,
                           expert_high: int | None = None) -> torch.Tensor:
    """scores [n, E] -> [n, E] bool: an optimal assignment (every bin in [low, high], every
    expert at most `expert_high` when given). Raises RuntimeError if the LP is infeasible."""
    import scipy.sparse as sparse
    from scipy.optimize import linprog

    n, num_experts = scores.shape
    bins = num_experts // width
    token_rows = sparse.kron(sparse.eye(n), np.ones((1, num_experts)))  # [n, n*E]
    member = sparse.csr_matrix((np.ones(num_experts), (np.arange(num_experts) // width, np.arange(num_experts))),
                               shape=(bins, num_experts))  # [B, E]
    bin_rows = sparse.kron(np.ones((1, n)), member)  # [B, n*E]
    upper = [bin_rows, -bin_rows]
    bounds = [np.full(bins, high), np.full(bins, -low)]
    if expert_high is not None:
        upper.append(sparse.kron(np.ones((1, n)), sparse.eye(num_experts)))  # [E, n*E]
        bounds.append(np.full(num_experts, expert_high))
    result = linprog(-scores.double().numpy().reshape(-1), A_ub=sparse.vstack(upper).tocsr(), b_ub=np.concatenate(bounds),
                     A_eq=token_rows.tocsr(), b_eq=np.full(n, top_k), bounds=(0, 1), method="highs-ds")
    if result.status != 0:
        raise RuntimeError(f"exact capacitated top-k: {result.message}")
    x = result.x.reshape(n, num_experts)
    if np.abs(x - np.round(x)).max() > 1e-6:
        raise RuntimeError("exact capacitated top-k: the LP returned a fractional vertex")
    return torch.from_numpy(x > 0.5)


def exact_balanced_experts(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """optimal_balanced's problem: every expert floor or ceil of n*k/E."""
    n, num_experts = scores.shape
    low = n * top_k // num_experts
    return exact_capacitated_topk(scores, top_k, 1, low, -(-n * top_k // num_experts))


def exact_balanced_ranks(scores: torch.Tensor, top_k: int, ep_size: int, ceiling: int | None = None,
                         expert_high: int | None = None) -> torch.Tensor:
    """rank_balanced's problem: every rank floor or ceil of n*k/ep_size (or at most `ceiling`)."""
    n, num_experts = scores.shape
    pairs = n * top_k
    low, high = (pairs // ep_size, -(-pairs // ep_size)) if ceiling is None else (0, ceiling)
    return exact_capacitated_topk(scores, top_k, num_experts // ep_size, low, high, expert_high)
