"""EPLB on the model at ep 2 and 4 over gloo: the same logits as without redundancy, the same
logical expert counts, better measured per-rank balance, and weights that move correctly in a
rebalance (logits unchanged after it)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from server.config import ModelConfig, ParallelConfig
from server.model.loader import load_model
from server.moe.eplb.build_stats import policy_expert_load
from server.moe.eplb.placement import ExpertPlacement
from server.moe.eplb.settings import resolve_eplb
from server.moe.eplb.stats import write_expert_load
from server.moe.routing import build_policy
from tests.helpers.ep_ranks import run_on_ranks
from tests.helpers.paged_driver import PagedDriver
from tests.helpers.scenario import make_scenario, run_scenario

VOCAB = 96  # tests/helpers/hf_models.py
LONG = 64  # tokens of each rank's long prefill: enough for the load figures to mean something


def skewed(ep_size: int):
    """All of one rank's experts hot: per-rank max/mean near `target` without EPLB."""
    return build_policy("skewed", mode="hot_ranks", hot_ranks=1, target={2: 1.8, 4: 3.0}[ep_size])


def _long_prefill(model, rank: int) -> torch.Tensor:
    tokens = [(7 * i + rank) % VOCAB for i in range(LONG)]
    return PagedDriver(model, num_blocks=32).step([(0, tokens)], token_offset=rank * LONG)[0]


def _rank(rank: int, ep_size: int, folder: str, stats: str, device: str = "cpu") -> dict:
    """device "cuda": rank r on cuda:r (the NCCL run of tests/eplb/test_eplb_gpu.py)."""
    group = dist.group.WORLD
    dev = f"cuda:{rank}" if device == "cuda" else device
    out = {}
    for key, parallel in (("block", None), ("eplb", ParallelConfig(ep_size=ep_size, redundant_experts=ep_size, eplb_stats=stats))):
        eplb = None if parallel is None else resolve_eplb(parallel, num_layers=2, num_experts=8, ep_size=ep_size)
        model = load_model(ModelConfig(path=folder), policy=skewed(ep_size), ep_rank=rank, ep_size=ep_size,
                           ep_group=group, eplb=eplb, device=dev)
        scenario = run_scenario(model, make_scenario(VOCAB), ep_size, rank)
        model.load_counters.reset()
        long = _long_prefill(model, rank)
        out[key] = (scenario, long, model.load_counters.snapshot(group))
    # Rebalance for the opposite load (expert 0 hot, then expert 7): weights must follow.
    reports = [model.eplb.rebalance(group, loads=[[50, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 50]]),
               model.eplb.rebalance(group, loads=[[1, 1, 1, 1, 1, 1, 1, 50], [50, 1, 1, 1, 1, 1, 1, 1]])]
    out["after"] = (run_scenario(model, make_scenario(VOCAB), ep_size, rank), _long_prefill(model, rank), reports,
                    model.placement)
    return out


def reversed_placement(placement: ExpertPlacement) -> ExpertPlacement:
    """Every layer's slots in reverse order: the same experts, each copy somewhere else."""
    return ExpertPlacement(placement.num_experts, placement.ep_size, tuple(tuple(reversed(s)) for s in placement.slots))


def test_forced_placement_at_ep1_moves_weights_and_keeps_logits() -> None:
    """A rebalance at ep 1 never moves anything (one rank is always balanced), so this forces a
    placement: every copy changes slot, and the logits stay those of the block layout."""
    prompts = [(0, list(b"The quick brown fox")), (1, list(b"jumps over")), (2, list(range(40, 100)))]
    base = load_model(ModelConfig(), policy=build_policy("natural"))
    eplb = resolve_eplb(ParallelConfig(redundant_experts=8), num_layers=4, num_experts=16, ep_size=1)
    placed = load_model(ModelConfig(), policy=build_policy("natural"), eplb=eplb)

    def logits(model):
        return torch.stack(list(PagedDriver(model, num_blocks=64, block_size=16).step(prompts).values()))

    want = logits(base)
    assert placed.eplb.rebalance(loads=[[100] + [1] * 15] * 4).layers_changed == 0
    old = placed.placement
    changed, moved, local = placed.eplb.apply(reversed_placement(old))
    assert (changed, moved) == (4, 0) and local > 0 and placed.placement.slots != old.slots
    torch.testing.assert_close(logits(placed), want, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    from tests.helpers.hf_models import build_hf_model, save_hf_model

    return save_hf_model(build_hf_model("qwen3_moe", seed=5), tmp_path_factory.mktemp("qwen3_eplb_model"))


@pytest.mark.parametrize("ep_size", [2, 4])
def test_eplb_keeps_logits_and_balances_ranks(qwen3_folder, tmp_path, ep_size) -> None:
    check_eplb_ranks(qwen3_folder, tmp_path, ep_size)


def check_eplb_ranks(folder, tmp_path, ep_size: int, device: str = "cpu", atol: float = 2e-5) -> None:
    loads = policy_expert_load(skewed(ep_size), num_layers=2, num_experts=8, top_k=2, ep_size=ep_size, tokens_per_rank=LONG)
    stats = write_expert_load(tmp_path / "stats.json", loads, source="skewed hot_ranks")
    backend = "nccl" if device == "cuda" else "gloo"
    results = run_on_ranks(_rank, ep_size, str(folder), str(stats), device, backend=backend)
    for rank, res in enumerate(results):
        (block_sc, block_long, block_snap), (eplb_sc, eplb_long, eplb_snap) = res["block"], res["eplb"]
        after_sc, after_long, reports, placement = res["after"]
        for key in block_sc:
            torch.testing.assert_close(eplb_sc[key], block_sc[key], rtol=0, atol=atol)
            torch.testing.assert_close(after_sc[key], block_sc[key], rtol=0, atol=atol)
        torch.testing.assert_close(eplb_long, block_long, rtol=0, atol=atol)
        torch.testing.assert_close(after_long, block_long, rtol=0, atol=atol)
        assert all(r.experts_moved > 0 for r in reports)  # both rebalances moved weights across ranks
        assert placement.slots[0].count(7) > 1 and placement.slots[1].count(0) > 1  # the last rebalance's hot experts
    _, _, block_snap = results[0]["block"]
    _, _, eplb_snap = results[0]["eplb"]
    assert eplb_snap.expert_tokens == block_snap.expert_tokens  # logical counts unchanged
    assert eplb_snap.physical_tokens is not None and len(eplb_snap.physical_tokens[0]) == 8 + ep_size
    assert [sum(r) for r in eplb_snap.rank_tokens()] == [sum(r) for r in block_snap.rank_tokens()]
    block_mm, eplb_mm = block_snap.rank_max_over_mean(), eplb_snap.rank_max_over_mean()
    assert min(block_mm) > 1.5, block_mm  # the skew is real
    # What the placement promises if each expert's tokens split evenly over its copies (at ep 4:
    # copies of 64, 64, 64, 64, 64, 64 and six of 21 tokens in 4 ranks of 3 slots -> 149 / 128),
    # and the replica choice delivers it.
    expected = ExpertPlacement.balanced(loads, num_experts=8, redundant=ep_size, ep_size=ep_size).rank_max_over_mean(loads)
    for measured, promised, natural in zip(eplb_mm, expected, block_mm):
        assert measured <= promised * 1.03 and measured < natural / 1.5, (block_mm, eplb_mm, expected)
