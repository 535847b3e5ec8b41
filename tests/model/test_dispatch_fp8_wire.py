"""The fixed-capacity dispatch with FP8 rows on the wire (parallel.dispatch_wire=fp8): the
pack/unpack round trip, the bytes per token row, and MoE outputs over real gloo ranks against
the bf16 wire.

Tolerance. e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half
a unit in the last place, 2^-4 of the power of two below it, so at most 2^-4 of the value; with
the group's max scaled to 448, values that land among the subnormals (spacing 2^-9 of the
scale) move by at most 2^-10 * scale. Through an expert, gate and up are each linear in the
quantised row and are multiplied, so a token's output moves by about twice its input's
relative error: each token's ||fp8 - bf16|| / ||bf16|| must stay under 2 * 2^-4 = 2^-3, and
above 2^-7, which rounding the row to bf16 alone (2^-9 per element) stays under: an fp8 wire
that quietly sent the unquantised row fails it.
"""
from __future__ import annotations

import pytest
import torch

from server.kernels.fp8_blocks import E4M3_MAX
from server.moe.dispatch import DispatchSettings, build_dispatcher, wire_row_bytes
from server.moe.dispatch.fp8_rows import Fp8TokenRows, quantize_groups
from tests.helpers.ep_ranks import run_on_ranks
from tests.helpers.wire_worker import HIDDEN, ROWS, TOP_K, wire_rank

HALF_ULP = 2.0 ** -4  # e4m3: relative rounding error of a normal value
SUBNORMAL_HALF_STEP = 2.0 ** -10  # e4m3: absolute rounding error among subnormals, in units of the scale


def _ceil16(n: int) -> int:
    return -(-n // 16) * 16


def _rows() -> torch.Tensor:
    """[6, 256] rows: N(0, 1), one ~1e4 times larger, one with an all-zero group, one tiny."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 256, generator=g)
    x[1] *= 1e4
    x[2, 128:] = 0
    x[3] *= 1e-6
    return x


def test_fp8_rows_round_trip_within_e4m3_rounding() -> None:
    x = _rows()
    layout = Fp8TokenRows(256, torch.float32, TOP_K)
    ids = torch.arange(6 * TOP_K, dtype=torch.int32).view(6, TOP_K)
    weights = torch.rand(6, TOP_K)
    buf = layout.pack(x, ids, weights, rows=8)  # 2 padding rows
    hidden, got_ids, got_weights = layout.unpack(buf)
    _, scales, _, _ = layout.fields(buf)
    assert buf.shape == (8, layout.row_bytes) and hidden.dtype == torch.float32
    assert torch.isfinite(scales).all() and (scales[:6] > 0).all(), scales  # the zero group: tiny, not 0 or NaN
    assert torch.equal(hidden[2, 128:], torch.zeros(128))  # a zero group comes back exactly zero
    bound = HALF_ULP * x.abs() + SUBNORMAL_HALF_STEP * scales[:6].repeat_interleave(128, dim=1)
    assert ((hidden[:6] - x).abs() <= bound * (1 + 1e-6)).all()
    assert (hidden[:6] != x).any()  # it was rounded to e4m3, not carried through
    assert (hidden[1].abs().max() / x[1].abs().max() - 1).abs() < 1e-6  # the max maps onto 448 exactly
    assert torch.equal(got_ids[:6], ids) and torch.equal(got_weights[:6], weights)
    assert (got_ids[6:] == -1).all() and torch.equal(hidden[6:], torch.zeros(2, 256))  # padding: zero, not NaN
    # the bound is tight enough to catch a broken scale: each row read with the other group's scale
    codes, _, _, _ = layout.fields(buf)
    swapped = codes[:6].float().view(6, 2, 128) * scales[:6].flip(1)[:, :, None]
    assert not ((swapped.view(6, 256) - x).abs() <= bound * (1 + 1e-6)).all()


def test_fp8_rows_are_the_expert_paths_activation_quantisation() -> None:
    """Bit for bit the FP8 GEMM's own activation codes and scales, so it could read them as sent."""
    pytest.importorskip("triton")
    from server.moe.kernels.fp8_quant import quantize_rows_reference

    x = _rows().to(torch.bfloat16)
    codes, scales = quantize_groups(x)
    want_codes, want_scales = quantize_rows_reference(x)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scales, want_scales)
    assert codes.float().abs().amax(dim=1).eq(E4M3_MAX).all()


def test_row_bytes_per_wire() -> None:
    """bf16: ceil16(2H + 8k); fp8: ceil16(H + 4H/128 + 8k), about half at served sizes (the
    ids, weights and scales weigh more in a tiny row)."""
    for hidden, k in ((7168, 8), (2048, 8), (4096, 8), (128, 2)):
        bf16, fp8 = wire_row_bytes("bf16", hidden, k), wire_row_bytes("fp8", hidden, k)
        assert (bf16, fp8) == (_ceil16(2 * hidden + 8 * k), _ceil16(hidden + hidden // 32 + 8 * k))
        assert fp8 < (0.53 if hidden >= 2048 else 0.6) * bf16
    assert (wire_row_bytes("bf16", 7168, 8), wire_row_bytes("fp8", 7168, 8)) == (14400, 7456)  # DeepSeek-V3
    assert wire_row_bytes("bf16", 2048, 8, torch.float32) == 8256  # the bf16 wire sends the activation dtype as is
    with pytest.raises(ValueError, match="multiple of 128"):
        wire_row_bytes("fp8", 192, 8)
    with pytest.raises(ValueError, match="unknown dispatch wire 'fp4'"):
        wire_row_bytes("fp4", 256, 8)


def test_the_settings_choose_the_wire() -> None:
    assert build_dispatcher(DispatchSettings("allgather", wire="fp8"), 0, 2, 8).wire == "fp8"
    assert build_dispatcher(DispatchSettings("auto", wire="fp8"), 0, 2, 8).fixed.wire == "fp8"
    assert build_dispatcher(DispatchSettings("allgather"), 0, 2, 8).wire == "bf16"
    with pytest.raises(ValueError, match="dispatch wire must be one of .*'fp16'"):
        DispatchSettings("allgather", wire="fp16")


@pytest.mark.parametrize("ep", [2, 4])
def test_fp8_wire_moe_outputs_match_the_bf16_wire(ep: int) -> None:
    """Real gloo ranks, uneven tokens (one rank has none), a large-magnitude token and a token
    with an all-zero group; fp32 and bf16 activations. The bf16 wire equals the local path (to
    the activation dtype's rounding); the fp8 wire is within the e4m3 bound of it (module
    docstring) and all-gathers the bytes of ROWS fp8 rows: 288 per token against 544 for bf16
    activations (1056 for fp32 ones)."""
    fp8_bytes = ROWS * _ceil16(HIDDEN + 4 * HIDDEN // 128 + 8 * TOP_K)
    for rank, result in enumerate(run_on_ranks(wire_rank, ep)):
        for dtype, r in result.items():
            where = f"ep {ep}, rank {rank}, {dtype}"
            exact = 1e-6 if dtype == "torch.float32" else 2.0 ** -7  # bf16 experts: the local path sums in another order
            assert all(e < exact for e in r["bf16_vs_local"]), (where, r["bf16_vs_local"])
            assert r["finite"] and all(2.0 ** -7 < e < 2 * HALF_ULP for e in r["fp8_vs_bf16"]), (where, r["fp8_vs_bf16"])
            itemsize = 4 if dtype == "torch.float32" else 2
            assert r["bytes"] == {"bf16": [ROWS * _ceil16(itemsize * HIDDEN + 8 * TOP_K)], "fp8": [fp8_bytes]}, where
        assert len(result["torch.float32"]["fp8_vs_bf16"]) == [5, 0, 11, 7][rank]
