"""PolicyProbe: runs a routing policy inside our model as if on one rank of an EP group, and
measures what it does.

Why a wrapper: the evaluation runs the whole model in one process (ep_size 1, every expert
local), but a policy's behaviour depends on the EP group (round_robin_balanced staggers
ranks, greedy_balanced balances each rank's own tokens). The probe hands the policy the
context of a simulated rank (`sim_rank` of `ep_size`, set by the driver before each rank's
forward) and counts, on the device and without host syncs:
  * loads of the rewritten ids (ExpertLoadCounters at the simulated ep_size), over the run
    and per step;
  * loads of the router's own choice (natural), for reference;
  * kept pairs: (token, expert) pairs of the router's top-k that survive the policy;
  * the balanced ceiling: in a call of n tokens an expert of a balanced assignment (loads
    within ±1) takes at most ceil(n*k/E) tokens, so at most sum_e min(natural load_e,
    ceil(n*k/E)) of the router's pairs can survive. It bounds every balanced policy's fidelity;
  * the walk ceiling: LightLLM's rule (greedy_balanced) keeps loads within ±1 at every prefix
    of the token walk, so each super-round of T = lcm(E, k)/k consecutive tokens gives every
    expert exactly lcm(E, k)/E slots; summing min(natural count, that) per round bounds what
    any rule with that invariant can keep;
  * with `exact=True`, for policies that solve a capacitated top-k (optimal_balanced,
    rank_balanced): the exact optimum of the same call (an LP, exact_assignment.py), its
    objective and fidelity beside the policy's (host work: the evaluation is CPU anyway).
"""
from __future__ import annotations

from math import lcm

import torch

from ..moe.load_stats import ExpertLoadCounters, ExpertLoadSnapshot
from ..moe.routing import RoutingContext, RoutingPolicy


def walk_ceiling(natural: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """natural [N, k] -> 0-d: sum over super-rounds and experts of min(count, lcm(E, k)/E)."""
    per_round = lcm(num_experts, top_k) // top_k  # tokens per super-round
    slots = lcm(num_experts, top_k) // num_experts  # slots of each expert per super-round
    n = natural.shape[0]
    rounds = -(-n // per_round)
    round_of = torch.arange(n, device=natural.device).repeat_interleave(top_k) // per_round  # [N*k]
    counts = torch.zeros(rounds * num_experts, dtype=torch.int64, device=natural.device)  # [R*E]
    counts.index_add_(0, round_of * num_experts + natural.reshape(-1).long(), torch.ones_like(round_of))
    return counts.clamp(max=slots).sum()


class PolicyProbe(RoutingPolicy):
    def __init__(self, inner: RoutingPolicy, *, num_layers: int, num_experts: int, top_k: int, ep_size: int,
                 exact: bool = False) -> None:
        super().__init__(weights=inner.weights, seed=inner.seed)
        self.inner, self.ep_size, self.top_k = inner, ep_size, top_k
        self.name = inner.name
        self.wants_selection_scores = inner.wants_selection_scores  # the layer then hands selection scores
        self.sim_rank = 0
        self.loads = ExpertLoadCounters(num_layers, num_experts, ep_size)  # the policy's ids, whole run
        self.step_loads = ExpertLoadCounters(num_layers, num_experts, ep_size)  # the same, current step
        self.natural_loads = ExpertLoadCounters(num_layers, num_experts, ep_size)  # the router's ids
        self.kept = torch.zeros(num_layers, dtype=torch.int64)  # [L] natural pairs kept
        self.ceiling = torch.zeros(num_layers, dtype=torch.int64)  # [L] most pairs a balanced assignment keeps
        self.walk_ceiling = torch.zeros(num_layers, dtype=torch.int64)  # [L] the same under LightLLM's invariant
        self.step_snapshots: list[ExpertLoadSnapshot] = []
        self.exact = exact and hasattr(inner, "capacities")
        self.objective = {"policy": 0.0, "optimum": 0.0, "natural": 0.0, "optimum_kept": 0}

    def __call__(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext):
        sim = RoutingContext(layer=ctx.layer, num_experts=ctx.num_experts, top_k=ctx.top_k, ep_rank=self.sim_rank,
                             ep_size=self.ep_size, token_offset=ctx.token_offset, seed=ctx.seed,
                             router_groups=ctx.router_groups, router_topk_groups=ctx.router_topk_groups)
        ids, weights = self.inner(topk_ids, topk_weights, router_logits, sim)  # [N, k] each
        natural = topk_ids.to(torch.int32)  # [N, k]
        self.loads.record(ctx.layer, ids)
        self.step_loads.record(ctx.layer, ids)
        self.natural_loads.record(ctx.layer, natural)
        self.kept[ctx.layer] += (ids[:, :, None] == natural[:, None, :]).any(-1).sum()  # [N, k] -> pairs kept
        n = natural.shape[0]
        counts = torch.zeros(ctx.num_experts, dtype=torch.int64, device=natural.device)  # [E]
        counts.index_add_(0, natural.reshape(-1).long(), torch.ones(n * ctx.top_k, dtype=torch.int64, device=natural.device))
        self.ceiling[ctx.layer] += counts.clamp(max=-(-n * ctx.top_k // ctx.num_experts)).sum()
        self.walk_ceiling[ctx.layer] += walk_ceiling(natural, ctx.num_experts, ctx.top_k)
        if self.exact and n:
            self._tally_optimum(topk_ids, router_logits, ids, sim)
        return ids, weights

    def _tally_optimum(self, topk_ids, router_logits, ids, ctx: RoutingContext) -> None:
        from .exact_assignment import exact_capacitated_topk

        scores = self.inner.objective_scores(topk_ids, router_logits).float().cpu()  # [N, E]
        n, k = topk_ids.shape
        caps = self.inner.capacities(n, ctx)
        bins = ctx.num_experts // caps.width
        low, high = (n * k // bins, -(-n * k // bins)) if caps.exact else (0, caps.ceiling)
        best = exact_capacitated_topk(scores, k, caps.width, low, high, caps.expert_ceiling)  # [N, E] bool
        natural = torch.zeros_like(best).scatter_(1, topk_ids.long().cpu(), True)  # [N, E]
        self.objective["policy"] += float(scores.gather(1, ids.long().cpu()).sum())
        self.objective["optimum"] += float(scores[best].sum())
        self.objective["natural"] += float(scores[natural].sum())
        self.objective["optimum_kept"] += int((best & natural).sum())

    def optimum_summary(self) -> dict | None:
        """The exact optimum beside the policy: its fidelity, and the policy's shortfall below it as
        a fraction of what balance costs the objective (natural - optimum); None without `exact`."""
        if not self.exact:
            return None
        pairs = max(1, int(self.natural_loads.tokens.sum()) * self.top_k)
        cost = self.objective["natural"] - self.objective["optimum"]
        gap = (self.objective["optimum"] - self.objective["policy"]) / cost if cost > 0 else 0.0
        return {"optimum_fidelity": self.objective["optimum_kept"] / pairs,
                "objective_gap": 0.0 if abs(gap) < 1e-6 else gap,  # float32 sums: below 1e-6 is rounding
                "objective_per_pair": self.objective["policy"] / pairs,
                "optimum_objective_per_pair": self.objective["optimum"] / pairs}

    def end_step(self) -> None:
        """Close a step (every simulated rank has run): keep its loads, start the next."""
        self.step_snapshots.append(self.step_loads.snapshot(reset=True))

    def fidelity(self) -> tuple[float, list[float]]:
        """Fraction of natural (token, expert) pairs kept: overall and per layer."""
        tokens = self.natural_loads.tokens  # [L]
        per_layer = (self.kept.double() / (tokens * self.top_k).clamp(min=1).double()).tolist()
        return float(self.kept.sum()) / max(1, int(tokens.sum()) * self.top_k), per_layer

    def balanced_fidelity_ceiling(self) -> float:
        """The most of the router's pairs any per-call balanced assignment could keep."""
        return float(self.ceiling.sum()) / max(1, int(self.natural_loads.tokens.sum()) * self.top_k)

    def walk_fidelity_ceiling(self) -> float:
        """The most of the router's pairs a rule balanced at every prefix (LightLLM's) could keep."""
        return float(self.walk_ceiling.sum()) / max(1, int(self.natural_loads.tokens.sum()) * self.top_k)

    def step_expert_max_over_mean(self) -> float:
        """Per-expert max/mean within each step (what sets that step's slowest expert), averaged
        over steps and layers."""
        values = [v for snap in self.step_snapshots for v in snap.expert_max_over_mean()]
        return sum(values) / len(values) if values else 0.0
