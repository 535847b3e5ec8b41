#!/usr/bin/env python
"""Build the embedded tiny model (server/assets/tiny/): a small Qwen3-MoE with random weights
from a fixed seed and a byte-level tokenizer, saved in Hugging Face format, fully offline.

Why it exists: `python -m server` must work on a fresh machine with no GPU and no download.
The weights are random (its text is noise), but the architecture, the tokenizer and the files
are the real thing: transformers loads the folder too.

Tokenizer: ids 0..255 are the bytes (GPT-2 byte-level alphabet, no merges), 256/257/258 are
<|bos|>/<|eos|>/<|pad|>; any text round-trips byte-exactly. The model's vocab is padded to a
multiple of 16 (272).

    .venv/bin/python scripts/build_tiny.py [--out server/assets/tiny] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "server" / "assets" / "tiny"
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 256, 257, 258
BOS, EOS, PAD = 256, 257, 258
VOCAB = 272  # 259 tokens padded to a multiple of 16

MODEL_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
    initializer_range=0.02, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert [tok.token_to_id(s) for s in SPECIALS] == [BOS, EOS, PAD]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2], model_max_length=MODEL_SHAPE["max_position_embeddings"])


def build_model(seed: int):
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**MODEL_SHAPE, dtype="float32")
    config.architectures = ["Qwen3MoeForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    build_model(args.seed).save_pretrained(args.out)
    build_tokenizer().save_pretrained(args.out)
    for f in args.out.iterdir():
        f.chmod(0o644)  # save_pretrained may write 0600 files; the package ships them readable
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps({"out": str(args.out), "files": sorted(f.name for f in args.out.iterdir()), "bytes": size}))


if __name__ == "__main__":
    main()
