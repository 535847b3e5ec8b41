"""Token-to-expert alignment for the grouped GEMMs, on the GPU with no host sync.

The grouped GEMMs walk "sorted positions": every expert owns a run of positions padded up to
a multiple of BLOCK_M, so each M-block of BLOCK_M positions belongs to exactly one expert.
Position p holds `sorted_ids[p]`, the row it stands for (a top-k slot t*k+j for fused_moe,
or a dispatched row for the EP path), or the sentinel `num_rows` on padding.

All output sizes are upper bounds known from shapes alone (rows + min(E, rows)*(BLOCK_M-1)),
so nothing waits for the GPU, and the same code runs inside CUDA-graph capture. The order
inside an expert is the slot order (stable), so results are reproducible run to run.

Two kernels for fused_moe: per-chunk expert histograms, then a scatter in which every chunk
recomputes the (tiny) global prefix itself. A single chunk (<= 256 slots) skips the first.

Slot, chunk and block counts are not specialised (do_not_specialize): a step of any size
reuses the compiled kernel of its variant (`align_variant`: the constexprs chunk, single-chunk
and CHUNK_ROWS, which change only at a few thresholds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...kernels.workspace import workspace

COUNT_SUB = 32  # slots per one-hot tile inside a program ([SUB, E_PAD] int32)
BLOCKS_PER_STEP = 32  # M-blocks labelled per loop step ([32, E_PAD] compare tile)


@dataclass(frozen=True)
class Alignment:
    sorted_ids: torch.Tensor  # [max_padded] int32: row of each sorted position, num_rows on padding
    block_expert: torch.Tensor  # [max_blocks] int32: expert of each M-block, -1 past the end
    num_padded: torch.Tensor  # [1] int32: positions in use (a multiple of block_m)
    block_m: int
    num_rows: int  # sentinel value; rows are 0..num_rows-1

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on padded positions: each non-empty expert pads by at most block_m-1."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


@triton.jit
def _label_blocks(pad_end, block_expert_ptr, max_blocks, pid, nprog,
                  E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr):
    """block_expert[b] = first expert whose padded run ends past b*BLOCK_M (E -> -1)."""
    for b0 in range(pid * STEP, max_blocks, nprog * STEP):
        blocks = b0 + tl.arange(0, STEP)  # [STEP]
        ended = pad_end[None, :] <= blocks[:, None] * BLOCK_M  # [STEP, E_PAD]; padded lanes end at total
        expert = tl.sum(ended.to(tl.int32), axis=1)  # [STEP]
        expert = tl.where(expert >= E_PAD, -1, expert)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)


@triton.jit(do_not_specialize=["num_slots"])
def _count_chunks_kernel(ids_ptr, counts_ptr, num_slots, E,
                         CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """counts[chunk, e] = slots of this chunk routed to local expert e (ids outside [0,E) skip)."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):
        slots = pid * CHUNK + s0 + tl.arange(0, SUB)  # [SUB]
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
        hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)  # [SUB, E_PAD]
        total += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E_PAD + experts, total)


@triton.jit(do_not_specialize=["num_slots", "num_chunks", "max_blocks"])
def _scatter_slots_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                          num_slots, E, num_chunks, max_blocks,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr,
                          CHUNK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr, PAD_LANES: tl.constexpr,
                          SINGLE: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    if SINGLE:  # one chunk (pid 0, num_slots <= CHUNK): count here, no first kernel
        chunk_len = num_slots
        total = tl.zeros([E_PAD], dtype=tl.int32)
        for s0 in range(0, chunk_len, SUB):
            slots = s0 + tl.arange(0, SUB)
            ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
            hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)
            total += tl.sum(hit.to(tl.int32), axis=0)
        before = tl.zeros([E_PAD], dtype=tl.int32)
    else:  # global totals and this chunk's offset, CHUNK_ROWS chunk rows at a time (registers)
        total = tl.zeros([E_PAD], dtype=tl.int32)
        before = tl.zeros([E_PAD], dtype=tl.int32)
        for c0 in range(0, num_chunks, CHUNK_ROWS):
            chunks = c0 + tl.arange(0, CHUNK_ROWS)
            counts = tl.load(counts_ptr + chunks[:, None] * E_PAD + experts[None, :],
                             mask=chunks[:, None] < num_chunks, other=0)  # [CHUNK_ROWS, E_PAD]
            total += tl.sum(counts, axis=0)
            before += tl.sum(tl.where(chunks[:, None] < pid, counts, 0), axis=0)  # earlier chunks only
        chunk_len = CHUNK  # the last chunk runs masked tail steps
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD]
    pad_end = tl.cumsum(padded, axis=0)  # [E_PAD] inclusive
    pad_start = pad_end - padded
    base = pad_start + before  # first position of this chunk's slots, per expert

    for s0 in range(0, chunk_len, SUB):
        slots = pid * CHUNK + s0 + tl.arange(0, SUB)  # [SUB]
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
        hit = ((ids[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)  # [SUB, E_PAD]
        rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1  # [SUB] rank among this tile's same-expert slots
        pos = tl.sum(hit * base[None, :], axis=1) + rank
        tl.store(sorted_ptr + pos, slots, mask=rank >= 0)
        base += tl.sum(hit, axis=0)

    # Padding of every expert's run gets the sentinel; spread over programs by expert.
    mine = (experts[:, None] % num_chunks) == pid
    for l0 in tl.static_range(0, BLOCK_M, PAD_LANES):  # [E_PAD, PAD_LANES] tiles keep registers low
        pad_pos = pad_start[:, None] + total[:, None] + l0 + tl.arange(0, PAD_LANES)[None, :]
        tl.store(sorted_ptr + pad_pos, num_slots + 0 * pad_pos, mask=mine & (pad_pos < pad_end[:, None]))

    _label_blocks(pad_end, block_expert_ptr, max_blocks, pid, num_chunks, E_PAD, BLOCK_M, STEP)
    if pid == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))


def default_chunk(num_slots: int) -> int:
    """Slots per program: 256 up to 16K slots (several programs even at decode sizes, since a
    single program walks its chunk serially), growing to 1024 so the chunk count stays <= 64."""
    return min(1024, max(256, triton.next_power_of_2(triton.cdiv(num_slots, 64))))


def align_variant(num_slots: int, block_m: int, chunk: int | None = None) -> tuple[int, int, bool, int]:
    """The constexprs moe_align_block_size compiles for `num_slots` slots: (BLOCK_M, CHUNK,
    SINGLE, CHUNK_ROWS). Counts are not specialised, so this is all that selects a variant."""
    chunk = default_chunk(num_slots) if chunk is None else chunk
    num_chunks = max(1, triton.cdiv(num_slots, chunk))
    return block_m, chunk, num_chunks == 1, min(16, triton.next_power_of_2(num_chunks))


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None) -> Alignment:
    """Group the T*k slots of topk_ids [T, k] by local expert, padded per expert to block_m.

    Slots whose id is outside [0, num_experts) (-1: expert on another rank) are left out.
    Rows of the result are slot indices t*k + j; the sentinel is T*k.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got {tuple(topk_ids.shape)}")
    chunk = default_chunk(topk_ids.numel()) if chunk is None else chunk
    if chunk % COUNT_SUB or chunk <= 0:
        raise ValueError(f"chunk must be a positive multiple of {COUNT_SUB}, got {chunk}")
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()  # [N]
    num_slots = ids.numel()
    device = ids.device
    max_padded = max_padded_rows(num_slots, num_experts, block_m)
    max_blocks = max_padded // block_m
    sorted_ids = workspace((max_padded,), torch.int32, device)
    block_expert = workspace((max_blocks,), torch.int32, device)
    num_padded = workspace((1,), torch.int32, device)
    e_pad = triton.next_power_of_2(max(num_experts, 2))
    num_chunks = max(1, triton.cdiv(num_slots, chunk))
    _, _, single, chunk_rows = align_variant(num_slots, block_m, chunk)
    counts = ids  # unused placeholder pointer when SINGLE
    if num_chunks > 1:
        counts = workspace((num_chunks, e_pad), torch.int32, device)
        _count_chunks_kernel[(num_chunks,)](ids, counts, num_slots, num_experts,
                                            CHUNK=chunk, SUB=COUNT_SUB, E_PAD=e_pad)
    _scatter_slots_kernel[(num_chunks,)](
        ids, counts, sorted_ids, block_expert, num_padded, num_slots, num_experts, num_chunks, max_blocks,
        CHUNK=chunk, SUB=COUNT_SUB, E_PAD=e_pad, CHUNK_ROWS=chunk_rows, PAD_LANES=min(block_m, 32),
        BLOCK_M=block_m, STEP=BLOCKS_PER_STEP, SINGLE=single)
    return Alignment(sorted_ids, block_expert, num_padded, block_m, num_slots)


@triton.jit(do_not_specialize=["num_rows", "max_blocks"])
def _align_offsets_kernel(offsets_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                          num_rows, E, max_blocks,
                          E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr):
    """Program e lays out expert e's rows offsets[e]:offsets[e+1]; rows are already grouped."""
    e = tl.program_id(0)
    nprog = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + experts, mask=experts < E, other=0)
    hi = tl.load(offsets_ptr + experts + 1, mask=experts < E, other=0)
    count = hi - lo  # [E_PAD]
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    my_start = tl.sum(tl.where(experts == e, pad_end - padded, 0), axis=0)
    my_lo = tl.load(offsets_ptr + e)
    my_count = tl.load(offsets_ptr + e + 1) - my_lo
    lane = tl.arange(0, BLOCK_M)
    for i in range(0, my_count, BLOCK_M):
        rows = tl.where(i + lane < my_count, my_lo + i + lane, num_rows)
        tl.store(sorted_ptr + my_start + i + lane, rows)
    _label_blocks(pad_end, block_expert_ptr, max_blocks, e, nprog, E_PAD, BLOCK_M, STEP)
    if e == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))


def align_from_offsets(expert_offsets: torch.Tensor, num_rows: int, block_m: int) -> Alignment:
    """Alignment for rows already grouped by local expert (EP path): expert e owns rows
    offsets[e]:offsets[e+1]. Offsets are trusted (checked only by the torch twin)."""
    num_experts = expert_offsets.numel() - 1
    offsets = expert_offsets.to(torch.int32).contiguous()
    device = offsets.device
    max_padded = max_padded_rows(num_rows, num_experts, block_m)
    max_blocks = max_padded // block_m
    sorted_ids = workspace((max_padded,), torch.int32, device)
    block_expert = workspace((max_blocks,), torch.int32, device)
    num_padded = workspace((1,), torch.int32, device)
    _align_offsets_kernel[(num_experts,)](
        offsets, sorted_ids, block_expert, num_padded, num_rows, num_experts, max_blocks,
        E_PAD=triton.next_power_of_2(max(num_experts, 2)), BLOCK_M=block_m, STEP=BLOCKS_PER_STEP)
    return Alignment(sorted_ids, block_expert, num_padded, block_m, num_rows)
