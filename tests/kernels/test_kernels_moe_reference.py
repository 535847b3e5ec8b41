"""Torch twins of the MoE kernels (the CPU path) against a per-token loop, configs, the front door."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from server.moe.kernels import moe_config, ops
from tests.kernels.support.checks import make_moe_routing, make_moe_weights, rel_err
from server.moe.kernels.moe_reference import (
    grouped_expert_mlp_grouped_mm,
    grouped_expert_mlp_reference,
    moe_grouped_mm,
    moe_reference,
)


def per_token_moe(x, w13, w2, ids, weights):
    """Independent oracle: one token, one slot at a time, float64."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = w13[e].double() @ x[t].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            out[t] += float(weights[t, j]) * (w2[e].double() @ h)
    return out


@pytest.mark.parametrize("skip_frac", [0.0, 0.3])
def test_moe_reference_matches_per_token_loop(skip_frac: float) -> None:
    w13, w2 = make_moe_weights(6, 32, 24, torch.float64, "cpu", seed=3)
    x, ids, w = make_moe_routing(11, 32, 6, 3, torch.float64, "cpu", seed=4, skip_frac=skip_frac)
    ids[0] = -1  # a token with no local expert gets zeros
    got = moe_reference(x, w13, w2, ids, w)
    want = per_token_moe(x, w13, w2, ids, w)
    assert rel_err(got, want) < 1e-12
    assert torch.all(got[0] == 0)


def test_moe_reference_bf16_close_to_float64() -> None:
    w13, w2 = make_moe_weights(8, 64, 32, torch.bfloat16, "cpu", seed=5)
    x, ids, w = make_moe_routing(16, 64, 8, 2, torch.bfloat16, "cpu", seed=6)
    got = moe_reference(x, w13, w2, ids, w)
    want = moe_reference(x.double(), w13.double(), w2.double(), ids, w.double())
    assert got.dtype == torch.bfloat16 and 1e-4 < rel_err(got, want) < 1e-2


def test_grouped_mm_alternative_matches_reference() -> None:
    w13, w2 = make_moe_weights(5, 32, 16, torch.float32, "cpu", seed=7)
    x, ids, w = make_moe_routing(9, 32, 5, 2, torch.float32, "cpu", seed=8, skip_frac=0.25)
    try:
        got = moe_grouped_mm(x, w13, w2, ids, w)
    except (RuntimeError, NotImplementedError) as exc:  # older CPU builds lack grouped_mm
        pytest.skip(f"torch._grouped_mm unavailable on CPU here: {exc}")
    assert rel_err(got, moe_reference(x.double(), w13.double(), w2.double(), ids, w.double())) < 1e-5


def test_grouped_expert_mlp_reference_and_grouped_mm() -> None:
    w13, w2 = make_moe_weights(4, 32, 16, torch.float64, "cpu", seed=9)
    counts = [3, 0, 5, 2]
    offsets = torch.tensor([0, 3, 3, 8, 10])
    x = torch.randn(10, 32, dtype=torch.float64)
    got = grouped_expert_mlp_reference(x, offsets, w13, w2)
    ids = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)])[:, None]  # [10, 1]
    want = per_token_moe(x, w13, w2, ids, torch.ones(10, 1))
    assert rel_err(got, want) < 1e-12
    try:
        alt = grouped_expert_mlp_grouped_mm(x.float(), offsets, w13.float(), w2.float())
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._grouped_mm unavailable on CPU here: {exc}")
    assert rel_err(alt, want) < 1e-5


def test_bad_inputs_are_named() -> None:
    w13, w2 = make_moe_weights(4, 16, 8, torch.float32, "cpu")
    x, ids, w = make_moe_routing(3, 16, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="local expert ids"):
        moe_reference(x, w13, w2, ids + 4, w)
    with pytest.raises(ValueError, match="w13"):
        moe_reference(x, w13[:, :-1], w2, ids, w)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_reference(x, w13, w2, ids, w[:, :1])
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_expert_mlp_reference(x, torch.tensor([0, 2, 1, 3, 3]), w13, w2)
    with pytest.raises(ValueError, match="E_local"):
        grouped_expert_mlp_reference(x, torch.tensor([0, 3]), w13, w2)


def test_front_door_uses_torch_on_cpu(monkeypatch) -> None:
    w13, w2 = make_moe_weights(4, 16, 8, torch.float32, "cpu")
    x, ids, w = make_moe_routing(5, 16, 4, 2, torch.float32, "cpu")
    assert ops.implementation("fused_moe", "auto", x) is moe_reference
    assert torch.equal(ops.fused_moe(x, w13, w2, ids, w), moe_reference(x, w13, w2, ids, w))
    with pytest.raises(ValueError, match="unknown backend 'cutlass'"):
        ops.fused_moe(x, w13, w2, ids, w, backend="cutlass")
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "grouped_mm")
    assert ops.implementation("fused_moe", "auto", x) is moe_grouped_mm


def test_config_json_roundtrip_and_buckets(tmp_path) -> None:
    cfg = moe_config.default_config(1024, 128, torch.bfloat16)
    path = tmp_path / "dev_E128_H2048_I768.json"
    table = {"meta": {"top_k": 8}, "1": moe_config.default_config(8, 128, torch.bfloat16).to_json(), "512": cfg.to_json()}
    path.write_text(json.dumps(table))
    top_k, loaded = moe_config._load_table(str(path))
    assert top_k == 8 and loaded[512] == cfg
    assert moe_config.nearest_bucket(loaded, 300) == cfg  # log2(300) is nearer 512 than 1
    assert moe_config.nearest_bucket(loaded, 2) == loaded[1]
    bad = dict(cfg.to_json(), BLOCK_M=24)
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        moe_config.MoEConfig.from_json(bad)
    with pytest.raises(ValueError, match="bad MoE kernel config"):
        moe_config.MoEConfig.from_json({"BLOCK_M": 16})


def test_default_config_grows_with_rows_per_expert() -> None:
    small = moe_config.default_config(8, 128, torch.bfloat16)
    large = moe_config.default_config(65536, 128, torch.bfloat16)
    assert small.BLOCK_M == 16 and large.BLOCK_M == 128
    assert moe_config.get_moe_config(128, 2048, 768, 8, torch.float32).gate_up.BLOCK_K <= 32  # fp32 fits smem
