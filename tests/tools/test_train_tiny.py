"""The training script (scripts/tiny_model): the corpus split, a short run that learns, a saved
folder that transformers and our loader read identically, and the shipped trained model."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import TINY_MODEL_DIR, load_model, load_tokenizer, read_model_spec
from server.moe.routing import build_policy
from scripts.tiny_model.shape import ModelShape
from scripts.tiny_model.train import TrainConfig, save, train
from server.eval.corpus import EOS_ID, is_heldout, load_corpus, stdlib_files
from tests.helpers.paged_driver import PagedDriver

SMALL = replace(ModelShape.shipped(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                max_position_embeddings=256)


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(heldout_permille=100, max_bytes=400_000)


def test_split_is_deterministic_and_disjoint():
    files = [rel for rel, _ in stdlib_files()]
    held = {rel for rel in files if is_heldout(rel, 50)}
    assert held == {rel for rel in files if is_heldout(rel, 50)}
    assert 0 < len(held) < len(files) * 0.1
    assert not any(part in {"site-packages", "test", "tests"} for rel in files for part in rel.split("/"))


def test_corpus_is_bytes_and_eos(small_corpus):
    for stream in (small_corpus.train, small_corpus.heldout):
        assert stream.dtype == torch.int64 and int(stream.min()) >= 0
        assert set(stream[stream > 255].unique().tolist()) == {EOS_ID}
        assert int(stream[-1]) == EOS_ID
    assert int((small_corpus.heldout == EOS_ID).sum()) == small_corpus.heldout_files


def test_short_run_learns_and_saves_a_folder_both_loaders_agree_on(tmp_path, small_corpus):
    cfg = TrainConfig(shape=SMALL, steps=40, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=5, eval_seqs=8,
                      log_every=10, aux_loss_coef=0.01, threads=1)
    model, summary = train(cfg, small_corpus, log=lambda s: None)
    assert summary["steps_done"] == 40
    assert summary["final_heldout_loss"] < summary["initial_heldout_loss"] - 0.5
    assert summary["history"][-1]["train_ce_ema"] < summary["history"][0]["train_ce"] - 0.5
    out = tmp_path / "tiny"
    save(model, out, cfg, summary, small_corpus, TINY_MODEL_DIR, "test")
    assert json.loads((out / "training.json").read_text())["final_heldout_loss"] == summary["final_heldout_loss"]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = list(b"def main():\n    return 0\n")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()  # [T, V]
    ours = load_model(ModelConfig(path=str(out)), policy=build_policy("natural"))
    driver = PagedDriver(ours, block_size=4)
    got = torch.stack([driver.step([(0, [t])])[0] for t in ids])  # one token per step: every position
    assert (got - want).abs().max() < 1e-4
    tok = load_tokenizer(ModelConfig(path=str(out)))
    assert tok.encode("é\n", add_special_tokens=False) == list("é\n".encode())


def test_shipped_model_is_trained_and_small():
    meta = json.loads((TINY_MODEL_DIR / "training.json").read_text())
    assert meta["steps_done"] == meta["config"]["steps"]
    assert meta["final_heldout_loss"] < 2.0 < meta["initial_heldout_loss"]  # nats per byte; 5.6 untrained
    assert (TINY_MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    spec = read_model_spec(ModelConfig())
    shape = meta["config"]["shape"]
    assert (spec.num_experts, spec.top_k, spec.num_moe_layers) == (shape["num_experts"], shape["num_experts_per_tok"],
                                                                   shape["num_hidden_layers"])


def test_shipped_model_matches_transformers_on_every_position():
    """Teacher-forced logits of a held-out-like snippet: our model (natural routing) == transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    ids = list(b"class Foo(object):\n    def __init__(self, x):\n        self.x = x\n")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()  # [T, V]
    model = load_model(ModelConfig(), policy=build_policy("natural"))
    from server.eval.teacher_forcing import prefill_batch

    got = model(prefill_batch(torch.tensor([ids]), token_offset=0), model.allocate_kv_cache(8, 16))  # [T, V]
    assert (got - want).abs().max() < 1e-4
    nll = torch.nn.functional.cross_entropy(got[:-1], torch.tensor(ids[1:]))
    assert math.exp(float(nll)) < 8  # it has learned Python: uniform over bytes would be 256
