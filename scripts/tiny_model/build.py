"""Build the tiny model's starting point: the byte-level tokenizer and the untrained folder.

    .venv/bin/python -m scripts.tiny_model.build [--out DIR] [--seed 0]

Why it exists: `python -m server` must work on a fresh machine with no GPU and no download,
so the tokenizer is made here from nothing, and the weights training starts from are the
seeded random ones `train.build_model` makes (the shipped weights then come from
`python -m scripts.tiny_model.train`). The architecture is the shipped config.json's
(scripts/tiny_model/shape.py), so building into server/assets/tiny reproduces its config and
tokenizer files byte for byte.

Tokenizer: ids 0..255 are the bytes (GPT-2 byte-level alphabet, no merges), 256/257/258 are
<|bos|>/<|eos|>/<|pad|>; any text round-trips byte-exactly. The model's vocab is padded to a
multiple of 16 (272).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .shape import TINY_DIR
from .train import TrainConfig, build_model

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 256, 257, 258: right after the 256 bytes


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


# The tiny model was trained on plain text, not chats: this template only gives the OpenAI
# front end's /v1/chat/completions a checkpoint template to render (role-tagged lines).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tokenizer(model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert [tok.token_to_id(s) for s in SPECIALS] == [256, 257, 258]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2], model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE  # saved as chat_template.jinja
    return fast


def build(out: Path, seed: int) -> None:
    from transformers import GenerationConfig

    cfg = TrainConfig(seed=seed)  # reads the shipped shape before `out` (maybe the shipped folder) is replaced
    model = build_model(cfg)
    c = model.config
    model.generation_config = GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                               pad_token_id=c.pad_token_id)
    tokenizer = build_tokenizer(cfg.shape.max_position_embeddings)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (c.bos_token_id, c.eos_token_id, c.pad_token_id), "config.json and the tokenizer disagree on special ids"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained may write 0600 files; the package ships them readable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps({"out": str(args.out), "files": sorted(f.name for f in args.out.iterdir()), "bytes": size}))


if __name__ == "__main__":
    main()
