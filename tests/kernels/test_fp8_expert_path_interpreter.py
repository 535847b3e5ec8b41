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


QUANTIZED_SOURCE = r"""
import json
import torch
import torch.distributed as dist
from server.kernels.backend import KernelBackend
from server.moe.dispatch.all_gather import GatherDispatcher
from server.moe.dispatch.fp8_rows import Fp8TokenRows
from server.moe.experts import LocalExperts
from server.moe.kernels.moe_reference_fp8 import quantize_weight_blocks

torch.manual_seed(1)
E, H, I, T, K = 4, 256, 128, 6, 2
experts = LocalExperts(E, H, I, "silu", kernels=KernelBackend("triton", "triton", expert_weights="fp8"))
with torch.no_grad():
    for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
        codes, scales = quantize_weight_blocks(torch.randn(shape) * shape[2] ** -0.5)
        getattr(experts, name).copy_(codes)
        getattr(experts, name + "_scale_inv").copy_(scales)
path = experts.path
# rows whose quantisation is exact: every 128-channel group holds a +/-448 code and its scale is a
# power of two, so x = code * scale requantises to the same codes and scales bit for bit
codes = (torch.randn(T, H) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(T, H // 128, 128)
codes[:, :, 0] = torch.tensor(448.0).to(torch.float8_e4m3fn)
codes = codes.view(T, H)
scales = 2.0 ** torch.randint(-8, 0, (T, H // 128)).float()
x = (codes.float().view(T, -1, 128) * scales[:, :, None]).view(T, H)
ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
ids[::2, 1] = -1  # slots on other ranks
gates = torch.rand(T, K)
plain = path.partial_topk(experts, x, ids, gates)
direct = path.partial_topk_quantized(experts, codes, scales, ids, gates, torch.float32)
layout = Fp8TokenRows(H, torch.float32, K)
buf = layout.pack(x, ids, gates, T + 2)  # strided views of a wire buffer, two padding rows
codes_v, scales_v, _, _ = layout.fields(buf)
viewed = path.partial_topk_quantized(experts, codes_v[:T], scales_v[:T], ids, gates, torch.float32)
# the dispatcher at ep 1 over gloo: the FP8 experts take the wire's rows without a dequantise
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
used = []
original = path.partial_topk
path.partial_topk = lambda *a, **kw: used.append("dequantised") or original(*a, **kw)
out = GatherDispatcher(0, 1, E, wire="fp8")(x, ids.clamp(min=0), gates, experts)
full = original(experts, x, ids.clamp(min=0), gates)
print(json.dumps({"direct_equal": torch.equal(plain, direct), "viewed_equal": torch.equal(plain, viewed),
                  "dispatch_equal": torch.equal(out, full), "dequantised_calls": len(used)}))
"""


def test_quantized_rows_skip_the_first_quantisation_bit_for_bit() -> None:
    """The FP8 wire's codes and scales go straight into the FP8 GEMM: on rows whose quantisation
    is exact, the result is bit for bit the plain path's, also from strided views of the wire
    buffer, and GatherDispatcher on the fp8 wire takes that entry, not the dequantised one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = json.loads(run_source_in_interpreter(QUANTIZED_SOURCE.replace("{port}", str(port)),
                                               timeout_s=200).strip().splitlines()[-1])
    assert out == {"direct_equal": True, "viewed_equal": True, "dispatch_equal": True, "dequantised_calls": 0}, out
