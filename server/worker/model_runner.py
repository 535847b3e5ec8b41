"""One rank's side of a step: plan -> staged inputs -> model.forward -> sampled tokens.

Identical on every rank, rank 0 included. The rank owns its KV-cache tensors, its slot table
(block tables and sampling parameters of its running sequences) and its step buffers; the
plan says what changed and which slots run.

`launch` does the host work of a step — slot updates, the batch's inputs built with numpy
into pinned staging, one host-to-device copy, the forward, the sampler — and returns without
waiting for the device: sampled tokens are scattered into the slots' `next_token` entries on
the device (the next decode step reads its inputs there) and copied to the host
asynchronously. `PendingStep.result()` waits for that copy. On CPU `launch` runs to the end.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.forward_batch import ForwardBatch
from .input_buffers import StepInputs
from .pending_step import PendingStep, event_after, pending_step
from .policy_switch import PolicySwitch
from .routed_experts import RoutedExpertsRecorder
from .sampler import SamplingBatch, SamplingFlags, sample, sample_keys
from .sampling_extras import NO_EXTRAS, SamplingExtras, prompt_logprobs, top_logprobs
from .slot_table import SlotTable
from .step_plan import RankBatch, RankPlan, RankResult

DEFAULT_MAX_SEQS = 256
DEFAULT_MAX_BATCHED_TOKENS = 4096


class ModelRunner:
    """Holds the model and this rank's KV cache, slot table and step buffers."""

    def __init__(self, model, *, rank: int, num_blocks: int, block_size: int, device: torch.device, ep_group=None,
                 max_num_seqs: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, cuda_graphs: bool | None = None) -> None:
        """`cuda_graphs`: kernels.cuda_graphs (None: the environment decides, cuda_graphs.py)."""
        self.model = model
        self.rank = rank
        self.block_size = block_size
        self.device = torch.device(device)
        self.ep_group = ep_group
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.max_seqs = max_num_seqs or DEFAULT_MAX_SEQS
        self.width = min(-(-(max_model_len or num_blocks * block_size) // block_size), num_blocks)  # blocks per sequence
        self.max_tokens = (max_num_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS) + self.max_seqs
        self.slots = SlotTable(self.max_seqs, self.width)
        self.inputs = StepInputs(max_seqs=self.max_seqs, max_tokens=self.max_tokens, width=self.width, device=self.device)
        self.routed = RoutedExpertsRecorder(model, self.max_tokens, self.device)
        self.extras = SamplingExtras(self.slots, self.inputs, model.spec.vocab_size, self.device)
        # ---- decode CUDA graphs (server/model/gpu/cuda_graphs.py): CUDA and a graph-safe
        # dispatcher, captured once here for batch buckets up to max_num_seqs over this rank's
        # step buffers (every EP rank captures the same ones); None keeps decode eager.
        self.decode_graphs = None
        capture = None
        if max_num_seqs and self.device.type == "cuda":
            from ..model.gpu.cuda_graphs import maybe_decode_graphs

            inputs = self.graph_inputs()

            def capture(record: bool = False):  # over this rank's step buffers, for the model's current policy
                if record:  # graphs that also write routed experts (routed_experts.py)
                    self.routed.arm()
                try:
                    return maybe_decode_graphs(model, self.kv_caches, max_batch=self.max_seqs,
                                               max_blocks_per_seq=self.width, inputs=inputs, enabled=cuda_graphs)
                finally:
                    self.routed.disarm()
            self.decode_graphs = capture()
        # a plan's `routing` switches the policy between steps; graphs follow (policy_switch.py)
        self.policies = PolicySwitch(model, capture, self.decode_graphs)
        #: None, or an object whose start() / stop() bracket each step's device work (the forward
        #: and the sampler, after the inputs are staged): the EP what-if times rank steps with it
        self.clock = None

    def graph_inputs(self):
        """The step buffers' device views, as the decode graphs read them (cuda_graphs.GraphInputs)."""
        from ..model.gpu.cuda_graphs import GraphInputs

        d, n = self.inputs.dev, self.max_seqs
        return GraphInputs(pool=self.inputs.pool, gather=d["gather"][:n], positions=d["positions"][:n],
                           slot_mapping=d["slot_mapping"][:n], block_tables=d["block_tables"],
                           context_lens=d["context_lens"], valid_rows=d["valid_rows"],
                           token_offset=d["token_offset"][0], logits_indices=d["logits_indices"])

    def bind_thread(self) -> None:
        """Make this rank's GPU current for the calling thread (the engine's step loop)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def run(self, plan: RankPlan) -> RankResult:
        """launch + wait (worker ranks, and the engine when it does not overlap)."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: RankPlan) -> PendingStep:
        result = RankResult(step=plan.step, rank=self.rank)
        if plan.warmup is not None:
            from .warmup import run_warmup

            result.warmup_s = run_warmup(self, plan.warmup)
        if plan.routing is not None:  # every rank in the same step; the counters start afresh with it
            self.decode_graphs = self.policies.switch(plan.routing)
            self.model.load_counters.reset()
            result.routing = repr(self.model.policy)
        batch = plan.batch
        self.slots.apply(batch.fills, batch.appends)
        self.extras.on_fills(batch.fills)
        pending = PendingStep(result)
        if plan.run_forward:
            pending = self._forward_and_sample(batch, plan, result)
        if plan.rebalance and self.model.eplb is not None:  # every rank at once: a collective
            result.rebalance = self.model.eplb.rebalance(self.ep_group)
        if plan.load_snapshot is not None:
            result.load = self.model.load_counters.snapshot(self.ep_group, reset=plan.load_snapshot)
        return pending

    # ---- one step ----
    def _bucket(self, batch: RankBatch, plan: RankPlan, graphs) -> tuple[int | None, bool]:
        """(decode-graph bucket of this step or None, whether this rank can replay it).

        With collectives in the graphs (EP) every rank takes the bucket of the plan's
        decode_batch, the same on all ranks, an idle rank included; a rank that cannot replay
        it runs the step eagerly padded to that bucket, so its collectives match the others'."""
        if graphs is None:
            return None, False
        decodes = batch.num_tokens == batch.num_seqs and bool(batch.samples.all())
        if graphs.lockstep:
            bucket = graphs.bucket_for(plan.decode_batch) if plan.decode_batch is not None else None
        else:
            bucket = graphs.bucket_for(batch.num_seqs) if decodes and batch.num_seqs else None
        return bucket, bucket is not None and decodes and graphs.can_replay(batch.num_seqs, bucket)

    def _forward_and_sample(self, batch: RankBatch, plan: RankPlan, result: RankResult) -> PendingStep:
        pending = self._run_step(batch, plan, result)
        if self.clock is not None:
            self.clock.stop()
        return pending

    def _run_step(self, batch: RankBatch, plan: RankPlan, result: RankResult) -> PendingStep:
        token_offset = plan.token_offset
        record = len(batch.routed_rows) > 0  # some request wants its routed experts (routed_experts.py)
        graphs = self.decode_graphs
        if record and graphs is not None and not graphs.lockstep:
            graphs = self.policies.recording_graphs()  # captured on first use, by this rank alone
        bucket, use_graph = self._bucket(batch, plan, graphs)
        prompt_rows = len(batch.prompt_lp_rows)  # prompt logprobs: extra logits rows (prompt chunks: never a graph)
        if record and graphs is not None and graphs.lockstep:
            # graphs with collectives are captured by every rank at once: a recording set cannot
            # be captured by one rank on demand, so this rank runs the step eagerly, padded to
            # the bucket (its collectives still match the other ranks')
            use_graph = False
        use_graph = use_graph and not prompt_rows
        ep_rows = bucket if bucket is not None else (plan.ep_rows or None)  # the common MoE row count
        if batch.num_seqs == 0 and not use_graph:
            empty = _empty(self.device, token_offset)
            empty.ep_rows = ep_rows
            if self.clock is not None:
                self.clock.start()
            self.model.forward(empty, self.kv_caches)  # joins the collectives
            return PendingStep(result)
        staged = self._stage(batch, token_offset, bucket if use_graph else None)
        if self.clock is not None:
            self.clock.start()
        routed = None
        if use_graph:
            logits = graphs.replay(batch.num_seqs, bucket)  # [S, V]
        else:
            eager = staged.forward_batch(self.inputs)
            if prompt_rows:  # rare: one more small copy for the prompt rows
                extra = torch.from_numpy(batch.prompt_lp_rows).to(self.device)
                eager.logits_indices = torch.cat([eager.logits_indices, extra])  # [R + P]
            eager.ep_rows = ep_rows
            if record:
                self.routed.arm()
            try:
                logits = self.model.forward(eager, self.kv_caches)  # [R, V]
            finally:
                self.routed.disarm()
        if record:
            routed = self.routed.gather(batch.routed_rows)  # [rows, L, k] int16
        d, r, n = self.inputs.dev, staged.num_samples, staged.num_hot
        extras, extra_out = staged.extras, {}
        if extras.record:  # penalty counts take this step's input tokens before anything samples
            self.extras.record(extras, staged.input_ids(self.inputs), staged.num_seqs)
        if prompt_rows:
            targets = torch.from_numpy(batch.prompt_lp_targets).to(self.device)  # [P]
            extra_out["prompt_logprobs"], extra_out["prompt_top_ids"], extra_out["prompt_top_logprobs"] = \
                prompt_logprobs(logits[r:], targets)
            logits = logits[:r]
        if staged.num_samples == 0:
            if extra_out:
                return pending_step(self.device, result, None, None, routed, extra_out)
            return PendingStep(result, routed=routed, event=event_after(self.device) if routed is not None else None)
        params = SamplingBatch(temperature=d["temperature"][:n], top_p=d["top_p"][:n], top_k=d["top_k"][:n],
                               keys=d["keys"][:n], want_logprobs=staged.flags.want_logprobs,
                               all_greedy=staged.flags.all_greedy, any_cut=staged.flags.any_cut,
                               hot_rows=d["hot_rows"][:n] if n < r else None,
                               **(self.extras.sampling_fields(extras, r, n) if extras is not NO_EXTRAS else {}))
        tokens, logprobs = sample(logits, params)  # [R] int64, [R] float32 | None
        d["next_token"].index_copy_(0, d["sample_slots"][:r], tokens)  # the next decode step's inputs
        if extras.top:
            extra_out["top_ids"], extra_out["top_logprobs"] = top_logprobs(logits)  # [R, K] each
        return pending_step(self.device, result, tokens, logprobs, routed, extra_out)

    def _stage(self, b: RankBatch, token_offset: int, bucket: int | None) -> "Staged":
        """Fill the host views for this step (numpy, per batch) and upload them in one copy.
        `bucket`: a decode-graph step padded to this many rows (else eager, no padding)."""
        h = self.inputs.host()
        s = b.num_seqs
        q = b.query_lens.astype(np.int64)  # [S]
        t = int(q.sum())
        if s > self.max_seqs or t > self.max_tokens:
            raise ValueError(f"step of {s} sequences / {t} tokens exceeds this rank's buffers "
                             f"({self.max_seqs} / {self.max_tokens}: engine.max_num_seqs, max_num_batched_tokens)")
        cu = np.zeros(s + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        ctx = b.start_pos + q  # [S]
        slots = b.slots.astype(np.int64)
        if t == s:  # every row decodes one token
            pos, tok_slots, dev_tok = b.start_pos, slots, b.from_device
        else:
            pos = np.arange(t, dtype=np.int64) + np.repeat(b.start_pos - cu[:-1], q)  # [T]
            tok_slots = np.repeat(slots, q)
            dev_tok = np.repeat(b.from_device, q)
        bs, tables = self.block_size, self.slots.block_tables
        n_explicit = len(b.tokens)
        h["explicit"][:n_explicit] = b.tokens
        gathered = bucket is not None or bool(b.from_device.any())
        if gathered:
            g = h["gather"][:t]
            g[~dev_tok] = self.max_seqs + np.arange(n_explicit, dtype=np.int64)  # pool index of explicit token j
            g[dev_tok] = tok_slots[dev_tok]  # the slot's last sampled token
        h["positions"][:t] = pos
        h["slot_mapping"][:t] = tables[tok_slots, pos // bs].astype(np.int64) * bs + pos % bs
        h["block_tables"][:s] = tables[b.slots]
        h["context_lens"][:s] = ctx
        h["cu_seqlens"][:s + 1] = cu
        h["token_offset"][0] = token_offset
        rows = np.flatnonzero(b.samples)
        r = len(rows)
        sample_slots = b.slots[rows]
        temp, top_p, top_k = self.slots.temperature[sample_slots], self.slots.top_p[sample_slots], self.slots.top_k[sample_slots]
        flags = SamplingFlags.of(temp, top_p, top_k, self.slots.logprobs[sample_slots])
        h["logits_indices"][:r] = cu[1:][rows] - 1
        h["sample_slots"][:r] = sample_slots
        num_hot = r
        if not flags.all_greedy:
            hot = temp > 0
            num_hot = int(hot.sum())
            pick = slice(None)
            if num_hot < r:  # draw only the rows that sample: parameters of those, in order
                pick = np.flatnonzero(hot)
                h["hot_rows"][:num_hot] = pick
            h["temperature"][:num_hot], h["top_p"][:num_hot], h["top_k"][:num_hot] = temp[pick], top_p[pick], top_k[pick]
            keys = sample_keys(self.slots.seed_keys[sample_slots[pick]], ctx[rows[pick]])  # keyed by (seed, position)
            h["keys"][:num_hot] = keys
        extras = self.extras.stage(h, b, rows, sample_slots, ctx, pick if not flags.all_greedy else slice(0, 0),
                                   num_hot if not flags.all_greedy else 0, not flags.all_greedy)
        rows_up = s
        if bucket is not None:  # graph padding rows (cuda_graphs.py), then 0..bucket-1 as logits rows
            h["gather"][s:bucket] = 0
            h["positions"][s:bucket] = 0
            h["slot_mapping"][s:bucket] = -1
            h["block_tables"][s:bucket, 0] = 0
            h["context_lens"][s:bucket] = 1
            h["valid_rows"][:s] = True
            h["valid_rows"][s:bucket] = False
            h["logits_indices"][:bucket] = np.arange(bucket)
            rows_up = bucket
        self.inputs.upload(rows_up)
        return Staged(s, t, r, q, ctx, gathered, token_offset, flags, num_hot, extras)


class Staged:
    """What `_stage` put in the step buffers (sizes and the host-side lists attention needs)."""

    def __init__(self, num_seqs, num_tokens, num_samples, query_lens, context_lens, gathered, token_offset, flags,
                 num_hot, extras=NO_EXTRAS) -> None:
        self.num_seqs, self.num_tokens, self.num_samples, self.num_hot = num_seqs, num_tokens, num_samples, num_hot
        self.query_lens, self.context_lens = query_lens, context_lens
        self.gathered, self.token_offset, self.flags, self.extras = gathered, token_offset, flags, extras

    def input_ids(self, inputs: StepInputs) -> torch.Tensor:
        """[T] int64 the step's input tokens on the device."""
        d, t = inputs.dev, self.num_tokens
        return inputs.pool.index_select(0, d["gather"][:t]) if self.gathered else d["explicit"][:t]

    def forward_batch(self, inputs: StepInputs) -> ForwardBatch:
        d, s, t = inputs.dev, self.num_seqs, self.num_tokens
        input_ids = self.input_ids(inputs)  # [T]
        return ForwardBatch(input_ids=input_ids, positions=d["positions"][:t], query_lens=self.query_lens.tolist(),
                            context_lens=self.context_lens.tolist(), block_tables=d["block_tables"][:s],
                            slot_mapping=d["slot_mapping"][:t], logits_indices=d["logits_indices"][:self.num_samples],
                            token_offset=self.token_offset, context_lens_dev=d["context_lens"][:s],
                            cu_seqlens_dev=d["cu_seqlens"][:s + 1])


def _empty(device: torch.device, token_offset: int) -> ForwardBatch:
    batch = ForwardBatch.empty(device)
    batch.token_offset = token_offset
    return batch
