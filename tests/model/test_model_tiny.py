"""The embedded tiny model (server/assets/tiny): loads by default, transformers agrees with it,
its byte-level tokenizer round-trips any text, and the committed files are what
python -m scripts.tiny_model.build builds."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import TINY_MODEL_DIR, load_model, load_tokenizer, read_model_spec
from server.moe.routing import build_policy
from tests.helpers.paged_driver import PagedDriver

TEXTS = [
    "Hello, world!",
    "  two  spaces\n\ttab\r\n",
    "héllo wörld — ünïcödé 日本語 🚀👍🏽",
    "don't , . ? ! 's  n't",  # no "clean up tokenization spaces" rewriting
    "\x00\x7f\x1b[0m",
    "",
]


def test_default_model_config_is_the_tiny_model():
    spec = read_model_spec(ModelConfig())
    assert spec.architecture == "Qwen3MoeForCausalLM"
    assert (spec.num_layers, spec.num_moe_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 4, 128, 4, 2, 32)
    assert (spec.num_experts, spec.top_k, spec.moe_intermediate_size, spec.vocab_size) == (16, 2, 64, 272)
    assert spec.dtype == "float32" and spec.eos_token_ids == (257,) and spec.bos_token_id == 256


def test_assets_are_small():
    total = sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir())
    assert total < 10 * 1024 * 1024


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_bytes(text):
    tok = load_tokenizer(ModelConfig())
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tokenizer_special_tokens():
    tok = load_tokenizer(ModelConfig())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert len(tok) == 259 <= read_model_spec(ModelConfig()).vocab_size
    assert tok.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi"


def test_transformers_loads_tiny_and_agrees():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    ids = tok.encode("The tiny model says: ", add_special_tokens=False)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1].float()
    model = load_model(ModelConfig(), policy=build_policy("natural"))
    got = PagedDriver(model, block_size=8).step([(0, ids)])[0]
    assert got.shape == (272,)
    assert (got - want).abs().max() < 1e-4


def test_build_script_reproduces_the_shipped_shape_and_tokenizer(tmp_path):
    """scripts/tiny_model/build.py makes the random-weight starting point of the shipped model (the
    weights themselves come from scripts/tiny_model/train.py, checked in tests/tools/test_train_tiny.py):
    same tokenizer files byte for byte, same architecture, differing only in the balance-loss
    weight training used."""
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "scripts.tiny_model.build", "--out", str(out)], check=True,
                   cwd=TINY_MODEL_DIR.parents[2], capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (TINY_MODEL_DIR / name).read_bytes(), name
    built = json.loads((out / "config.json").read_text())
    shipped = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert {k for k in built if built[k] != shipped.get(k)} <= {"router_aux_loss_coef"}
    assert set(shipped) == set(built)
