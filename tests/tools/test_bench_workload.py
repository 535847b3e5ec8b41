"""The benchmark's static workload and settings (no model needed)."""
from __future__ import annotations

import pytest
import torch

from server.bench.settings import BenchSettings
from server.bench.workload import StaticWorkload
from server.config import ConfigError


def _work(**kw) -> StaticWorkload:
    args = dict(batch=3, input_len=5, output_len=4, vocab_size=50, block_size=4, device="cpu", seed=7)
    return StaticWorkload.build(**{**args, **kw})


def test_every_token_gets_its_own_slot_in_its_own_blocks():
    work = _work()
    prefill = work.prefill_batch()
    decode = work.decode_batches()
    slots = [prefill.slot_mapping] + [decode.slots[i] for i in range(len(decode))]
    flat = torch.cat(slots)
    assert flat.numel() == 3 * (5 + 3) == flat.unique().numel()  # no two tokens share a slot
    width = work.block_tables.shape[1]
    assert width == 3  # ceil((5 + 4) / 4)
    owner = flat // (4 * width)  # blocks i*W..i*W+W-1 belong to sequence i
    seq = torch.cat([torch.arange(3).repeat_interleave(5)] + [torch.arange(3)] * 3)
    assert torch.equal(owner, seq)
    assert prefill.logits_indices.tolist() == [4, 9, 14] and prefill.context_lens == [5] * 3


def test_decode_steps_advance_positions_and_context():
    work = _work(first_seq=6, total_batch=9)
    steps = work.decode_batches()
    tokens = torch.tensor([1, 2, 3])
    for i in range(len(steps)):
        batch = steps.batch(i, tokens)
        assert batch.positions.tolist() == [5 + i] * 3 and batch.context_lens == [6 + i] * 3
        assert batch.token_offset == 6 and batch.query_lens == [1, 1, 1]
    assert work.prefill_batch().token_offset == 6 * 5


def test_rank_slices_of_one_global_prompt_set():
    whole = _work(batch=4, total_batch=4)
    part = _work(batch=2, first_seq=2, total_batch=4)
    assert torch.equal(whole.prompts[2:], part.prompts)


def _settings(**bench) -> BenchSettings:
    return BenchSettings.from_dict({"model": {"name": "tiny"}, "routing": {"name": "skewed", "target": 1.5},
                                    "parallel": {"ep_size": 2}, "bench": {"mode": "static", **bench}})


def test_settings_tag_and_round_trip():
    s = _settings(batch=8)
    assert s.tag() == "tiny-ep2-skewed-target1.5"  # only parameters that differ from the policy's defaults
    assert _settings(batch=8, tag="mine").tag() == "mine"
    assert BenchSettings.from_dict(s.to_dict()) == s


def test_random_fp8_weights_do_not_share_the_bf16_runs_tag():
    """gpu_bench.sh fp8 runs one shape with model.quantization=fp8 and auto into one folder."""
    shape = {"num_hidden_layers": 2}
    tags = [BenchSettings.from_dict({"model": {"name": "deepseek_v3", "shape": shape, "quantization": q},
                                     "routing": {"name": "natural"}, "bench": {"mode": "static"}}).tag()
            for q in ("fp8", "auto")]
    assert tags == ["deepseek_v3-single-fp8-natural", "deepseek_v3-single-natural"]


@pytest.mark.parametrize("bench,key", [({"batch": 3}, "bench.batch"), ({"small_batch": 3}, "bench.small_batch"),
                                       ({"hf_cache": "paged"}, "bench.hf_cache"), ({"output_len": 1}, "bench.output_len"),
                                       ({"bogus": 1}, "bench.bogus")])
def test_bad_settings_name_the_key(bench, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _settings(**bench)


def test_lightllm_set_spreads_lengths_around_the_input_length() -> None:
    from server.bench.request_sets import build_request_set

    rs = build_request_set("lightllm", batch=128, input_len=64, output_len=64, vocab_size=1000, seed=0)
    lengths = rs.lengths
    assert rs.batch == 128 and len(set(lengths)) >= 40
    assert min(lengths) >= 32 and max(lengths) <= 96 and abs(sum(lengths) / 128 - 64) < 4
    assert rs.prompt_tokens == sum(lengths) and rs.decode_tokens == 128 * 63 and rs.max_total_len == max(lengths) + 64
    assert all(0 <= t < 1000 for p in rs.prompts for t in p)
    assert build_request_set("lightllm", batch=128, input_len=64, output_len=64, vocab_size=1000, seed=0) == rs
    assert build_request_set("lightllm", batch=128, input_len=64, output_len=64, vocab_size=1000, seed=1) != rs
    fixed = build_request_set("fixed", batch=4, input_len=9, output_len=3, vocab_size=50, seed=0)
    assert fixed.lengths == [9] * 4


def test_engine_mode_settings_policies_and_sweep() -> None:
    s = BenchSettings.from_dict({"model": {"name": "tiny"}, "bench": {
        "policies": ["natural", {"name": "skewed", "target": 1.5}], "sweep": [1, 4], "workload": "lightllm"}})
    assert s.bench.policies == ({"name": "natural"}, {"name": "skewed", "target": 1.5})
    assert s.bench.policy_labels == ["natural", "skewed-target1.5"] and s.bench.sweep == (1, 4)
    assert s.tag() == "tiny-single-lightllm" and BenchSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="include natural"):
        BenchSettings.from_dict({"bench": {"policies": ["greedy_balanced"]}})
    with pytest.raises(ConfigError, match="twice"):
        BenchSettings.from_dict({"bench": {"policies": ["natural", "natural"]}})
    with pytest.raises(ConfigError, match=r"bench\.mode"):
        BenchSettings.from_dict({"bench": {"mode": "fast"}})
    with pytest.raises(ConfigError, match=r"bench\.sweep"):
        BenchSettings.from_dict({"bench": {"sweep": [0]}})
