"""Several EP sizes from one spawn of ranks: ep_size e runs on ranks [0, e) over a process group
of its own, so an oracle at ep 2 and ep 4 pays for starting four processes once, not six.
Like oracle_worker.py, it imports no transformers, so spawned ranks start fast."""
from __future__ import annotations

import torch.distributed as dist

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.routing import build_policy

from .scenario import make_scenario, run_scenario


def nested_ep_rank(rank: int, world: int, ep_sizes: tuple[int, ...], cases: list[tuple]) -> dict:
    """cases: (key, checkpoint folder, policy name, vocab size) -> {ep: {key: (logits by (step, seq),
    expert_tokens, bytes held, bytes read)}} for every ep size this rank takes part in."""
    out: dict[int, dict] = {}
    for ep in ep_sizes:
        group = dist.group.WORLD if ep == world else dist.new_group(list(range(ep)))  # every rank must call new_group
        if rank < ep:
            out[ep] = {}
            for key, folder, policy, vocab in cases:
                model = load_model(ModelConfig(path=folder), policy=build_policy(policy), ep_rank=rank, ep_size=ep,
                                   ep_group=group)
                logits = run_scenario(model, make_scenario(vocab), ep, rank)
                counts = model.load_counters.snapshot(group=group).expert_tokens  # a collective of the group
                out[ep][key] = (logits, counts, model.expert_bytes_loaded, model.expert_bytes_read)
        dist.barrier()
    return out
