"""Fp8ExpertPath, the path of experts kept as FP8 blocks, on CPU through Triton's interpreter:
each dispatcher entry point (every slot local, some slots on other ranks, EP rows grouped or
unsorted) against the fp32 twin of the block-FP8 MoE (moe_reference_fp8)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from tests.kernels.support.interpret import run_source_in_interpreter  # noqa: E402

SOURCE = r"""
import json
import torch
from server.kernels.backend import KernelBackend
from server.moe.experts import LocalExperts
from server.moe.kernels.moe_reference_fp8 import (expert_rows_fp8_reference, fused_moe_fp8_reference,
                                                  quantize_weight_blocks)
from tests.kernels.support.checks import rel_err

torch.manual_seed(0)
E, H, I, first = 5, 160, 128, 10
results = {}
for path_name in ("triton", "triton_unsorted"):
    experts = LocalExperts(E, H, I, "silu", first_expert=first,
                           kernels=KernelBackend("triton", path_name, expert_weights="fp8"))
    with torch.no_grad():
        for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
            codes, scales = quantize_weight_blocks(torch.randn(shape) * shape[2] ** -0.5)
            getattr(experts, name).copy_(codes)
            getattr(experts, name + "_scale_inv").copy_(scales)
    w = (experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.down_proj, experts.down_proj_scale_inv)
    path = experts.path
    x = torch.randn(7, H)
    local = torch.stack([torch.randperm(E)[:2] for _ in range(7)]).to(torch.int32)  # [7, 2] local ids
    gates = torch.rand(7, 2)
    ref = fused_moe_fp8_reference(x, *w, local, gates)
    results[path_name + ".local_topk"] = rel_err(path.local_topk(experts, x, local + first, gates), ref)
    part = local.clone()
    part[::2, 1] = -1  # slots on other ranks
    ref = fused_moe_fp8_reference(x, *w, part, gates)
    results[path_name + ".partial_topk"] = rel_err(path.partial_topk(experts, x, part, gates), ref)
    ids = torch.tensor([3, 0, 3, 1, 4, 0, 3, 1, 1])  # rows in any order; expert 2 has none
    xr = torch.randn(len(ids), H)
    results[path_name + ".rows"] = rel_err(path.rows(experts, xr, ids), expert_rows_fp8_reference(xr, ids, *w))
    results[path_name + ".name"] = path.name
print(json.dumps(results))
"""


def test_fp8_expert_path_entry_points_match_twin() -> None:
    out = json.loads(run_source_in_interpreter(SOURCE, timeout_s=200).strip().splitlines()[-1])
    assert out.pop("triton.name") == "triton_fp8" and out.pop("triton_unsorted.name") == "triton_unsorted_fp8"
    assert len(out) == 6
    bad = {k: v for k, v in out.items() if not v <= 1e-4}
    assert not bad, bad
