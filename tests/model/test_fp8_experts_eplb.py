"""FP8 experts with EPLB at load time: every slot of a rank's start-up placement, redundant
copies included, holds its logical expert's e4m3 codes and block scales as the checkpoint
stores them (both expert layouts), and a forced re-placement keeps them together. EPLB is
no longer an input of the expert-format rule. The format is forced to "fp8" through
load_model's `kernels` (the rule keeps values on CPU)."""
from __future__ import annotations

import inspect

import pytest
import torch

from server.config import ModelConfig, ParallelConfig
from server.kernels.backend import KernelBackend
from server.model.expert_format import expert_weight_format
from server.model.loader import load_model
from server.moe.eplb.placement import ExpertPlacement
from server.moe.eplb.settings import resolve_eplb
from server.moe.eplb.stats import write_expert_load
from server.moe.routing import build_policy
from tests.helpers.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, save_fused_layout, save_hf_model

SIZES = dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=128)
LAYERS, EXPERTS = 2, 8  # MoE layers and experts of tests/helpers/hf_models.py's qwen3_moe
FP8 = KernelBackend("torch", expert_weights="fp8")
# hot experts differ per layer, so the copies land on different, non-consecutive experts
LOADS = [[40, 1, 1, 1, 1, 1, 30, 1], [1, 1, 1, 1, 1, 1, 1, 60]]


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8eplb")
    hf = build_hf_model("qwen3_moe", seed=7, **SIZES)
    hf.config.architectures = [type(hf).__name__]
    save_hf_model(hf, root / "per_expert_values")
    save_fused_layout(hf, root / "fused_values")
    for layout in ("per_expert", "fused"):
        write_fp8_checkpoint(root / f"{layout}_values", root / layout)
    write_expert_load(root / "stats.json", LOADS, source="hot experts per layer")
    return root


def _slot_state(experts, slot: int) -> list[torch.Tensor]:
    """Everything slot `slot` holds, as bytes (e4m3 codes compare exactly that way)."""
    return [p[slot].view(torch.uint8) for p in experts.slot_tensors()]


def _assert_slots_hold(model, ref) -> None:
    """Every slot of `model` (under its placement) equals its logical expert in `ref` (block layout)."""
    ref_experts = ref.moe_experts()
    for layer, experts in enumerate(model.moe_experts()):
        assert experts.weight_format == "fp8" and len(experts.slot_tensors()) == 4
        ids = model.local_expert_ids(layer)
        for slot, e in enumerate(ids):
            local = e - ref.local_expert_ids(layer)[0]
            for got, want in zip(_slot_state(experts, slot), _slot_state(ref_experts[layer], local)):
                assert torch.equal(got, want), (layer, slot, e)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("ep_size,rank", [(1, 0), (2, 1)])
def test_every_slot_and_replica_gets_its_experts_codes_and_scales(fp8_folders, layout, ep_size, rank) -> None:
    cfg = ModelConfig(path=str(fp8_folders / layout), dtype="float32")
    ref = load_model(cfg, policy=build_policy("natural"), kernels=FP8)  # ep 1, slot e = expert e
    parallel = ParallelConfig(ep_size=ep_size, redundant_experts=4, eplb_stats=str(fp8_folders / "stats.json"))
    eplb = resolve_eplb(parallel, num_layers=LAYERS, num_experts=EXPERTS, ep_size=ep_size)
    placed = load_model(cfg, policy=build_policy("natural"), ep_rank=rank, ep_size=ep_size, eplb=eplb, kernels=FP8)
    slots = placed.placement.slots
    assert all(len(s) == EXPERTS + 4 and len(set(s)) == EXPERTS for s in slots)  # replicas in every layer
    held = [placed.local_expert_ids(i) for i in range(LAYERS)]  # e.g. (0, 6, 6, 1, 2, 3) on rank 1 of 2
    assert all(len(set(ids)) < len(ids) for ids in held)  # this rank holds copies of a hot expert
    _assert_slots_hold(placed, ref)


def test_forced_replacement_keeps_codes_and_scales_together(fp8_folders) -> None:
    """At ep 1 every move is a copy between slots of the rank: scales must follow the codes."""
    cfg = ModelConfig(path=str(fp8_folders / "fused"), dtype="float32")
    ref = load_model(cfg, policy=build_policy("natural"), kernels=FP8)
    eplb = resolve_eplb(ParallelConfig(redundant_experts=4, eplb_stats=str(fp8_folders / "stats.json")),
                        num_layers=LAYERS, num_experts=EXPERTS, ep_size=1)
    placed = load_model(cfg, policy=build_policy("natural"), eplb=eplb, kernels=FP8)
    old = placed.placement
    new = ExpertPlacement(EXPERTS, 1, tuple(tuple(reversed(s)) for s in old.slots))
    changed, moved, local = placed.eplb.apply(new)
    assert (changed, moved) == (LAYERS, 0) and local > 0 and placed.placement.slots == new.slots
    _assert_slots_hold(placed, ref)


def test_eplb_is_not_an_input_of_the_expert_format_rule(fp8_folders) -> None:
    """FP8 experts are chosen with or without EPLB: the rule no longer takes it."""
    assert "eplb" not in inspect.signature(expert_weight_format).parameters
    from server.model.loader import read_model_spec

    spec = read_model_spec(ModelConfig(path=str(fp8_folders / "fused")))
    assert expert_weight_format(spec, "auto", KernelBackend("triton"), "cuda", (9, 0))[0] == "fp8"


def test_random_fp8_experts_give_every_copy_its_experts_codes_and_scales() -> None:
    """A model.shape with an FP8 quantization_config (benchmarks at real sizes, no checkpoint):
    each expert's codes and scales come from its own seeded stream, so copies match too."""
    shape = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 300, "hidden_size": 160, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
             "moe_intermediate_size": 128, "shared_expert_intermediate_size": 24, "num_experts": EXPERTS,
             "num_experts_per_tok": 2, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    cfg = ModelConfig(name="bench", shape=shape, dtype="float32")
    ref = load_model(cfg, policy=build_policy("natural"), kernels=FP8)
    eplb = resolve_eplb(ParallelConfig(redundant_experts=4), num_layers=2, num_experts=EXPERTS, ep_size=1)
    placed = load_model(cfg, policy=build_policy("natural"), eplb=eplb, kernels=FP8)
    assert all(len(set(s)) < len(s) for s in placed.placement.slots)
    _assert_slots_hold(placed, ref)
    scales = ref.moe_experts()[0].gate_up_proj_scale_inv  # [E, 2, 2]
    assert bool((scales > 0).all()) and not torch.equal(scales[0], scales[1])
