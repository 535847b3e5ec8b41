"""One rank's side of a step: plan -> ForwardBatch -> model.forward -> sampled tokens.

Identical on every rank, rank 0 included. The rank owns its KV-cache tensors; the block ids
in the plan say where each sequence's keys and values live in them.
"""
from __future__ import annotations

import torch

from ..model.forward_batch import ForwardBatch
from .sampler import SamplingBatch, sample
from .step_plan import RankPlan, RankResult, SeqWork


def build_forward_batch(work: list[SeqWork], token_offset: int, block_size: int, device: torch.device) -> ForwardBatch:
    """Flatten the rank's sequences into the model's batch layout (built on CPU, then moved)."""
    if not work:
        batch = ForwardBatch.empty(device)
        batch.token_offset = token_offset
        return batch
    query_lens = [w.num_tokens for w in work]
    context_lens = [w.context_len for w in work]
    input_ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.int64)  # [T]
    positions = torch.cat([torch.arange(w.start_pos, w.context_len, dtype=torch.int64) for w in work])  # [T]
    max_blocks = max(len(w.block_table) for w in work)
    padded = [w.block_table + [-1] * (max_blocks - len(w.block_table)) for w in work]
    block_tables = torch.tensor(padded, dtype=torch.int32)  # [S, max_blocks]
    seq_of_token = torch.repeat_interleave(torch.arange(len(work)), torch.tensor(query_lens))  # [T]
    block_of_token = block_tables[seq_of_token, positions // block_size].to(torch.int64)  # [T]
    slot_mapping = block_of_token * block_size + positions % block_size  # [T]
    logits_indices = torch.tensor(query_lens, dtype=torch.int64).cumsum(0) - 1  # [S]

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=move(input_ids),
        positions=move(positions),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=move(block_tables),
        slot_mapping=move(slot_mapping),
        logits_indices=move(logits_indices),
        token_offset=token_offset,
    )


class ModelRunner:
    """Holds the model and this rank's KV cache; runs the rank's part of each step."""

    def __init__(self, model, *, rank: int, num_blocks: int, block_size: int, device: torch.device, ep_group=None,
                 max_num_seqs: int | None = None, max_model_len: int | None = None) -> None:
        self.model = model
        self.rank = rank
        self.block_size = block_size
        self.device = torch.device(device)
        self.ep_group = ep_group
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        # ---- decode CUDA graphs (server/model/gpu/cuda_graphs.py): CUDA and ep_size 1 only,
        # captured once here for batch buckets up to max_num_seqs; None keeps decode eager.
        self.decode_graphs = None
        if max_num_seqs and self.device.type == "cuda":
            from ..model.gpu.cuda_graphs import maybe_decode_graphs

            width = -(-(max_model_len or num_blocks * block_size) // block_size)
            self.decode_graphs = maybe_decode_graphs(model, self.kv_caches, max_batch=max_num_seqs,
                                                     max_blocks_per_seq=min(width, num_blocks))

    def _forward(self, batch) -> torch.Tensor:
        """[S, V] logits: a graph replay for decode steps that fit a captured bucket, else eager."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(batch):
            return graphs.run(batch)
        return self.model.forward(batch, self.kv_caches)

    def bind_thread(self) -> None:
        """Make this rank's GPU current for the calling thread (the engine's step loop)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @torch.inference_mode()
    def run(self, plan: RankPlan) -> RankResult:
        result = RankResult(step=plan.step, rank=self.rank)
        if plan.run_forward:
            batch = build_forward_batch(plan.work, plan.token_offset, self.block_size, self.device)
            logits = self._forward(batch)  # [S, V] float32
            rows = [i for i, w in enumerate(plan.work) if w.sample is not None]
            if rows:
                picked = [plan.work[i] for i in rows]
                params = SamplingBatch.from_specs([w.sample for w in picked], [w.context_len for w in picked], self.device)
                if len(rows) < len(plan.work):  # some rows are mid-prompt chunks: nothing to sample
                    logits = logits[torch.tensor(rows, device=logits.device)]  # [R, V]
                tokens, logprobs = sample(logits, params)  # [R], [R]
                tokens_l = tokens.tolist()
                lps = logprobs.tolist() if logprobs is not None else [None] * len(rows)
                result.sampled = [
                    (w.seq_id, tok, lp if w.sample.logprobs else None) for w, tok, lp in zip(picked, tokens_l, lps)
                ]
        if plan.rebalance and self.model.eplb is not None:  # every rank at once: a collective
            result.rebalance = self.model.eplb.rebalance(self.ep_group)
        if plan.load_snapshot is not None:
            result.load = self.model.load_counters.snapshot(self.ep_group, reset=plan.load_snapshot)
        return result
