"""Dispatch/combine: the variable-split all-to-all and the fixed-capacity all-gather paths equal
the local path (gloo, ep 1 to 4); no (token, expert) pair is lost at the worst case; local
experts and the router rules equal transformers' modules."""
from __future__ import annotations

import pytest
import torch

from server.moe.dispatch import LocalDispatcher, combine
from server.moe.experts import LocalExperts
from server.moe.router import softmax_topk
from tests.helpers.dispatch_worker import dispatch_rank, full_experts, gather_checks, make_inputs
from tests.helpers.ep_ranks import run_on_ranks

CASES = ["uneven", "one_rank_hot", "empty", "single", "all_to_rank0"]


def _dense(x, ids, weights, experts: LocalExperts) -> torch.Tensor:
    """Every expert on every token, then pick: the definition dispatch must reproduce."""
    outs = []
    for e in range(experts.num_local):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[e]))
    picked = torch.stack(outs)[ids.long(), torch.arange(x.shape[0])[:, None]]  # [N, k, H]
    return (picked * weights[..., None]).sum(1)


def test_local_dispatch_matches_dense():
    experts = full_experts(12)
    x, ids, weights = make_inputs("one_rank_hot", 0, 1, 12)
    x2, ids2, w2 = make_inputs("uneven", 2, 3, 12)
    for x, ids, w in ((x, ids, weights), (x2, ids2, w2)):
        assert torch.allclose(LocalDispatcher()(x, ids, w, experts), _dense(x, ids, w, experts), atol=1e-5)


def test_all_to_all_matches_local_on_three_ranks():
    """ep 3 (not a power of two), uneven token counts, a rank with no tokens, all traffic to one
    rank, every rank empty, a single token in the whole group."""
    results = run_on_ranks(dispatch_rank, 3, 12, CASES)
    for rank, errors in enumerate(results):
        for case, err in errors.items():
            assert err < 1e-6, f"rank {rank}, case {case}: max relative error {err}"


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_all_gather_matches_local(ep):
    """The fixed-capacity path at ep 1 (a size-1 gloo group: the forced EP path), 2 and 4:
      * rows agreed on by the ranks: uneven counts, idle ranks, all traffic to one rank, every
        rank empty, a single token in the group;
      * no (token, expert) pair is lost at the worst case: every slot of every token of every
        rank on rank 0's experts (ep * N * k pairs on one rank), with a common row count
        larger than any rank's tokens (16);
      * graph-style padding (valid=False rows inside the batch, rows beyond it): real rows equal
        the local path on the real rows alone, and nobody computes the padding."""
    for rank, result in enumerate(run_on_ranks(gather_checks, ep, CASES)):
        for check, err in result.items():
            assert err < 1e-6 if check != "padding_out" else err == 0.0, f"ep {ep}, rank {rank}, {check}: {err}"


def test_combine_sums_in_float32():
    out = torch.full((2 * 3, 4), 1.0, dtype=torch.bfloat16)
    weights = torch.tensor([[0.5, 0.25, 0.25], [1e-3, 1e-3, 1.0]], dtype=torch.float32)
    y = combine(out, weights, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y[0], torch.ones(4, dtype=torch.bfloat16))


def test_local_experts_match_transformers_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    hf = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.normal_()
        hf.down_proj.normal_()
    ours = LocalExperts(6, 16, 8, "silu")
    with torch.no_grad():
        ours.gate_up_proj.copy_(hf.gate_up_proj)
        ours.down_proj.copy_(hf.down_proj)
    x = torch.randn(9, 16)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    weights = torch.rand(9, 2)
    with torch.no_grad():
        want = hf(x, ids, weights)
        got = LocalDispatcher()(x, ids.to(torch.int32), weights, ours)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_router_rule_matches_transformers(family, dtype):
    from tests.helpers.hf_models import build_hf_model
    from server.model.families import get_family

    hf = build_hf_model(family).to(dtype)
    router = next(layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "experts"))
    fam = get_family(type(hf).__name__)
    renorm = bool(getattr(hf.config, "norm_topk_prob", True))
    x = torch.randn(11, hf.config.hidden_size).to(dtype)
    with torch.no_grad():
        logits, want_w, want_ids = router(x)
        got_w, got_ids = softmax_topk(logits, want_ids.shape[1], renormalize=renorm,
                                      float32_weights=fam.router_float32_weights)
    assert torch.equal(got_ids, want_ids)
    assert got_w.dtype == want_w.dtype
    assert torch.equal(got_w, want_w)


def test_unknown_or_misplaced_dispatcher_is_a_config_error():
    """Names come from the DISPATCHERS registry; the error lists the ones that exist."""
    from server.moe.dispatch import DISPATCHERS, DispatchConfigError, DispatchSettings, build_dispatcher

    with pytest.raises(DispatchConfigError, match=r"unknown parallel.dispatch 'deepep'; available: allgather, alltoall, auto, local"):
        build_dispatcher(DispatchSettings("deepep"), 0, 2, 8)
    with pytest.raises(DispatchConfigError, match="needs ep_size 1"):
        build_dispatcher(DispatchSettings("local"), 0, 2, 8)
    assert build_dispatcher(DispatchSettings("auto"), 0, 1, 8).name == "local"
    assert list(DISPATCHERS) == ["local", "allgather", "alltoall", "auto"]
