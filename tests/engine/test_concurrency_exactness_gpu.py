"""fp32 on a GPU: a prompt's greedy tokens do not depend on what else shares its batch.

In bf16 they may (kernels choose tilings and reduction orders by batch shape; measured on one
H200: 14 of 32 prompts kept their single-request output under 128-way concurrency). In fp32
every one must: 32 prompts served alone, then the same 32 among 128 concurrent requests, on
the Qwen3-30B-A3B shape cut to 2 layers with random fp32 weights (decode CUDA graphs on).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import conf
from server.config import AppConfig
from server.engine.api import GenerationRequest, SamplingParams, StopParams
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import serve_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NEW_TOKENS = 16


def _request(i: int, prompt: tuple[int, ...]) -> GenerationRequest:
    return GenerationRequest(f"r{i}", prompt, SamplingParams(temperature=0.0),
                             StopParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def test_fp32_greedy_is_the_same_alone_and_under_128_way_concurrency() -> None:
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=qwen3_30b_a3b", "model.shape.num_hidden_layers=2",
                                                       "model.dtype=float32", "engine.max_num_seqs=128"])
    app = AppConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    rng = random.Random(0)
    vocab = 1000
    prompts = [tuple(rng.randrange(vocab) for _ in range(rng.randrange(8, 64))) for _ in range(128)]
    eng = start_engine(app, in_thread=True)
    try:
        alone = [serve_all(eng, [_request(i, p)])[0][0] for i, p in enumerate(prompts[:32])]
        together = serve_all(eng, [_request(i, p) for i, p in enumerate(prompts)], stagger=0.0)
        kept = sum(a == t[0] for a, t in zip(alone, together[:32]))
        assert kept == 32, f"{kept} of 32 prompts kept their single-request output in fp32"
    finally:
        eng.shutdown()
