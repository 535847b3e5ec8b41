"""Write an engine-mode run: JSON, a Markdown table, a PNG.

  <out>/balance/<tag>.json   everything measured (schema epserve-bench/balance-1)
  <out>/balance/<tag>.md     one row per phase and policy (the table BENCHMARKS.md carries)
  <out>/balance/<tag>.png    uplift over natural with its 95% CI per policy and phase, the
                             balance bound beside it; decode ratio over the per-rank batch sweep

`python -m server.bench.balance_report <json>` rewrites the table and the picture from a JSON.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PHASE_TITLES = {"prefill": "prefill", "decode": "decode", "small_decode": "small-batch decode", "e2e": "end to end"}
HEADER = ("| phase | policy | tok/s (median, 95% CI) | per GPU | x natural (95% CI) | spread | balancedness "
          "ranks avg / min | experts avg | pairs per rank | active experts per rank | bound | uplift / bound |")


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _row(phase: str, label: str, block: dict, bal: dict | None, baseline: bool) -> str:
    tok, ratio = block["tok_s"], block["ratio_to_natural"]
    lo, hi = tok["ci95"]
    rlo, rhi = ratio["ci95"]
    cells = [PHASE_TITLES.get(phase, phase), label, f'{tok["median"]:,.0f} [{lo:,.0f}, {hi:,.0f}]',
             f'{block["tok_s_per_gpu"]["median"]:,.0f}', f'{ratio["median"]:.3f} [{rlo:.3f}, {rhi:.3f}]',
             f'{tok["spread_rel"] * 100:.1f}%']
    if bal is None:
        cells += ["-"] * 6
    else:
        b = bal["balancedness"]
        cells += [f'{_f(b["rank"]["avg"])} / {_f(b["rank"]["min"])}', _f(b["expert"]["avg"]),
                  " ".join(f"{x:,.0f}" for x in bal["tokens_per_rank"]),
                  " ".join(f"{x:.1f}" for x in bal["active_experts_per_rank"]),
                  f'{bal["bound"]["speedup_bound"]:.3f}',
                  "(baseline)" if baseline else _f(bal["vs_bound"]["uplift_over_bound"])]
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict) -> str:
    dev = doc["device"]
    w = doc["workload"]
    lines = [f'# epserve-bench: what does balance buy ({doc["tag"]})', "",
             f'{dev["name"]} x{doc["parallel"]["ep_size"]}, {doc["model"]["name"]} ({doc["model"]["moe_layers"]} MoE layers, '
             f'{doc["model"]["experts"]} experts, top-{doc["model"]["top_k"]}, {doc["model"]["dtype"]}), workload '
             f'{w["kind"]}: B={w["batch"]}, prompt lengths {w["lengths"]["min"]}-{w["lengths"]["max"]} '
             f'({w["lengths"]["distinct"]} distinct, mean {w["lengths"]["mean"]:.1f}), {w["output_len"]} new tokens; '
             f'{w["repeats"]} interleaved repetitions after {w["warmup"]} warm-up (prefill: median of the full run and '
             f'{w["prefill_runs"]} prefill-only runs per round); decode graphs: {doc["engine"]["decode_graphs"]}.',
             f'Command: `{doc["command"]}`', "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for phase, per_policy in doc["phases"].items():
        for label, block in per_policy.items():
            lines.append(_row(phase, label, block, doc["balance"].get(phase, {}).get(label), label == doc["baseline"]))
    widths = [f'{label} {PHASE_TITLES[p]} {doc["phases"][p][label]["ratio_to_natural"]["ci_half_width_rel"] * 100:.1f}%'
              for label in doc["policies"] if label != doc["baseline"] for p in ("prefill", "decode") if p in doc["phases"]]
    if widths:
        lines += ["", "95% CI half-width of x natural (target <= 3% for prefill and decode): " + ", ".join(widths) + "."]
    lines += ["", "x natural: median of the per-repetition ratios (policy / natural, same round). Bound: the speed-up "
              "perfect rank balance could give natural in that phase (busiest rank's MoE time replaced by the mean "
              "rank's); uplift / bound: (x natural - 1) / (bound - 1), '-' where the bound allows no gain (ep 1)."]
    if doc.get("sweep"):
        batches = next(iter(doc["sweep"].values())).keys()
        lines += ["", "Decode tok/s over the per-rank batch (x natural):", "",
                  "| policy | " + " | ".join(f"b={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for label, points in doc["sweep"].items():
            lines.append(f"| {label} | " + " | ".join(
                f'{p["tok_s"]["median"]:,.0f} (x{p["ratio_to_natural"]["median"]:.3f})' for p in points.values()) + " |")
    served = doc.get("served")
    if served:
        lines += ["", f'Served through gRPC ({served["clients"]} client processes): end to end '
                  f'{served["served_tok_s"]["median"]:,.0f} tok/s vs in-process {served["in_process_tok_s"]["median"]:,.0f} '
                  f'tok/s: served / in-process = {served["ratio"]["ratio"]:.3f} '
                  f'[{served["ratio"]["ci95"][0]:.3f}, {served["ratio"]["ci95"][1]:.3f}]; TTFT p50 {served["ttft_p50_s"] * 1e3:.1f} ms.']
    return "\n".join(lines) + "\n"


def _png(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # the numbers are in the JSON and the table; say why the picture is missing
        log.warning("no PNG written (matplotlib unavailable: %s)", exc)
        return False
    phases = [p for p in ("prefill", "decode", "small_decode") if p in doc["phases"]]
    labels = [label for label in doc["policies"] if label != doc["baseline"]]
    fig, axes = plt.subplots(1, 2 if doc.get("sweep") else 1, figsize=(12 if doc.get("sweep") else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(phases))]
        ratio = [doc["phases"][p][label]["ratio_to_natural"] for p in phases]
        mid = [(r["median"] - 1) * 100 for r in ratio]
        err = [[(r["median"] - r["ci95"][0]) * 100 for r in ratio], [(r["ci95"][1] - r["median"]) * 100 for r in ratio]]
        ax.bar(xs, mid, width=width, yerr=err, capsize=3, label=label)
    for j, p in enumerate(phases):
        bound = doc["balance"].get(p, {}).get(doc["baseline"], {}).get("bound")
        if bound:
            ax.hlines((bound["speedup_bound"] - 1) * 100, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="balance bound" if j == 0 else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels([PHASE_TITLES[p] for p in phases])
    ax.set_ylabel("uplift over natural, % (95% CI)")
    ax.set_title(f'{doc["tag"]}: {doc["device"]["name"]} x{doc["parallel"]["ep_size"]}', fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if doc.get("sweep"):
        ax = axes[0][1]
        for label in doc["policies"]:
            points = doc["sweep"][label]
            ax.errorbar([int(b) for b in points], [p["ratio_to_natural"]["median"] for p in points.values()],
                        yerr=[[p["ratio_to_natural"]["median"] - p["ratio_to_natural"]["ci95"][0] for p in points.values()],
                              [p["ratio_to_natural"]["ci95"][1] - p["ratio_to_natural"]["median"] for p in points.values()]],
                        marker="o", capsize=2, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch per rank")
        ax.set_ylabel("decode tok/s / natural")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_balance_run(doc: dict, out_dir: Path) -> dict[str, Path]:
    folder = out_dir / "balance"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f'{doc["tag"]}.json', "md": folder / f'{doc["tag"]}.md', "png": folder / f'{doc["tag"]}.png'}
    paths["json"].write_text(json.dumps(doc, indent=1, allow_nan=False))
    paths["md"].write_text(markdown(doc))
    if not _png(doc, paths["png"]):
        paths.pop("png")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m server.bench.balance_report <run.json>", file=sys.stderr)
        sys.exit(2)
    run = json.loads(Path(sys.argv[1]).read_text())
    write_balance_run(run, Path(sys.argv[1]).parent.parent)
    print(markdown(run), end="")
