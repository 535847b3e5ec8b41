"""Train the embedded tiny MoE: a byte-level Qwen3-MoE on the standard library's source.

    .venv/bin/python -m scripts.tiny_model.train --threads 1     # the shipped model (server/assets/tiny)
    .venv/bin/python -m scripts.tiny_model.train --out /tmp/t --steps 50 --aux-loss-coef 0.01

Why transformers' Qwen3MoeForCausalLM does the training: the result must be a Hugging Face
folder that transformers and our loader read identically, and its load-balancing loss
(Switch-style, weight `router_aux_loss_coef`) is exactly what real Qwen3-MoE checkpoints were
trained with. A small weight leaves learned routing realistically imperfect, which is the
point: natural routing must show real imbalance for the routing policies to be worth
comparing. Everything is seeded; batches are random windows of the training stream drawn
from a seeded generator, so a run is reproducible on the same machine and thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from server.eval.corpus import Corpus, heldout_windows, load_corpus

from .shape import TINY_DIR, ModelShape, hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TrainConfig:
    shape: ModelShape = field(default_factory=ModelShape.shipped)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # router_aux_loss_coef: Switch's value; 0.001 (Qwen3's) leaves dead experts here
    seed: int = 0
    heldout_permille: int = 50
    eval_seqs: int = 64  # held-out windows of seq_len for the held-out loss
    log_every: int = 50
    max_minutes: float = 0.0  # > 0: wall-clock stop (reported; the result then depends on the machine)
    threads: int = 0  # torch threads; 0 keeps torch's default


def build_model(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(hf_config(cfg.shape, cfg.aux_loss_coef), dtype=torch.float32,
                                            attn_implementation="sdpa", experts_implementation="eager")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def sample_batch(stream: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """[B, seq_len + 1] random windows of the training stream."""
    starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)  # [B]
    return stream[starts[:, None] + torch.arange(cfg.seq_len + 1)]


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross entropy (nats per byte) over [S, L+1] windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        logits = model(input_ids=w[:, :-1]).logits  # [b, L, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + w[:, 1:].numel()
    model.train()
    return total / count


def batch_imbalance(router_logits: tuple[torch.Tensor, ...], cfg: TrainConfig) -> float:
    """Per-expert max/mean of top-k assignments in this batch, averaged over layers (a log
    line's view of how balanced the learned routing is)."""
    e, k = cfg.shape.num_experts, cfg.shape.num_experts_per_tok
    ratios = []
    for logits in router_logits:  # each [B*L, E]
        counts = torch.bincount(logits.detach().topk(k, dim=-1).indices.flatten(), minlength=e).float()  # [E]
        ratios.append(float(counts.max() / counts.mean()))
    return round(sum(ratios) / len(ratios), 3)


def train(cfg: TrainConfig, corpus: Corpus, log=print) -> tuple[object, dict]:
    """-> (trained transformers model, summary dict)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = heldout_windows(corpus.heldout, cfg.seq_len, cfg.eval_seqs)
    history, t0, step = [], time.perf_counter(), 0
    load_start = os.getloadavg()[0]
    initial_heldout = heldout_loss(model, windows)
    ema = None
    for step in range(cfg.steps):
        if cfg.max_minutes > 0 and (time.perf_counter() - t0) / 60 > cfg.max_minutes:
            log(json.dumps({"warning": f"stopped at step {step} of {cfg.steps}: --max-minutes {cfg.max_minutes} reached"}))
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = sample_batch(corpus.train, cfg, gen)  # [B, L+1]
        out = model(input_ids=batch[:, :-1], output_router_logits=True)  # out.aux_loss: Switch balance loss
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        loss = ce + cfg.aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ce_value = ce.item()
        ema = ce_value if ema is None else 0.95 * ema + 0.05 * ce_value
        if (step + 1) % cfg.log_every == 0 or step == 0:
            row = {"step": step + 1, "train_ce": round(ce_value, 4), "train_ce_ema": round(ema, 4),
                   "aux": round(out.aux_loss.item(), 4), "expert_max_over_mean": batch_imbalance(out.router_logits, cfg), "lr": round(lr_at(step, cfg), 6),
                   "elapsed_s": round(time.perf_counter() - t0, 1)}
            history.append(row)
            log(json.dumps(row))
    else:
        step = cfg.steps
    train_seconds = time.perf_counter() - t0
    final_heldout = heldout_loss(model, windows)
    summary = {
        "steps_done": step if step < cfg.steps else cfg.steps, "train_seconds": round(train_seconds, 1),
        "tokens_seen": (step if step < cfg.steps else cfg.steps) * cfg.batch_size * cfg.seq_len,
        "initial_heldout_loss": round(initial_heldout, 4), "final_heldout_loss": round(final_heldout, 4),
        "final_train_loss_ema": round(ema, 4) if ema is not None else None,
        "heldout_bits_per_byte": round(final_heldout / math.log(2), 4),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)], "history": history,
    }
    return model, summary


def save(model, out: Path, cfg: TrainConfig, summary: dict, corpus: Corpus, tokenizer_from: Path, command: str) -> None:
    """Write the HF folder: config, weights, generation config, the byte-level tokenizer, and
    training.json (how it was made; transformers and our loader ignore it)."""
    from transformers import GenerationConfig

    tok_src = {name: (tokenizer_from / name).read_bytes() for name in TOKENIZER_FILES}
    staging = out.with_name(out.name + ".new")  # write beside, then swap: readers never see half a folder
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.config.output_router_logits = False
    c = model.config
    model.generation_config = GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                               pad_token_id=c.pad_token_id)
    model.save_pretrained(staging)
    for name, data in tok_src.items():
        (staging / name).write_bytes(data)
    meta = {"command": command, "config": asdict(cfg), "corpus": corpus.describe(), "torch": torch.__version__,
            **{k: v for k, v in summary.items() if k != "history"}, "history": summary["history"]}
    (staging / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in staging.iterdir():
        f.chmod(0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=TINY_DIR, help="HF folder to write (default: the embedded tiny model)")
    p.add_argument("--tokenizer-from", type=Path, default=TINY_DIR, help="folder whose byte-level tokenizer files are copied")
    for name in ("steps", "batch_size", "seq_len", "warmup_steps", "seed", "heldout_permille", "eval_seqs", "log_every", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "aux_loss_coef", "max_minutes"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    shape = d.shape
    for name in asdict(shape):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(shape, name), help="model shape")
    p.add_argument("--max-corpus-bytes", type=int, default=None, help="read only this many corpus bytes (smoke tests)")
    args = p.parse_args(argv)
    cfg = TrainConfig(shape=ModelShape(**{k: getattr(args, k) for k in asdict(shape)}),
                      **{k: getattr(args, k) for k in asdict(d) if k != "shape"})
    return cfg, args


def main(argv=None) -> None:
    import shlex
    import sys

    cfg, args = parse_args(argv)
    command = "python -m scripts.tiny_model.train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    corpus = load_corpus(cfg.heldout_permille, max_bytes=args.max_corpus_bytes)
    print(json.dumps({"corpus": corpus.describe()}), flush=True)
    model, summary = train(cfg, corpus, log=lambda s: print(s, flush=True))
    save(model, args.out, cfg, summary, corpus, args.tokenizer_from, command.strip())
    size = (args.out / "model.safetensors").stat().st_size
    print(json.dumps({"out": str(args.out), "safetensors_bytes": size,
                      **{k: v for k, v in summary.items() if k != "history"}}), flush=True)


if __name__ == "__main__":
    main()
