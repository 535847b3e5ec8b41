"""DeepSeek-V3's router rule (sigmoid_group_topk) against transformers' DeepseekV3TopkRouter:
identical ids and weights over group layouts, with and without renormalisation, with a
correction bias strong enough to change which experts win."""
from __future__ import annotations

import pytest
import torch

from server.moe.router import ROUTER_RULES, sigmoid_group_topk

# (experts, groups, top groups, top-k): groups of 2..8 experts; one group only (Kimi-K2's layout)
LAYOUTS = [(8, 4, 2, 2), (12, 3, 2, 3), (16, 8, 4, 4), (16, 1, 1, 6), (32, 8, 3, 8)]


def _hf_router(num_experts, groups, top_groups, top_k, renorm, hidden=24, seed=0):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(hidden_size=hidden, n_routed_experts=num_experts, n_group=groups, topk_group=top_groups,
                           num_experts_per_tok=top_k, norm_topk_prob=renorm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.3)
    return router


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"E{e}-G{g}-tg{t}-k{k}" for e, g, t, k in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_sigmoid_rule_matches_transformers(layout, renorm, dtype):
    num_experts, groups, top_groups, top_k = layout
    router = _hf_router(num_experts, groups, top_groups, top_k, renorm)
    x = torch.randn(37, 24).to(dtype)
    with torch.no_grad():
        logits, want_w, want_ids = router(x)
        got_w, got_ids = ROUTER_RULES["sigmoid_group_topk"](
            logits, top_k, correction_bias=router.e_score_correction_bias, num_groups=groups,
            topk_groups=top_groups, renormalize=renorm, scaling_factor=2.5)
    assert logits.dtype == torch.float32  # transformers' gate runs in float32 whatever the model dtype
    assert torch.equal(got_ids, want_ids)
    assert got_w.dtype == want_w.dtype == torch.float32
    assert torch.equal(got_w, want_w)


def test_bias_steers_the_choice_but_not_the_weights():
    """A large bias on expert 5 makes every token pick it, yet its weight is its plain sigmoid score."""
    logits = torch.randn(10, 8)
    bias = torch.zeros(8)
    bias[5] = 100.0
    w, ids = sigmoid_group_topk(logits, 2, correction_bias=bias, num_groups=1, topk_groups=1, renormalize=False,
                                scaling_factor=1.0)
    assert (ids == 5).any(dim=1).all()
    pos = (ids == 5).float().argmax(dim=1)
    assert torch.allclose(w[torch.arange(10), pos], logits[:, 5].sigmoid())


def test_only_the_best_groups_compete():
    """Groups ranked by the sum of their top-2 scores: a group with one huge expert and one tiny one
    loses to a group of two good ones, so the huge expert is never picked."""
    logits = torch.full((1, 8), -6.0)  # 4 groups of 2
    logits[0, 0], logits[0, 1] = 6.0, -6.0  # group 0: 0.998 + 0.002
    logits[0, 2], logits[0, 3] = 1.5, 1.5  # group 1: 0.82 + 0.82
    _, ids = sigmoid_group_topk(logits, 2, correction_bias=torch.zeros(8), num_groups=4, topk_groups=1,
                                renormalize=True, scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [2, 3]


def test_empty_batch():
    w, ids = sigmoid_group_topk(torch.zeros(0, 16), 4, correction_bias=torch.zeros(16), num_groups=8, topk_groups=4,
                                renormalize=True, scaling_factor=2.5)
    assert w.shape == ids.shape == (0, 4)
