"""FP8 experts with EPLB on the GPU machine (pytest -m gpu tests/eplb/test_eplb_fp8_gpu.py): an
FP8 block checkpoint under model.quantization=auto with redundant experts keeps its experts
e4m3 and runs the block-FP8 MoE kernels; its logits stay within FP8 activation rounding of
the dequantised block-layout model's, before and after a forced re-placement moves codes and
scales under the model; and at ep 2 the byte rows of codes and scales cross GPUs over NCCL."""
from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig, ParallelConfig
from server.model.loader import load_model
from server.moe.eplb.settings import resolve_eplb
from server.moe.routing import build_policy
from tests.eplb.test_eplb_model import reversed_placement
from tests.helpers.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, save_fused_layout
from tests.helpers.paged_driver import PagedDriver

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [(0, list(b"The quick brown fox")), (1, list(b"jumps")), (2, list(range(40, 100)))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / a.norm()).item()


def test_fp8_experts_with_eplb_stay_close_to_dequantised_before_and_after_a_move(tmp_path) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 experts need compute capability 8.9+")
    hf = build_hf_model("qwen3_moe", seed=6, vocab_size=256, hidden_size=256, intermediate_size=256,
                        moe_intermediate_size=256)  # vocab 256: the prompts are bytes
    hf.config.architectures = [type(hf).__name__]
    save_fused_layout(hf, tmp_path / "values")
    write_fp8_checkpoint(tmp_path / "values", tmp_path / "fp8")
    policy = build_policy("round_robin_balanced")  # ignores router scores: no near-tie moves a token
    spec_layers, experts = 2, 8  # MoE layers and experts of tests/helpers/hf_models.py's qwen3_moe
    eplb = resolve_eplb(ParallelConfig(redundant_experts=4), num_layers=spec_layers, num_experts=experts, ep_size=1)
    fp8 = load_model(ModelConfig(path=str(tmp_path / "fp8"), dtype="bfloat16"), policy=policy, device="cuda",
                     eplb=eplb)
    ref = load_model(ModelConfig(path=str(tmp_path / "fp8"), dtype="bfloat16", quantization="dequantize"),
                     policy=build_policy("round_robin_balanced"), device="cuda")
    assert all(e.weight_format == "fp8" and e.num_local == experts + 4 for e in fp8.moe_experts())

    def logits(model):
        return torch.stack(list(PagedDriver(model, num_blocks=64, block_size=16).step(PROMPTS).values()))

    want, before = logits(ref), logits(fp8)
    assert torch.isfinite(before).all()
    # e4m3 activations: a few % per expert GEMM (estimate, as in tests/model/test_fp8_experts_gpu.py);
    # a slot whose scales did not follow its codes lands at O(1).
    assert _rel(want, before) < 0.1
    changed, moved, local = fp8.eplb.apply(reversed_placement(fp8.placement))
    assert changed == spec_layers and moved == 0 and local > 0
    after = logits(fp8)
    assert _rel(want, after) < 0.1 and _rel(before, after) < 0.02


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("fmt", ["fp8", "values"])
def test_fp8_expert_moves_over_nccl_ep2(fmt) -> None:
    from tests.eplb.test_eplb_fp8_moves import check_moves

    check_moves(2, fmt, device="cuda")
