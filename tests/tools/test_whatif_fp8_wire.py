"""The EP what-if under parallel.dispatch_wire=fp8 (CPU): the all-gather's modelled bytes are the
FP8 row's (e4m3 codes plus a scale per 128 channels: about half a bf16 row), the return leg is
unchanged, the document and report say which wire they modelled, and the rows' quantise and
dequantise run inside each rank's measured local work (the probes' dispatcher packs FP8 rows).
A model whose hidden size the FP8 row cannot hold is refused naming the key."""
from __future__ import annotations

import json

import pytest
import torch

from server.bench.whatif.local_work import NoWireGatherDispatcher
from server.bench.whatif.wire import layer_wire_seconds, load_interconnect
from server.moe.dispatch.wire import wire_row_bytes

from .test_whatif_cli import _bench

#: random weights of a small Qwen3-MoE shape whose hidden size (96) is not whole 128-channel groups
ODD = ["model=qwen3_30b_a3b", "model.dtype=float32", "model.shape.vocab_size=256", "model.shape.hidden_size=96",
       "model.shape.num_hidden_layers=2", "model.shape.num_attention_heads=2", "model.shape.num_key_value_heads=1",
       "model.shape.head_dim=32", "model.shape.moe_intermediate_size=32", "model.shape.num_experts=16",
       "model.shape.num_experts_per_tok=2"]
RUN = ["bench.mode=whatif", "bench.batch=8", "bench.input_len=8", "bench.output_len=4", "bench.small_batch=0",
       "bench.whatif_reps=2", "bench.workload=lightllm", "parallel.ep_size=2", "bench.routing_source=trace",
       "bench.sweep=[]", "bench.whatif_decode_steps=1", "bench.policies=[natural]", "bench.eplb_redundant_per_rank=[]"]


def test_fp8_rows_halve_the_gather_and_leave_the_return_leg():
    link = load_interconnect("h100_nvswitch")
    hidden, k, rows, ep = 7168, 8, 256, 8
    bf16, fp8 = (wire_row_bytes(w, hidden, k, torch.bfloat16) for w in ("bf16", "fp8"))
    assert (bf16, fp8) == (14400, 7456)
    returned = link.seconds("all_to_all", ep, ep * rows * hidden * 2)
    for wire, row in (("bf16", bf16), ("fp8", fp8)):
        want = link.seconds("all_gather", ep, ep * rows * row) + returned
        assert layer_wire_seconds(link, ep, rows, hidden, k, torch.bfloat16, wire) == pytest.approx(want)
    assert NoWireGatherDispatcher(ep, 32, "fp8").wire == "fp8"


def test_whatif_models_the_wire_it_is_asked_for(tmp_path):
    docs = {}
    for wire in ("bf16", "fp8"):
        res = _bench(tmp_path / wire, "model=tiny", *RUN, f"parallel.dispatch_wire={wire}")  # hidden 128
        assert res.returncode == 0, res.stderr[-3000:]
        files = sorted((tmp_path / wire / "whatif").iterdir())
        docs[wire] = json.loads(next(f for f in files if f.suffix == ".json").read_text())
        assert docs[wire]["dispatch_wire"] == wire
        assert f"hidden rows as {wire} on the all-gather" in next(f for f in files if f.suffix == ".md").read_text()
    for phase, by_variant in docs["fp8"]["phases"].items():
        fp8, bf16 = by_variant["natural"]["breakdown_ms"]["wire"], docs["bf16"]["phases"][phase]["natural"]["breakdown_ms"]["wire"]
        assert 0 < fp8 < bf16, phase  # the tiny model's float32 rows: 4H + 8k bytes against H + H/32 + 8k


def test_fp8_wire_needs_a_hidden_size_of_whole_scale_groups(tmp_path):
    res = _bench(tmp_path, *ODD, *RUN, "parallel.dispatch_wire=fp8")
    assert res.returncode != 0
    assert "parallel.dispatch_wire=fp8" in res.stderr and "hidden_size 96 is not a multiple of 128" in res.stderr
