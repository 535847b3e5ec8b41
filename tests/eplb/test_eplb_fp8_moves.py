"""EPLB weight moves carry every tensor of an expert slot: for FP8 experts the e4m3 codes and
their float32 block scales, for value experts the weights as before. Over gloo at ep 2 and 4
a forced placement change that needs cross-rank transfers, copies between slots of one rank
and replicas must leave each slot holding exactly its new logical expert's bytes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.kernels.backend import KernelBackend
from server.moe.eplb.placement import ExpertPlacement
from server.moe.eplb.rebalance import ExpertRebalancer
from server.moe.eplb.replica_map import ReplicaMap
from server.moe.eplb.settings import EplbSettings
from server.moe.eplb.transfer import plan_layer_moves
from server.moe.experts import LocalExperts
from tests.helpers.ep_ranks import run_on_ranks

HIDDEN, INTER = 160, 128  # scales [ceil(2I/128), ceil(H/128)] = [2, 2] and [2, 1]: blocks off the edge too

# (num_experts, old slots, new slots) per ep size; every new placement needs cross-rank
# transfers, moves between slots of a rank and more than one copy of some expert.
CASES = {
    2: (4, (0, 1, 2, 3, 0, 1), (2, 3, 3, 1, 2, 0)),
    4: (6, (0, 1, 2, 3, 4, 5, 0, 1), (5, 5, 1, 0, 3, 2, 4, 0)),
}


def expert_bytes(e: int, j: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Tensor j of logical expert e, distinct for every (e, j): codes as bytes, floats as values."""
    n = shape.numel()
    if dtype == torch.float8_e4m3fn:  # bytes below 0x7e: finite e4m3 codes (0x7f is NaN)
        return ((torch.arange(n) + 31 * e + 7 * j) % 0x7e).to(torch.uint8).view(dtype).view(shape)
    return (e + j / 10 + torch.arange(n, dtype=torch.float32) / n).to(dtype).view(shape)


def build_experts(fmt: str, slots: tuple[int, ...], device: str = "cpu") -> LocalExperts:
    """LocalExperts in format `fmt` whose slot s holds logical expert slots[s]."""
    experts = LocalExperts(len(slots), HIDDEN, INTER, "silu", dtype=torch.bfloat16, device=device,
                           kernels=KernelBackend("torch", expert_weights=fmt))
    with torch.no_grad():
        for j, p in enumerate(experts.slot_tensors()):
            for s, e in enumerate(slots):
                p[s].copy_(expert_bytes(e, j, p.shape[1:], p.dtype))
    return experts


def holds(experts: LocalExperts, slots: tuple[int, ...]) -> bool:
    """Every slot's tensors are, byte for byte, those of its logical expert."""
    for j, p in enumerate(experts.slot_tensors()):
        for s, e in enumerate(slots):
            want = expert_bytes(e, j, p.shape[1:], p.dtype)
            if not torch.equal(p[s].cpu().view(torch.uint8), want.view(torch.uint8)):
                return False
    return True


def move_rank(rank: int, ep_size: int, fmt: str, device: str = "cpu") -> dict:
    """One rank: its experts under the old placement, moved by the rebalancer to the new one
    (device "cuda": rank r on cuda:r, the NCCL run of test_eplb_fp8_gpu.py)."""
    num_experts, old, new = CASES[ep_size]
    per = len(old) // ep_size
    dev = f"cuda:{rank}" if device == "cuda" else device
    experts = build_experts(fmt, old[rank * per:(rank + 1) * per], dev)
    placement = ExpertPlacement(num_experts, ep_size, (old,))
    ptrs = [p.data_ptr() for p in experts.slot_tensors()]
    model = SimpleNamespace(  # what ExpertRebalancer reads of a model
        placement=placement, ep_size=ep_size, ep_rank=rank, moe_experts=lambda: [experts],
        runtime=SimpleNamespace(replicas=ReplicaMap(placement, dev)),
        load_counters=SimpleNamespace(lifetime_expert_tokens=lambda: torch.zeros(1, num_experts, dtype=torch.int64)))
    rebalancer = ExpertRebalancer(model, EplbSettings(len(old) - num_experts, None, 0, "auto", 1, 1))
    changed, moved, local = rebalancer.apply(ExpertPlacement(num_experts, ep_size, (new,)))
    return {
        "counts": (changed, moved, local),
        "holds": holds(experts, new[rank * per:(rank + 1) * per]),
        "in_place": [p.data_ptr() for p in experts.slot_tensors()] == ptrs,
        "placement": model.placement.slots,
    }


def check_moves(ep_size: int, fmt: str, device: str = "cpu") -> None:
    num_experts, old, new = CASES[ep_size]
    moves = plan_layer_moves(old, new, ep_size)
    assert moves.num_transfers > 0 and moves.num_local_copies > 0 and len(set(new)) < len(new)
    results = run_on_ranks(move_rank, ep_size, fmt, device, backend="nccl" if device == "cuda" else "gloo")
    for r in results:
        assert r["holds"] and r["in_place"]
        assert r["counts"] == (1, moves.num_transfers, moves.num_local_copies)
        assert r["placement"] == (new,)


@pytest.mark.parametrize("fmt", ["fp8", "values"])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_rebalance_moves_codes_and_scales_to_every_slot(ep_size, fmt) -> None:
    check_moves(ep_size, fmt)


def test_a_slot_is_every_per_expert_tensor_and_its_bytes() -> None:
    fp8 = build_experts("fp8", (0, 1))
    names = [n for n, p in fp8.named_parameters() if any(p is t for t in fp8.slot_tensors())]
    assert names == ["gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv"]
    # codes: 1 byte each; scales: 4 bytes per 128x128 block
    assert fp8.bytes_per_slot == 2 * INTER * HIDDEN + HIDDEN * INTER + 4 * (2 * 2 + 2 * 1)
    values = build_experts("values", (0, 1))
    assert [t.shape for t in values.slot_tensors()] == [values.gate_up_proj.shape, values.down_proj.shape]
    assert values.bytes_per_slot == 2 * (3 * INTER * HIDDEN)  # bf16
