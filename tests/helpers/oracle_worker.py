"""What each EP rank runs in the oracle tests: load its shard of each case's checkpoint, drive
its share of the scenario (DP attention), and report logits plus the EP-reduced load counts."""
from __future__ import annotations

import torch.distributed as dist

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.dispatch import DispatchSettings
from server.moe.routing import build_policy

from .scenario import make_scenario, run_scenario


def oracle_rank(rank: int, ep_size: int, cases: list[tuple], device: str = "cpu") -> dict:
    """cases: (key, checkpoint folder, policy name, vocab size[, parallel.dispatch name]) ->
    {key: (logits, expert_tokens, bytes held, bytes read)}. device "cuda" puts rank r on cuda:r (NCCL)."""
    out = {}
    dev = f"cuda:{rank}" if device == "cuda" else device
    for key, folder, policy, vocab, *dispatch in cases:
        settings = DispatchSettings(*dispatch)  # default: auto
        model = load_model(ModelConfig(path=folder), policy=build_policy(policy), ep_rank=rank, ep_size=ep_size,
                           device=dev, dispatch=settings)
        if dispatch:  # the path the key names really ran
            assert model.dispatcher.name == settings.name, (model.dispatcher.name, settings.name)
        logits = run_scenario(model, make_scenario(vocab), ep_size, rank)
        snapshot = model.load_counters.snapshot(group=dist.group.WORLD)  # a collective: every rank calls it
        out[key] = (logits, snapshot.expert_tokens, model.expert_bytes_loaded, model.expert_bytes_read)
    return out
