"""FP8 block-quantised checkpoints served as shipped, against transformers on their dequantised
float32 weights, at ep_size 1, 2 and 4 (CPU, gloo).

Tiny Qwen3-MoE and DeepSeek-V3 models are quantised with 128 x 128 blocks by the test's own
quantiser (tests/helpers/fp8_checkpoint.py). hidden 160, dense intermediate 136 and expert
intermediate 144 give weights of 2 x 2 blocks with partial last rows and columns, next to
single partial blocks (k/v, the MLA latents). Each model keeps some modules unquantised through
modules_to_not_convert. One spawn of four ranks serves both families at ep 2 (ranks 0-1, a
group of their own) and ep 4.
"""
from __future__ import annotations

import math

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import read_model_spec
from tests.helpers.ep_ranks import run_on_ranks
from tests.helpers.fp8_checkpoint import BLOCK, dequantized_hf_model, write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, hf_sequence_logits, save_hf_model
from tests.helpers.nested_ep_worker import nested_ep_rank
from tests.helpers.oracle_worker import oracle_rank
from tests.helpers.scenario import expected_positions, full_sequences, make_scenario

ATOL = 1e-4
VOCAB = 96
SIZES = dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=144)
KEEP = {"qwen3_moe": ("lm_head", "model.layers.2.self_attn"), "deepseek_v3": ("lm_head", "kv_b_proj")}


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """family -> (FP8 folder, {(step, seq): reference logits}, the original model's logits likewise)."""
    scenario = make_scenario(VOCAB)
    positions = expected_positions(scenario)
    out = {}
    for seed, (family, keep) in enumerate(KEEP.items()):
        root = tmp_path_factory.mktemp(family)
        hf = build_hf_model(family, seed=seed, **SIZES)
        save_hf_model(hf, root / "values")
        values = write_fp8_checkpoint(root / "values", root / "fp8", keep)
        reference = dequantized_hf_model(root / "values", values, root / "dequantised")
        logits = {}
        for model in (reference, hf):
            per_seq = {sid: hf_sequence_logits(model, toks) for sid, toks in full_sequences(scenario).items()}
            logits[model] = {key: per_seq[key[1]][pos] for key, pos in positions.items()}
        out[family] = (str(root / "fp8"), logits[reference], logits[hf])
    return out


@pytest.fixture(scope="module")
def ep_runs(fp8_models):
    """ep -> per-rank {family: (logits, expert_tokens, bytes held, bytes read)} (routing natural, dispatch auto)."""
    cases = [(family, folder, "natural", VOCAB) for family, (folder, _, _) in fp8_models.items()]
    cache: dict[int, list[dict]] = {}

    def get(ep: int) -> list[dict]:
        if ep == 1 and 1 not in cache:  # in-process, on one thread like a spawned rank
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cache[1] = [oracle_rank(0, 1, cases)]
            finally:
                torch.set_num_threads(threads)
        if ep > 1 and ep not in cache:
            ranks = run_on_ranks(nested_ep_rank, 4, (2, 4), cases)
            cache.update({e: [r[e] for r in ranks if e in r] for e in (2, 4)})
        return cache[ep]

    return get


def _max_err(got: dict, want: dict) -> float:
    assert set(got) == set(want), f"steps/sequences differ: {sorted(set(got) ^ set(want))}"
    return max((got[k] - want[k]).abs().max().item() for k in want)


@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("family", list(KEEP))
def test_fp8_checkpoint_matches_transformers_on_dequantised_weights(family, ep, ep_runs, fp8_models):
    _, reference, original = fp8_models[family]
    logits = {}
    ranks = ep_runs(ep)
    assert len(ranks) == ep
    for rank_result in ranks:
        logits.update(rank_result[family][0])
    assert all(r[family][1] == ranks[0][family][1] for r in ranks), "ranks disagree on the reduced load counters"
    assert _max_err(logits, reference) < ATOL
    # FP8 rounding moved the logits far beyond the tolerance: the match above is the dequantisation's
    assert _max_err(original, reference) > 100 * ATOL


@pytest.mark.parametrize("ep", [2, 4])
def test_each_rank_reads_only_its_experts_codes_and_scales(ep, ep_runs, fp8_models):
    """One byte per expert weight and four per block scale, for this rank's E/ep experts only."""
    for family, (folder, _, _) in fp8_models.items():
        spec = read_model_spec(ModelConfig(path=folder))
        hidden, inter = spec.hidden_size, spec.moe_intermediate_size
        blocks = math.ceil(hidden / BLOCK[0]) * math.ceil(inter / BLOCK[1])  # same count for [I, H] and [H, I]
        per_expert = 3 * hidden * inter + 3 * blocks * 4
        for held, read in [(r[family][2], r[family][3]) for r in ep_runs(ep)]:
            assert read == spec.num_moe_layers * spec.num_experts // ep * per_expert
            assert held == spec.expert_param_count() * 4 // ep  # float32 values in memory


def test_fp8_values_are_what_the_model_holds(fp8_models):
    """The held expert weights are the dequantised codes, not the e4m3 codes cast (ep 1)."""
    from safetensors import safe_open

    from server.model.loader import load_model
    from server.moe.routing import build_policy

    folder = fp8_models["qwen3_moe"][0]
    model = load_model(ModelConfig(path=folder), policy=build_policy("natural"))
    experts = model.model.layers[0].mlp.experts
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        codes = f.get_tensor("model.layers.0.mlp.experts.3.down_proj.weight")  # [H, I] e4m3
        scales = f.get_tensor("model.layers.0.mlp.experts.3.down_proj.weight_scale_inv")  # [2, 2]
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (2, 2)
    held = experts.down_proj[3]  # [H, I]
    corner = (slice(BLOCK[0], None), slice(BLOCK[1], None))  # the partial bottom-right block
    assert torch.equal(held[corner], codes[corner].float() * scales[1, 1])
