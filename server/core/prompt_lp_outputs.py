"""Prompt log-probabilities on their way from the ranks' results to the step's outputs.

A prompt's logprobs are computed chunk by chunk while it prefills (on the rank that runs it),
but go out once, with the sequence's first token: the caller gets them in one piece, and a
sequence cancelled mid-prefill never sends a partial set. Each sequence keeps what its chunks
produced (Sequence.prompt_lp_pending, and prompt_top_pending for its top-N) until then.
"""
from __future__ import annotations

from .step_io import StepOutputs


def collect(plan, results) -> None:
    """Hand each sequence its prompt logprobs (and top-N, if it asked) from the ranks' results."""
    for rank, owners in enumerate(plan.prompt_lp):
        if not owners:
            continue
        res = results[rank]
        values, top_ids, top_lps, at = res.prompt_logprobs, res.prompt_top_ids, res.prompt_top_logprobs, 0
        for seq, n in owners:
            if not seq.is_finished:
                seq.prompt_lp_pending.append(values[at:at + n])  # [n] float32
                if seq.request.top_logprobs and top_ids is not None:
                    k = seq.request.top_logprobs
                    seq.prompt_top_pending.append((top_ids[at:at + n, :k], top_lps[at:at + n, :k]))
            at += n


def add(out: StepOutputs, seq) -> None:
    """The column entries of `seq`, just appended to out.req_ids: its waiting prompt logprobs
    (None when none wait); the columns exist only once some sequence of the step has any."""
    if seq.prompt_lp_pending:
        if out.prompt_logprobs is None:
            out.prompt_logprobs = [None] * (len(out.req_ids) - 1)
            out.prompt_top_logprobs = [None] * (len(out.req_ids) - 1)
        out.prompt_top_logprobs.append(_take_tops(seq))
        out.prompt_logprobs.append(_take_values(seq))
    elif out.prompt_logprobs is not None:
        out.prompt_logprobs.append(None)
        out.prompt_top_logprobs.append(None)


def _take_values(seq) -> list[float]:
    values = [float(v) for part in seq.prompt_lp_pending for v in part.tolist()]
    seq.prompt_lp_pending = []
    return values


def _take_tops(seq) -> list | None:
    """[ids [P][N], logprobs [P][N]] of the prompt positions' top-N (None: the request asked none)."""
    if not seq.prompt_top_pending:
        return None
    ids = [row for part, _ in seq.prompt_top_pending for row in part.tolist()]
    lps = [row for _, part in seq.prompt_top_pending for row in part.tolist()]
    seq.prompt_top_pending = []
    return [ids, lps]
