"""Replicate-then-pack expert placement for one MoE layer (DeepSeek's EPLB, our implementation).

Given each logical expert's load, choose which experts get extra copies and which rank holds
each copy, so that the busiest rank does as little as possible. Three steps:

  1. replicate: start with one copy per expert; each redundant slot goes to the expert whose
     load per copy is currently highest (ties: lowest expert id). That greedily minimises
     the largest per-copy load.
  2. pack: copies (each carrying load / copies of its expert) are dealt to ranks, heaviest
     first, each to the lightest rank that still has a free slot (ties: lowest rank). Every
     rank ends with the same number of slots.
  3. hierarchical variant: first pack whole expert *groups* onto nodes (same greedy), then
     run 1 and 2 inside each node, so a token's group-limited experts stay on one node. The
     global variant is the hierarchical one with one group and one node.

Everything here is plain Python on one layer's list of loads: deterministic (same input,
same placement on every rank, no floating-point reductions whose order could vary), and a
few milliseconds per layer at E=256.
"""
from __future__ import annotations

import heapq
from typing import Sequence


def replicate(loads: Sequence[float], num_slots: int) -> list[int]:
    """Loads [E] -> slot_expert [num_slots]: slots 0..E-1 hold experts 0..E-1, each further
    slot a copy of the expert with the highest load per copy at the time it is added."""
    num_experts = len(loads)
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    counts = [1] * num_experts
    slot_expert = list(range(num_experts))
    # Max-heap on load per copy; equal keys pop the lowest expert id first.
    heap = [(-float(w), e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        slot_expert.append(e)
        counts[e] += 1
        heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return slot_expert


def balanced_packing(weights: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Items [n] -> (pack [n], position in pack [n]); every pack gets n / num_packs items.

    Heaviest item first (ties: lower index first), each into the lightest pack that still
    has room (ties: lowest pack index); an item's position is its arrival order in its pack.
    """
    n = len(weights)
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items cannot be split evenly into {num_packs} packs")
    per_pack = n // num_packs
    pack_of, position = [0] * n, [0] * n
    if per_pack == 1:
        return list(range(n)), position
    order = sorted(range(n), key=lambda i: -float(weights[i]))  # stable: ties keep index order
    pack_load, pack_items = [0.0] * num_packs, [0] * num_packs
    for item in order:
        best = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_load.__getitem__)
        pack_of[item], position[item] = best, pack_items[best]
        pack_load[best] += float(weights[item])
        pack_items[best] += 1
    return pack_of, position


def _arrange(pack_of: list[int], position: list[int], per_pack: int) -> list[int]:
    """Inverse of (pack, position): laid-out index -> item."""
    out = [0] * len(pack_of)
    for item, (p, pos) in enumerate(zip(pack_of, position)):
        out[p * per_pack + pos] = item
    return out


def place_hierarchical(loads: Sequence[float], num_slots: int, num_ranks: int, num_groups: int, num_nodes: int) -> list[int]:
    """One layer's placement: physical slot -> logical expert [num_slots]. Slot q lives on
    rank q // (num_slots / num_ranks); ranks n*R/N .. (n+1)*R/N - 1 form node n."""
    num_experts = len(loads)
    if num_experts % num_groups or num_groups % num_nodes or num_ranks % num_nodes or num_slots % num_ranks:
        raise ValueError(
            f"hierarchical placement needs groups | experts, nodes | groups, nodes | ranks and ranks | slots; "
            f"got experts={num_experts}, groups={num_groups}, nodes={num_nodes}, ranks={num_ranks}, slots={num_slots}"
        )
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_slots // num_nodes
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_slots // num_ranks

    # 1. whole groups onto nodes; node n's experts become the contiguous "node order" block n.
    group_loads = [sum(loads[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    group_node, group_pos = balanced_packing(group_loads, num_nodes)
    node_order = [0] * num_experts  # node-ordered index -> logical expert
    for g in range(num_groups):
        first = (group_node[g] * (num_groups // num_nodes) + group_pos[g]) * group_size
        for offset in range(group_size):
            node_order[first + offset] = g * group_size + offset

    placement: list[int] = []
    for node in range(num_nodes):
        experts = node_order[node * experts_per_node:(node + 1) * experts_per_node]
        node_loads = [loads[e] for e in experts]
        # 2. copies of this node's experts, inside the node.
        slot_expert = replicate(node_loads, slots_per_node)  # indices into `experts`
        counts = [0] * len(experts)
        for e in slot_expert:
            counts[e] += 1
        # 3. copies onto the node's ranks, each carrying an even share of its expert's load.
        copy_loads = [node_loads[e] / counts[e] for e in slot_expert]
        rank_of, pos = balanced_packing(copy_loads, ranks_per_node)
        laid_out = _arrange(rank_of, pos, slots_per_rank)
        placement.extend(experts[slot_expert[c]] for c in laid_out)
    return placement


def place_global(loads: Sequence[float], num_slots: int, num_ranks: int) -> list[int]:
    """Replicate over the whole EP group, then pack onto ranks (no node structure)."""
    return place_hierarchical(loads, num_slots, num_ranks, num_groups=1, num_nodes=1)


POLICIES = ("auto", "global", "hierarchical")


def place_layer(loads: Sequence[float], num_slots: int, num_ranks: int, policy: str = "auto",
                num_groups: int = 1, num_nodes: int = 1) -> list[int]:
    """`auto` follows the published rule: hierarchical when the nodes divide the expert groups
    (group-limited routing can then stay inside a node), global otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"placement policy must be one of {POLICIES}, got {policy!r}")
    if policy == "hierarchical" or (policy == "auto" and num_groups % num_nodes == 0):
        return place_hierarchical(loads, num_slots, num_ranks, num_groups, num_nodes)
    return place_global(loads, num_slots, num_ranks)
