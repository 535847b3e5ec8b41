"""The engine end to end on tiny random transformers models (CPU, gloo for ep > 1).

Oracle: transformers' greedy `generate`, one prompt at a time. The engine serves the same
prompts concurrently — different lengths, staggered arrivals, chunked prefill, a batch-slot
limit that queues some — and must produce exactly the same tokens at every ep_size.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.config import AppConfig
from server.engine.api import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StopParams,
)
from server.frontend.start import start_engine

VOCAB = 320
PROMPTS = [[5, 6], [7, 8, 9, 10, 11], list(range(20, 33)), [100, 3, 250, 17, 9, 41, 2, 8], [300]]
MAX_NEW = 10


def save_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained here (nothing can be downloaded), vocab <= the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 8, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    trainer_corpus = ["hello world, the quick brown fox jumps over the lazy dog", "héllo wörld 日本語 😀 café"]
    tok.train_from_iterator(trainer_corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def build_model_folder(folder: Path, family: str = "qwen3_moe", seed: int = 0, **overrides):
    from tests.helpers.hf_models import build_hf_model, save_hf_model

    model = build_hf_model(family, seed=seed, vocab_size=VOCAB, **overrides)
    save_hf_model(model, folder)
    save_tokenizer(folder)
    model.generation_config.eos_token_id = None  # the oracle must not stop early
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


def make_app(folder: Path, ep_size: int = 1, **engine) -> AppConfig:
    eng = dict(kv_cache_tokens=512, kv_block_size=4, max_num_batched_tokens=8, max_num_seqs=3, max_queue=64)
    eng.update(engine)
    return AppConfig.from_dict({"model": {"name": "tiny-test", "path": str(folder), "max_model_len": 64},
                                "parallel": {"ep_size": ep_size}, "engine": eng})


def request(i: int, prompt, max_new: int = MAX_NEW, temperature: float = 0.0, logprobs: bool = False, **stops) -> GenerationRequest:
    stops.setdefault("ignore_eos", True)
    return GenerationRequest(f"req-{i}", tuple(prompt), SamplingParams(temperature=temperature, **stops.pop("sampling", {})),
                             StopParams(max_new_tokens=max_new, **stops), logprobs=logprobs)


async def collect(engine, req: GenerationRequest, delay: float = 0.0):
    """-> (token ids, text, last chunk)."""
    await asyncio.sleep(delay)
    tokens, text, last = [], "", None
    async for chunk in engine.generate(req):
        tokens += chunk.token_ids
        text += chunk.text
        last = chunk
    return tokens, text, last


def serve_all(engine, reqs: list[GenerationRequest], stagger: float = 0.01):
    async def main():
        return await asyncio.gather(*[collect(engine, r, delay=i * stagger) for i, r in enumerate(reqs)])

    return asyncio.run(main())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    model = build_model_folder(folder)
    expected = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    return folder, model, expected


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def engine(request, qwen3):
    folder, _, _ = qwen3
    eng = start_engine(make_app(folder, ep_size=request.param), in_thread=True)
    yield eng
    eng.shutdown()
    assert not eng.is_alive


def test_greedy_matches_transformers_under_continuous_batching(engine, qwen3) -> None:
    _, _, expected = qwen3
    results = serve_all(engine, [request(i, p) for i, p in enumerate(PROMPTS)])
    for (tokens, _, last), want, prompt in zip(results, expected, PROMPTS):
        assert tokens == want
        assert last.finish_reason is FinishReason.LENGTH
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == MAX_NEW
        assert last.usage.time_to_first_token_s > 0
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
    assert stats.kv_blocks_total == engine.model_info().ep_size * 128


def test_text_is_the_decoded_tokens(engine, qwen3) -> None:
    (tokens, text, _), = serve_all(engine, [request(0, PROMPTS[2])])
    assert text == engine.decode(tokens)


def test_seeded_sampling_is_reproducible_and_independent_of_batching(engine) -> None:
    sampled = dict(sampling={"top_k": 40, "top_p": 0.95, "seed": 1234})
    alone = serve_all(engine, [request(0, PROMPTS[1], temperature=0.9, **sampled)])[0][0]
    crowd = [request(i, p, temperature=0.7 if i % 2 else 0.0) for i, p in enumerate(PROMPTS)]
    crowd.insert(2, request(99, PROMPTS[1], temperature=0.9, **sampled))
    together = serve_all(engine, crowd, stagger=0.0)[2][0]
    assert together == alone
    other_seed = serve_all(engine, [request(0, PROMPTS[1], temperature=0.9, sampling={"seed": 99})])[0][0]
    assert other_seed != alone


def test_logprobs_are_the_models(engine, qwen3) -> None:
    _, model, expected = qwen3
    chunks = asyncio.run(_chunks(engine, request(0, PROMPTS[1], logprobs=True)))
    tokens = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    assert tokens == expected[1]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1] + tokens])).logits[0, len(PROMPTS[1]) - 1:-1].float()
    want = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lps), want, atol=1e-4)


async def _chunks(engine, req):
    return [c async for c in engine.generate(req)]


def test_expert_load_counts_every_token_on_every_rank(engine) -> None:
    asyncio.run(engine.expert_load(reset=True))
    serve_all(engine, [request(0, PROMPTS[0], max_new=4), request(1, PROMPTS[2], max_new=3)])
    snap = asyncio.run(engine.expert_load(reset=True))
    processed = (len(PROMPTS[0]) + 4 - 1) + (len(PROMPTS[2]) + 3 - 1)  # the last token is never fed back
    info = engine.model_info()
    assert snap.ep_size == info.ep_size and snap.num_layers == info.num_moe_layers
    assert snap.tokens == [processed] * info.num_moe_layers
    assert all(sum(row) == processed * info.top_k for row in snap.expert_tokens)
    assert asyncio.run(engine.expert_load()).tokens == [0] * info.num_moe_layers


def test_model_info(engine) -> None:
    info = engine.model_info()
    assert (info.architecture, info.num_experts, info.top_k, info.vocab_size) == ("Qwen3MoeForCausalLM", 8, 2, VOCAB)
    assert info.routing_policy == "natural" and dict(info.routing_params)["weights"] == "keep"
    assert info.max_model_len == 64 and info.device == "cpu"


def test_embedded_tiny_model_serves_text_like_transformers() -> None:
    """The default config (model.name=tiny, no path): text in, greedy text out, = transformers."""
    from transformers import AutoModelForCausalLM

    from server.model.loader import TINY_MODEL_DIR

    app = AppConfig.from_dict({"engine": {"kv_cache_tokens": 256, "kv_block_size": 16}})
    eng = start_engine(app, in_thread=True)
    try:
        prompts = ["Hello, world!", "The quick brown fox", "日本語 😀"]
        reqs = [GenerationRequest(f"t{i}", tuple(eng.encode(p)), SamplingParams(temperature=0.0),
                                  StopParams(max_new_tokens=12)) for i, p in enumerate(prompts)]
        results = serve_all(eng, reqs)
        hf = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL_DIR), attn_implementation="eager").eval()
        for req, (tokens, text, last) in zip(reqs, results):
            with torch.no_grad():
                out = hf.generate(torch.tensor([req.prompt_token_ids]), max_new_tokens=12, do_sample=False)
            want = out[0, len(req.prompt_token_ids):].tolist()
            eos = set(eng.model_info().eos_token_ids)
            assert tokens == want[:len(tokens)]
            assert len(tokens) == 12 or (tokens[-1] in eos and last.finish_reason is FinishReason.STOP)
            assert text == eng.decode([t for t in tokens if t not in eos])
        info = eng.model_info()
        assert info.model_name == "tiny" and info.num_experts == 16 and info.max_model_len == 2048
    finally:
        eng.shutdown()


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe"])
def test_other_families_match_transformers_under_continuous_batching(family, tmp_path) -> None:
    """Shared expert (Qwen2-MoE), sliding window over paged, chunked KV (Mixtral), clip_qkv (OLMoE)."""
    model = build_model_folder(tmp_path, family=family, seed=4)
    prompts = PROMPTS[1:4]  # 5, 13 and 8 tokens: chunked by a 5-token budget, past Mixtral's window of 6
    expected = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    eng = start_engine(make_app(tmp_path, max_num_batched_tokens=5), in_thread=True)
    try:
        results = serve_all(eng, [request(i, p) for i, p in enumerate(prompts)])
        assert [r[0] for r in results] == expected
    finally:
        eng.shutdown()
