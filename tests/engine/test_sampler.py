"""Sampler: greedy, temperature, top-k, top-p, logprobs, and reproducibility per
(seed, position) whatever the batch around a request."""
from __future__ import annotations

import math

import pytest
import torch

from server.engine.api import MIN_TEMPERATURE
from server.worker.sampler import SamplingBatch, hashed_uniform, sample, top_k_top_p_mask
from server.worker.step_plan import SampleSpec


def spec(temperature=1.0, top_p=1.0, top_k=0, seed=0, logprobs=False) -> SampleSpec:
    return SampleSpec(temperature, top_p, top_k, seed, logprobs)


def draw(logits: torch.Tensor, specs: list[SampleSpec], positions: list[int]):
    return sample(logits, SamplingBatch.from_specs(specs, positions, "cpu"))


def test_greedy_is_argmax_and_logprobs_are_the_raw_distribution() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    tokens, lps = draw(logits, [spec(temperature=0.0, logprobs=True)] * 5, [3] * 5)
    assert tokens.tolist() == logits.argmax(1).tolist()
    assert torch.allclose(lps, logits.log_softmax(1).gather(1, tokens[:, None])[:, 0])


def test_a_draw_depends_on_seed_and_position_only() -> None:
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 200, generator=g)
    others = torch.randn(7, 200, generator=g)
    alone, _ = draw(row, [spec(seed=42, top_k=50, top_p=0.9)], [17])
    # Same request in a bigger batch, at another row, next to greedy and differently-cut rows.
    batch = torch.cat([others[:3], row, others[3:]])
    specs = [spec(temperature=0.0), spec(seed=1), spec(seed=2, top_p=0.5), spec(seed=42, top_k=50, top_p=0.9),
             spec(seed=3, top_k=5), spec(temperature=0.3), spec(seed=9), spec(seed=42)]
    together, _ = draw(batch, specs, [5, 6, 7, 17, 8, 9, 10, 11])
    assert together[3] == alone[0]
    # Different positions (or seeds) give independent draws: not all equal over many.
    many, _ = draw(row.expand(64, -1), [spec(seed=42)] * 64, list(range(64)))
    assert len(set(many.tolist())) > 10


def test_hashed_uniforms_are_uniform_and_in_the_open_interval() -> None:
    u = hashed_uniform(torch.arange(64, dtype=torch.int64) * 7919, 4096)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature, n = 0.7, 20_000
    tokens, _ = draw(logits.expand(n, -1), [spec(temperature=temperature, seed=5)] * n, list(range(n)))
    freq = torch.bincount(tokens, minlength=4).double() / n
    expect = (logits[0] / temperature).softmax(0).double()
    assert torch.allclose(freq, expect, atol=0.015), (freq, expect)


def test_top_k_and_top_p_never_leave_the_allowed_set() -> None:
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0, -2.0]])
    n = 4000
    top2, _ = draw(logits.expand(n, -1), [spec(top_k=2, seed=1)] * n, list(range(n)))
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(0)  # [0.48, 0.29, 0.18, ...]: nucleus 0.7 = {0, 1}
    assert probs[0] < 0.7 < probs[0] + probs[1]
    nucleus, _ = draw(logits.expand(n, -1), [spec(top_p=0.7, seed=2)] * n, list(range(n)))
    assert set(nucleus.tolist()) == {0, 1}
    tiny_p, _ = draw(logits.expand(50, -1), [spec(top_p=1e-6, seed=3)] * 50, list(range(50)))
    assert set(tiny_p.tolist()) == {0}  # the best token always stays


def test_mask_keeps_rows_independent() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    masked = top_k_top_p_mask(logits, torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    assert masked[0].tolist() == [-math.inf, -math.inf, 3.0]
    assert masked[1].tolist() == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-12, MIN_TEMPERATURE / 2, 1.0, 1e30, 3e38])
def test_top_k_1_is_greedy_at_every_temperature(temperature) -> None:
    """top_k=1 keeps only the best token whatever the temperature: logits/T neither overflows
    (T ~ 1e-38) nor ties (T ~ 1e38) its way to another token."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(4)) * 8 - 20  # all negative
    tokens, _ = draw(logits, [spec(temperature=temperature, top_k=1, seed=i) for i in range(64)], list(range(64)))
    assert tokens.tolist() == logits.argmax(1).tolist()


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-20, MIN_TEMPERATURE / 2])
def test_a_temperature_below_the_floor_is_greedy(temperature) -> None:
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5)) * 8 + 20  # all positive
    specs = [spec(temperature=temperature, seed=i, top_p=0.9 if i % 2 else 1.0) for i in range(64)]
    tokens, _ = draw(logits, specs, list(range(64)))
    assert tokens.tolist() == logits.argmax(1).tolist()
    batch = SamplingBatch.from_specs(specs, list(range(64)), "cpu")
    assert batch.all_greedy  # no scaling, no noise: the greedy path


def test_the_floor_is_where_sampling_starts() -> None:
    """Just above the floor a near-tie is still sampled (the floor does not swallow real
    low temperatures): two tokens MIN_TEMPERATURE apart in logit are both drawn."""
    logits = torch.tensor([[0.0, MIN_TEMPERATURE, -5.0]]).expand(400, -1)
    tokens, _ = draw(logits, [spec(temperature=MIN_TEMPERATURE, seed=1)] * 400, list(range(400)))
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_draws_match_cpu() -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(3))
    specs = [spec(seed=i, top_k=20 * i, top_p=0.5 + 0.05 * i) for i in range(8)]
    cpu, _ = sample(logits, SamplingBatch.from_specs(specs, list(range(8)), "cpu"))
    gpu, _ = sample(logits.cuda(), SamplingBatch.from_specs(specs, list(range(8)), "cuda"))
    assert cpu.tolist() == gpu.cpu().tolist()
