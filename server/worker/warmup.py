"""Start-up warm-up: run every compiled kernel variant a step can need before the first request.

Decode steps replay CUDA graphs captured at start-up, but prefill and mixed steps run eagerly
with a token count that differs nearly every step. The kernels do not specialise on counts
(do_not_specialize), so what still compiles on first use is each *variant*: the fused-MoE
config and alignment constexprs chosen by row count (server/moe/kernels/variants.py), and the
split count of an eager decode step. Served, requests arrive staggered, so the scheduler meets
new counts mid-stream, and a first-use compile stalled a step for over a second.

The plan (built on rank 0 from static shapes, the same for every rank) lists:
  prefill_tokens  one eager forward of T prompt tokens per MoE variant run over 1..max tokens
                  (ep_size 1: the fused path sees T*k slots), plus powers of 4 and the maximum
                  (which also sizes the allocator's pools before serving);
  decode_seqs     one eager decode forward per decode split count over 1..max_num_seqs;
  mixed           one forward of decode rows plus a prompt chunk;
  expert_rows     (ep_size > 1) direct calls of the expert path on R dispatched rows, one per
                  variant run over 1..ep_size*max_tokens*k: a rank may receive any count.
Every rank runs it in the same step with the same token counts (the forwards join the EP
collectives). Nothing a request can see changes: every row is padding (KV slot -1: not
written; block 0 read and ignored; valid_rows False: out of the expert-load counters, and
dispatchers that drop padding rows still launch their kernels at the step's shapes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..model.forward_batch import ForwardBatch
from ..moe.experts import LocalExperts

log = logging.getLogger(__name__)
MIXED_PROMPT_TOKENS = 64


@dataclass(frozen=True)
class WarmupPlan:
    prefill_tokens: tuple[int, ...]
    decode_seqs: tuple[int, ...]
    mixed: tuple[int, int]  # (decode rows, prompt tokens)
    expert_rows: tuple[int, ...]
    max_prompt: int  # longest prompt of a prefill shape: the block-table width in tokens

    @property
    def num_forwards(self) -> int:
        return len(self.prefill_tokens) + len(self.decode_seqs) + 1


def first_experts(model) -> LocalExperts | None:
    return next((m for m in model.modules() if isinstance(m, LocalExperts)), None)


def plan_warmup(model, *, max_tokens: int, max_seqs: int, width: int, block_size: int) -> WarmupPlan:
    """The warm-up for this model and these step limits (pure: shapes and configs only)."""
    from ..moe.kernels.variants import distinct_runs

    max_prompt = width * block_size
    prefill = {max_tokens}
    t = 1
    while t < max_tokens:
        prefill.add(t)
        t *= 4
    experts, expert_rows = first_experts(model), ()
    path = experts.path if experts is not None else None
    if path is not None and path.compiles:
        if model.ep_size == 1:
            prefill.update(distinct_runs(lambda n: path.topk_variant(experts, n, model.spec.top_k), max_tokens))
        else:
            most = model.ep_size * max_tokens * model.spec.top_k  # every pair of every rank to this one
            expert_rows = tuple(distinct_runs(lambda n: path.rows_variant(experts, n), most))
    decode_variant = getattr(model.attention_backend, "decode_variant", None)
    decode = (tuple(distinct_runs(lambda s: decode_variant(model, s, max_prompt, block_size), max_seqs))
              if decode_variant is not None else (1, max_seqs))
    rows = max(1, min(max_seqs // 2, max_tokens - 1))
    mixed = (rows, max(1, min(MIXED_PROMPT_TOKENS, max_tokens - rows, max_prompt)))
    return WarmupPlan(tuple(sorted(prefill)), decode, mixed, expert_rows, max_prompt)


def padding_batch(query_lens: list[int], width: int, device: torch.device) -> ForwardBatch:
    """A batch of padding rows: each sequence's context is exactly its new tokens, every block
    id is 0 (read, ignored) and every KV slot -1 (not written)."""
    q = torch.tensor(query_lens, dtype=torch.int64)  # [S]
    t = int(q.sum())
    ends = torch.cumsum(q, 0)  # [S]
    positions = torch.arange(t, dtype=torch.int64) - torch.repeat_interleave(ends - q, q)  # [T]
    return ForwardBatch(input_ids=torch.zeros(t, dtype=torch.int64, device=device), positions=positions.to(device),
                        query_lens=list(query_lens), context_lens=list(query_lens),
                        block_tables=torch.zeros(len(query_lens), width, dtype=torch.int32, device=device),
                        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
                        logits_indices=(ends - 1).to(device))


def prompt_lens(num_tokens: int, max_prompt: int) -> list[int]:
    """num_tokens as prompts of at most max_prompt tokens."""
    full, rest = divmod(num_tokens, max_prompt)
    return [max_prompt] * full + ([rest] if rest else [])


def run_warmup(runner, plan: WarmupPlan) -> float:
    """Run `plan` on this rank (every rank at once); returns the seconds it took."""
    model, device = runner.model, runner.device
    start = time.perf_counter()
    shapes = [prompt_lens(t, plan.max_prompt) for t in plan.prefill_tokens]
    shapes += [[1] * s for s in plan.decode_seqs]
    shapes.append([1] * plan.mixed[0] + [plan.mixed[1]])
    block_size = runner.block_size
    with torch.inference_mode():
        for lens in shapes:
            batch = padding_batch(lens, runner.width, device)
            meta = model.attention_backend.build(batch, block_size)
            rows = model.dispatcher.step_rows(batch.num_tokens, batch.num_tokens, device)  # same count on every rank
            model.forward_tokens(batch.input_ids, batch.positions, meta, runner.kv_caches, batch.logits_indices, 0,
                                 valid_rows=torch.zeros(batch.num_tokens, dtype=torch.bool, device=device), ep_rows=rows)
        experts = first_experts(model)
        for rows in plan.expert_rows:
            x = torch.zeros(rows, experts.hidden, dtype=experts.act_dtype, device=device)  # [R, H]
            ids = torch.arange(rows, device=device) % experts.num_local  # [R] spread over local experts
            experts.path.rows(experts, x, ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reset = getattr(model.policy, "reset", None)  # replay's advance cursors: back to the start
    if callable(reset):
        reset()
    return time.perf_counter() - start
