"""The what-if's expert timer under bench.expert_precision=fp8, on CPU through Triton's
interpreter: the call it times is the engine's Fp8ExpertPath on e4m3 experts, and computes the
block-FP8 MoE of its rows (checked against the fp32 twin, moe_reference_fp8), both for the
all-gather rows (slots of other ranks skipped) and the local layout, and on the fp8 wire, where
the timed call reads the wire's codes and scales as the engine's does. Timing FP8 kernels needs a
GPU (test_whatif_gpu.py); this pins what they are run on."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from tests.kernels.support.interpret import run_source_in_interpreter  # noqa: E402

SOURCE = r"""
import json
from dataclasses import replace
import torch
from server.bench.settings import BenchSettings
from server.bench.whatif.expert_timer import ExpertKernelTimer
from server.kernels.backend import KernelBackend
from server.model.loader import read_model_spec
from server.moe.kernels.moe_reference_fp8 import fused_moe_fp8_reference
from tests.kernels.support.checks import rel_err

spec = read_model_spec(BenchSettings.from_dict({"model": {"name": "tiny"}}).model)
spec = replace(spec, moe_intermediate_size=128)  # the FP8 kernels take whole 128-blocks of I
timer = ExpertKernelTimer(spec, 8, torch.device("cpu"), torch.float32, reps=1,
                          kernels=KernelBackend("triton", expert_weights="fp8"))
e = timer.experts
w = (e.gate_up_proj, e.gate_up_proj_scale_inv, e.down_proj, e.down_proj_scale_inv)
out = {"path": e.path.name, "dtype": str(e.gate_up_proj.dtype)}
for kind, local in (("allgather", [[0, 1], [2, -1], [-1, 3], [7, 5], [6, 6]]), ("local", [[4, 0], [1, 2], [3, 7]])):
    ids, call, graph = timer._prepared(kind, len(local))
    ids.copy_(torch.tensor(local, dtype=torch.int32))  # [T, k] as time() copies a layout's ids in
    gen = torch.Generator().manual_seed(len(local))  # the timer seeds its rows by their count
    x = torch.randn(len(local), spec.hidden_size, generator=gen)  # [T, H]
    gates = torch.full(ids.shape, 1.0 / spec.top_k)
    out[kind] = rel_err(call(), fused_moe_fp8_reference(x, *w, ids, gates))
# on the fp8 wire the gathered rows are the wire's codes and scales, read as they are
wired = ExpertKernelTimer(spec, 8, torch.device("cpu"), torch.float32, reps=1,
                          kernels=KernelBackend("triton", expert_weights="fp8"), wire="fp8")
e = wired.experts
w = (e.gate_up_proj, e.gate_up_proj_scale_inv, e.down_proj, e.down_proj_scale_inv)
e.path.partial_topk = None  # the dequantised entry must not be taken
local = [[0, 1], [2, -1], [-1, 3], [7, 5], [6, 6]]
ids, call, graph = wired._prepared("allgather", len(local))
ids.copy_(torch.tensor(local, dtype=torch.int32))
x = torch.randn(len(local), spec.hidden_size, generator=torch.Generator().manual_seed(len(local)))
out["allgather_fp8_wire"] = rel_err(call(), fused_moe_fp8_reference(x, *w, ids, torch.full(ids.shape, 1.0 / spec.top_k)))
print(json.dumps(out))
"""


def test_timed_call_is_the_engine_fp8_path_on_fp8_experts() -> None:
    out = json.loads(run_source_in_interpreter(SOURCE, timeout_s=200).strip().splitlines()[-1])
    assert out["path"] == "triton_fp8" and out["dtype"] == "torch.float8_e4m3fn"
    assert out["allgather"] <= 1e-4 and out["local"] <= 1e-4 and out["allgather_fp8_wire"] <= 1e-4, out
