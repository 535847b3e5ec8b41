"""Fill an MoECausalLM from a checkpoint: every non-expert tensor by name, and only this rank's
experts, from either expert layout transformers uses:

  per-expert  {moe}.experts.{e}.{gate,up,down}_proj.weight   ([I, H], [I, H], [H, I]; Mixtral: w1, w3, w2)
  fused       {moe}.experts.gate_up_proj [E, 2I, H] and {moe}.experts.down_proj [E, H, I]
              (each run of consecutive held experts is read with get_slice, nothing else)

"This rank's experts" are model.local_expert_ids(layer): a block of E/ep_size, or with EPLB
the logical expert of each physical slot (copies of hot experts included).

`{moe}` is the family's MoE module name (`mlp`; Mixtral checkpoints say `block_sparse_moe`).
An FP8 block checkpoint reads the same way: its reader (fp8_reader.py) hands back each weight
dequantised, so nothing here knows how a tensor was stored, except where the experts themselves
are kept as FP8 blocks (LocalExperts.weight_format "fp8", server/model/expert_format.py): their
codes and scales are then copied as stored (_load_fp8_experts).
"""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from ..moe.experts import LocalExperts
from .causal_lm import MoECausalLM
from .checkpoint import CheckpointReader
from .families import get_family
from .fp8_dense import checkpoint_blocks, swap_fp8_linears
from .fp8_reader import Fp8BlockReader
from .spec import ModelLoadError

log = logging.getLogger(__name__)
_EXPERT_PARAMS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj",  # + block scales of FP8 experts:
                  ".mlp.experts.gate_up_proj_scale_inv", ".mlp.experts.down_proj_scale_inv")


def checkpoint_candidates(name: str, moe_module_names: tuple[str, ...]) -> list[str]:
    """Our parameter name -> checkpoint names to try, the family's preferred spelling first."""
    if ".mlp." not in name:
        return [name]
    return list(dict.fromkeys(name.replace(".mlp.", f".{m}.", 1) for m in moe_module_names))


def progress_options(progress: bool) -> dict:
    """tqdm options: a bar only where someone watches it. disable=None is tqdm's "off unless
    the stream is a TTY": its carriage returns would otherwise land in log files as junk (a
    plain log line says when loading is done instead). TQDM_DISABLE=1 silences it anyway."""
    return {"disable": None if progress else True}


def load_checkpoint_weights(model: MoECausalLM, reader: CheckpointReader, *, progress: bool = True,
                            dense_fp8: bool = False) -> None:
    """dense_fp8: keep the checkpoint's FP8 dense linears as e4m3 blocks (fp8_dense.py)."""
    family = get_family(model.spec.architecture)
    if dense_fp8 and isinstance(reader, Fp8BlockReader):
        blocks = checkpoint_blocks(reader, lambda n: checkpoint_candidates(n, family.moe_module_names))
        count = swap_fp8_linears(model, blocks, use_kernel=model.kernels.name == "triton")
        if progress:
            log.info("%d dense linears kept as FP8 blocks", count)
    params = dict(model.named_parameters())
    plain = [n for n in params if not n.endswith(_EXPERT_PARAMS)]
    moe_layers = [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers) if layer.is_moe]
    start = time.perf_counter()
    bar = tqdm(total=len(plain) + len(moe_layers), desc=f"loading weights (rank {model.ep_rank})",
               unit="tensor", leave=False, **progress_options(progress))
    with torch.no_grad():
        for name in plain:
            param = params[name]
            source = reader.find(checkpoint_candidates(name, family.moe_module_names))
            param.copy_(reader.read(source, expected=tuple(param.shape)))
            bar.update()
        for i, experts in moe_layers:
            ids = model.local_expert_ids(model.spec.moe_index(i))
            _load_experts(reader, experts, ids, i, family.moe_module_names, family.expert_proj_names, model.spec.num_experts)
            bar.update()
    bar.close()
    if progress:
        log.info("loaded %d tensors and the experts of %d MoE layers from %s in %.1f s", len(plain), len(moe_layers),
                 reader.folder, time.perf_counter() - start)
    model.expert_bytes_read = reader.bytes_read["expert"]
    _warn_unused(reader, model)


def _runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Slot ids -> (first slot, first expert, length) runs of consecutive experts."""
    runs: list[tuple[int, int, int]] = []
    for slot, e in enumerate(ids):
        if runs and e == runs[-1][1] + runs[-1][2] and slot == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, e, 1))
    return runs


def _load_experts(reader: CheckpointReader, experts: LocalExperts, ids: tuple[int, ...], layer: int,
                  moe_names: tuple[str, ...], proj_names: tuple[str, str, str], num_experts: int) -> None:
    """Fill slot s of `experts` with logical expert ids[s] of decoder layer `layer`."""
    if len(ids) != experts.num_local:
        raise ValueError(f"layer {layer}: {len(ids)} expert ids for {experts.num_local} slots")
    hidden, inter = experts.hidden, experts.intermediate
    prefixes = [f"model.layers.{layer}.{m}.experts" for m in moe_names]
    fused = next((p for p in prefixes if reader.has(f"{p}.gate_up_proj")), None)
    if experts.weight_format == "fp8":
        _load_fp8_experts(reader, experts, ids, fused, prefixes, proj_names, num_experts, layer)
        return
    if fused is not None:
        down = reader.find([f"{fused}.down_proj"])
        for slot, e0, n in _runs(ids):
            experts.gate_up_proj[slot:slot + n].copy_(
                reader.read_rows(f"{fused}.gate_up_proj", e0, e0 + n, (2 * inter, hidden), num_experts))
            experts.down_proj[slot:slot + n].copy_(reader.read_rows(down, e0, e0 + n, (hidden, inter), num_experts))
        return
    gate_name, up_name, down_name = proj_names
    e0 = ids[0]
    prefix = next((p for p in prefixes if reader.has(f"{p}.{e0}.{gate_name}.weight")), None)
    if prefix is None:
        raise ModelLoadError(
            f"checkpoint {reader.folder} has no experts for layer {layer}: looked for "
            f"{prefixes[0]}.gate_up_proj (fused) and {prefixes[0]}.{e0}.{gate_name}.weight (per expert)"
        )
    for local, e in enumerate(ids):
        names = [f"{prefix}.{e}.{p}.weight" for p in proj_names]
        gate, up, down = (reader.find([n]) for n in names)
        experts.gate_up_proj[local, :inter].copy_(reader.read(gate, (inter, hidden), category="expert"))
        experts.gate_up_proj[local, inter:].copy_(reader.read(up, (inter, hidden), category="expert"))
        experts.down_proj[local].copy_(reader.read(down, (hidden, inter), category="expert"))


def _load_fp8_experts(reader, experts: LocalExperts, ids: tuple[int, ...], fused: str | None, prefixes: list[str],
                      proj_names: tuple[str, str, str], num_experts: int, layer: int) -> None:
    """_load_experts for experts kept as FP8 blocks: codes and scales copied as stored. Separate
    gate and up weights stack into gate_up_proj, their scale rows too (whole 128-row blocks:
    expert_format.py takes fp8 only when I % 128 == 0)."""
    hidden, inter = experts.hidden, experts.intermediate
    w13, w13_s, w2, w2_s = experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.down_proj, experts.down_proj_scale_inv
    if fused is not None:
        down = reader.find([f"{fused}.down_proj"])
        for slot, e0, n in _runs(ids):
            codes, scales = reader.read_rows_codes(f"{fused}.gate_up_proj", e0, e0 + n, (2 * inter, hidden), num_experts)
            w13[slot:slot + n].copy_(codes)
            w13_s[slot:slot + n].copy_(scales)
            codes, scales = reader.read_rows_codes(down, e0, e0 + n, (hidden, inter), num_experts)
            w2[slot:slot + n].copy_(codes)
            w2_s[slot:slot + n].copy_(scales)
        return
    prefix = next((p for p in prefixes if reader.has(f"{p}.{ids[0]}.{proj_names[0]}.weight")), None)
    if prefix is None:
        raise ModelLoadError(f"checkpoint {reader.folder} has no experts for layer {layer} under {prefixes[0]}")
    if inter % 128:
        raise ModelLoadError(f"layer {layer}: FP8 experts stored as separate gate and up weights need an intermediate "
                             f"size that is a multiple of 128, got {inter}; set model.quantization=dequantize")
    split = inter // 128  # scale rows of the gate half
    for local, e in enumerate(ids):
        gate, up, down = (reader.find([f"{prefix}.{e}.{p}.weight"]) for p in proj_names)
        for rows, srows, name in ((slice(0, inter), slice(0, split), gate), (slice(inter, None), slice(split, None), up)):
            codes, scales = reader.read_codes(name, (inter, hidden))
            w13[local, rows].copy_(codes)
            w13_s[local, srows].copy_(scales)
        codes, scales = reader.read_codes(down, (hidden, inter))
        w2[local].copy_(codes)
        w2_s[local].copy_(scales)


def _beyond_last_layer(name: str, num_layers: int) -> bool:
    """model.layers.{i}.* with i >= num_layers: DeepSeek-V3's multi-token-prediction module(s)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers


def _warn_unused(reader: CheckpointReader, model: MoECausalLM) -> None:
    """Tensors nobody read, other than other ranks' experts, are reported (never silently dropped);
    layers past num_hidden_layers (speculative-decoding modules, not served) get one info line."""
    ignorable = ("rotary_emb.inv_freq",)
    left = reader.names - reader.consumed
    extra_layers = {n for n in left if _beyond_last_layer(n, model.spec.num_layers)}
    if extra_layers:
        log.info("checkpoint %s: skipping %d tensor(s) of layers >= num_hidden_layers=%d (not served)",
                 reader.folder, len(extra_layers), model.spec.num_layers)
    unused = sorted(
        n for n in left - extra_layers
        if ".experts." not in n and not n.endswith(ignorable)
        and not (n == "lm_head.weight" and model.spec.tie_word_embeddings)
    )
    if unused:
        log.warning("checkpoint %s has %d tensor(s) this model does not use: %s%s", reader.folder, len(unused),
                    ", ".join(unused[:8]), " ..." if len(unused) > 8 else "")
