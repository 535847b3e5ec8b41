"""Write a run's results and refresh the summary of every run in the same output folder.

  <out>/runs/<tag>.json     one run, everything measured (schema epserve-bench/1)
  <out>/<tag>_load.png      expert-load heatmap of that run (layers x experts, load / mean)
  <out>/summary.md          one table row per run in <out>/runs, with the commands
  <out>/summary.json        the same rows as data
  <out>/throughput.png      prefill and decode tok/s per run, transformers beside them

Each run rewrites the summary from all run files, so a multirun (or several invocations with
the same bench.out_dir) ends with one table covering all of them. `python -m server.bench.report
<out>` rebuilds it by hand.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = [  # (header, getter)
    ("run", lambda d: d["tag"]),
    ("model", lambda d: f'{d["model"]["name"]} ({d["model"]["layers"]} layers)'),  # shapes may be cut short
    ("device", lambda d: f'{d["device"].get("name", "?")} x{d["parallel"]["ep_size"]}'),
    ("policy", lambda d: _policy(d)),
    ("B x L -> O", lambda d: f'{d["workload"]["batch"]}x{d["workload"]["input_len"]}->{d["workload"]["output_len"]}'),
    ("prefill tok/s", lambda d: _num(d["epserve"]["prefill_tok_s"])),
    ("decode tok/s", lambda d: _num(d["epserve"]["decode_tok_s"])),
    ("small-batch decode tok/s", lambda d: _small(d)),
    ("MoE ms/layer prefill", lambda d: _num(d["moe_ms_per_layer"]["prefill_mean"], 3)),
    ("MoE ms/layer decode", lambda d: _num(d["moe_ms_per_layer"]["decode_mean"], 3)),
    ("decode x roofline", lambda d: _num((d.get("decode_roofline") or {}).get("x_roofline"), 2)),
    ("expert max/mean", lambda d: _num(d["load"]["expert_max_over_mean"], 2)),
    ("rank max/mean", lambda d: _num(d["load"]["rank_max_over_mean"], 2)),
    ("ranks/token", lambda d: _num(d["load"]["mean_ranks_per_token"], 2)),
    ("policy us (decode/prefill)", lambda d: f'{_num(d["policy_cost_us"]["decode"]["us"], 1)} / {_num(d["policy_cost_us"]["prefill"]["us"], 1)}'),
    ("HF prefill tok/s", lambda d: _num(d["hf"]["prefill_tok_s"]) if d.get("hf") else "-"),
    ("HF decode tok/s", lambda d: _num(d["hf"]["decode_tok_s"]) if d.get("hf") else "-"),
    ("x HF (prefill/decode)", lambda d: (f'{d["speedup_vs_hf"]["prefill"]:.2f} / {d["speedup_vs_hf"]["decode"]:.2f}'
                                          if d.get("speedup_vs_hf") else "-")),
]
SHORT = ["run", "model", "prefill tok/s", "decode tok/s", "small-batch decode tok/s", "MoE ms/layer decode",
         "decode x roofline", "expert max/mean",
         "rank max/mean", "x HF (prefill/decode)"]


def _num(x, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:,.{digits}f}"


def _policy(d: dict) -> str:
    r = d["routing"]
    extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "weights", "seed"))
    name = f'{r["name"]}({extra})' if extra else r["name"]
    eplb = d["parallel"].get("eplb")
    return f'{name} + EPLB R={eplb["redundant_experts"]}' if eplb else name


def _small(d: dict) -> str:
    s = d.get("small_batch")
    return f'{_num(s["decode_tok_s"])} (B={s["batch"]})' if s else "-"


def load_runs(out_dir: Path) -> list[dict]:
    runs = []
    for path in sorted((out_dir / "runs").glob("*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except ValueError as exc:
            log.warning("skipping unreadable run file %s: %s", path, exc)
    return sorted(runs, key=lambda d: d.get("created", ""))


def markdown_table(runs: list[dict], columns: list[str] | None = None) -> str:
    cols = [(h, g) for h, g in COLUMNS if columns is None or h in columns]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for d in runs:
        lines.append("| " + " | ".join(str(g(d)) for _, g in cols) + " |")
    return "\n".join(lines)


def write_summary(out_dir: Path) -> list[dict]:
    runs = load_runs(out_dir)
    rows = [{h: g(d) for h, g in COLUMNS} for d in runs]
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    parts = ["# epserve-bench static-mode results (kernel-level loop, not the served engine)", "",
             "Every figure below was measured by the command listed under it; transformers (HF) ran on the same",
             "weights and GPU in the same process. Decode tok/s counts B x (O-1) decode-step tokens; prefill tok/s",
             "counts B x L prompt tokens (prefill step incl. the first sampled token).", "",
             markdown_table(runs), "", "## Commands and settings", ""]
    for d in runs:
        e = d["epserve"]
        hf = d.get("hf") or {}
        parts.append(f'- `{d["tag"]}`: `{d["command"]}`  \n  device {d["device"].get("name")} x{d["parallel"]["ep_size"]}, '
                     f'torch {d["device"].get("torch")}, triton {d["device"].get("triton")}, transformers {d["device"].get("transformers")}; '
                     f'decode graphs: {e["graphs"]}; sync every step: {d["workload"]["sync_every_step"]}'
                     + (f'; HF cache {hf.get("cache")}, attention {hf.get("attn_implementation")}, experts '
                        f'{hf.get("experts_implementation")}, compile {hf.get("compile")}, first-token agreement '
                        f'{hf.get("first_token_agreement", float("nan")):.2f}' if hf else "")
                     + (f'; HF baseline FAILED: {d["hf_error"]}' if d.get("hf_error") else ""))
    (out_dir / "summary.md").write_text("\n".join(parts) + "\n")
    _throughput_png(runs, out_dir / "throughput.png")
    return runs


def write_run(doc: dict, out_dir: Path) -> Path:
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    path = out_dir / "runs" / f'{doc["tag"]}.json'
    path.write_text(json.dumps(doc, indent=1))
    _load_png(doc, out_dir / f'{doc["tag"]}_load.png')
    write_summary(out_dir)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # the numbers are in the JSON and markdown; say why the picture is missing
        log.warning("no PNG written (matplotlib unavailable: %s)", exc)
        return None
    return plt


def _load_png(doc: dict, path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    rows = doc["load"]["expert_tokens"]  # [layer][expert]
    norm = []
    for row in rows:
        mean = sum(row) / len(row) if row and sum(row) else 1.0
        norm.append([x / mean for x in row])
    fig, ax = plt.subplots(figsize=(max(6, len(rows[0]) / 12 if rows else 6), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(norm, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f'{doc["tag"]}: expert load / mean (max/mean {doc["load"]["expert_max_over_mean"]:.2f})', fontsize=9)
    ep = doc["parallel"]["ep_size"]
    if ep > 1 and rows:
        per = len(rows[0]) // ep
        for r in range(1, ep):
            ax.axvline(r * per - 0.5, color="cyan", linewidth=0.8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_png(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    if plt is None or not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(runs) + 4), 4.5))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        names = [d["tag"] for d in runs]
        ours = [d["epserve"][key] for d in runs]
        hf = [(d["hf"] or {}).get(key) if d.get("hf") else None for d in runs]
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="epserve")
        ax.bar([x + 0.2 for x in xs], [h or 0 for h in hf], width=0.4, label="transformers (same run)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(runs: list[dict], file=sys.stdout) -> None:
    print(markdown_table(runs, SHORT), file=file, flush=True)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out/bench")
    if not (folder / "runs").is_dir():
        print(f"no benchmark runs under {folder}/runs", file=sys.stderr)
        sys.exit(1)
    print_table(write_summary(folder))
