"""Both MLA prefill forms of a two-layer DeepSeek-V3 at real latent widths (kv_lora_rank 512 +
rope 64, nope 128, v 128) on a CUDA GPU: long prompts (up to 4096 tokens) and a chunk over a
cached prefix, kernels.mla_prefill=expanded vs =absorbed, bf16-level agreement of the logits;
skipped without a GPU. The CPU twin is test_mla_prefill_forms.py."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.paged_driver import PagedDriver
from tests.model.test_deepseek_gpu import _deepseek

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(mode: str, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("EPSERVE_MLA_PREFILL", mode)
    torch.manual_seed(0)
    model = _deepseek("round_robin_balanced")
    assert all(layer.self_attn.prefill_expanded is not None for layer in model.model.layers)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 32000, (n,), generator=gen).tolist() for n in (4096, 1500, 37)]
    driver = PagedDriver(model, num_blocks=512, block_size=16, seed=1)
    first = driver.step([(0, prompts[0]), (1, prompts[1][:1000]), (2, prompts[2])])
    second = driver.step([(1, prompts[1][1000:]), (2, [int(first[2].argmax())])])  # chunk over a prefix + decode
    return [torch.stack(list(first.values())), torch.stack(list(second.values()))]


def test_expanded_prefill_matches_absorbed(monkeypatch) -> None:
    expanded = _run("expanded", monkeypatch)
    absorbed = _run("absorbed", monkeypatch)
    for i, (a, b) in enumerate(zip(expanded, absorbed)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"step {i}: relative error {rel:.3g}"
