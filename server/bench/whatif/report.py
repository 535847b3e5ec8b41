"""Write a what-if run: JSON, a Markdown table, a PNG.

  <out>/whatif/<tag>.json   the document (document.py)
  <out>/whatif/<tag>.md     what was measured and modelled, then one row per phase and variant
  <out>/whatif/<tag>.png    x natural per variant and phase, and each step's time split into
                            local work, experts (mean rank), waiting for the slowest rank's
                            experts, and the wire

`python -m server.bench.whatif.report <json>` rewrites the table and the picture from a JSON.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = ("| phase | variant | tok/s | x natural | step ms | local / experts / wire ms | waiting for stragglers | "
          "rank max/mean | in-rank expert max/mean | active experts per rank | balance ceiling | linear bound |")
PHASE_ORDER = ("prefill", "decode", "small_decode")


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _phases(doc: dict) -> list[str]:
    names = [p for p in doc["phases"] if not p.endswith("prefill") or p == "prefill"]
    return sorted(names, key=lambda p: (PHASE_ORDER.index(p) if p in PHASE_ORDER else len(PHASE_ORDER), p))


def step_parts(s: dict) -> dict[str, float]:
    """A phase summary's mean step (ms) in parts that add up: local work and experts at the
    mean rank, the waits for the slowest ranks of each, the wire, and what a launch-bound host
    adds beyond the GPUs' chain (eager steps)."""
    steps = max(s["time_ms"] / max(s["step_ms"], 1e-12), 1e-12)
    b = s["breakdown_ms"]
    expert_wait = s["time_ms"] - s["time_ms"] / s["ceiling_speedup"]
    local_wait = s["straggler_ms"] - expert_wait
    return {"local": (b["local"] - local_wait) / steps, "local_wait": local_wait / steps,
            "experts": (b["experts"] - expert_wait) / steps, "expert_wait": expert_wait / steps,
            "wire": b["wire"] / steps, "host_excess": b.get("host_excess", 0.0) / steps}


def markdown(doc: dict) -> str:
    m = doc["model"]
    lines = [f"### EP what-if: {m['name']} ({m['moe_layers']} MoE layers of {m['layers']}, {m['experts']} experts "
             f"top-{m['top_k']}) at EP{doc['ep_size']}, emulated on one {doc['device']}", "",
             f"Routing: {doc['routing_source']}. Dispatch: {doc['dispatch']} "
             f"(decode {'in CUDA graphs' if doc['decode_graphs'] else 'eager'}). "
             f"Expert weights: {m.get('expert_weights', m['dtype'])}. "
             f"Wire: {doc['interconnect']['name']} ({doc['interconnect']['source'].rsplit('/', 1)[-1]}), "
             f"hidden rows as {doc.get('dispatch_wire', 'bf16')} on the all-gather.",
             "", "Measured: " + "; ".join(doc["measured"]) + ".", "", "Modelled: " + "; ".join(doc["modelled"]) + ".",
             "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for phase in _phases(doc):
        for label, s in doc["phases"][phase].items():
            part = step_parts(s)
            active = s["active_experts_per_rank"]
            lines.append(" | ".join([
                f"| {phase}", label, f"{s['tok_s']:,.0f}", _f(s.get("x_natural"), 3), _f(s["step_ms"], 3),
                f"{part['local'] + part['local_wait']:.2f} / {part['experts'] + part['expert_wait']:.2f} / "
                f"{part['wire']:.2f}" + (f" (+{part['host_excess']:.2f} host)" if part["host_excess"] > 0.005 else ""),
                f"{s['straggler_share'] * 100:.1f}%", _f(s["rank_max_over_mean"]), _f(s["in_rank_expert_max_over_mean"]),
                f"{min(active):.1f}-{max(active):.1f}" if active else "-", _f(s["ceiling_speedup"], 3),
                _f(s["linear_bound"], 3) + " |"]))
    lines += ["", "Critical path under natural routing (the rank whose experts finish last, by the number of MoE "
              "layers it holds up, and the step's time spent waiting for the slowest rank):", ""]
    for phase in _phases(doc):
        s = doc["phases"][phase].get("natural")
        if s is None:
            continue
        counts: dict = {}
        for layer in s["critical_path"]:
            counts[layer["rank"]] = counts.get(layer["rank"], 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        ranks = ", ".join(f"rank {r} ({n} of {len(s['critical_path'])} layers)" for r, n in top)
        lines.append(f"- {phase}: {ranks}; waiting {s['straggler_share'] * 100:.1f}% of the step")
    if doc.get("validation"):
        lines += ["", "Validation against the real engine at ep_size 1 (same sets, same process; the engine's "
                  "step device time from the same clock, its wall time per step beside it):", "",
                  "| phase | engine step ms | predicted step ms | predicted / engine | engine local ms (experts out) "
                  "| predicted local ms | engine experts ms | predicted experts ms | engine wall ms per step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for phase, v in doc["validation"].items():
            lines.append(f"| {phase} | {v['engine_step_ms']:.3f} | {v['predicted_step_ms']:.3f} | "
                         f"{v['predicted_over_engine']:.3f} | {v['engine_local_ms']:.3f} | {v['predicted_local_ms']:.3f} | "
                         f"{v['engine_experts_ms']:.3f} | {v['predicted_experts_ms']:.3f} | {v['engine_wall_step_ms']:.3f} |")
    if doc.get("self_check"):
        lines += ["", "Self-check, the busiest rank's expert kernel against the bare fused-MoE op on the same rows:", ""]
        for c in doc["self_check"]:
            lines.append(f"- {c['phase']} step {c['step']}, rank {c['rank']}, {c['rows']} rows: what-if "
                         f"{c['whatif_ms']:.4f} ms, standalone {c['standalone_ms']:.4f} ms in its own graph "
                         f"({c.get('standalone_eager_ms', float('nan')):.4f} ms eagerly)")
    lines += ["", f"{doc['cost']['expert_shapes_timed']} expert-kernel shapes timed in {doc['cost']['wall_s']:.0f} s. "
              f"Command: `{doc['command']}` ({doc['date']})."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log.warning("no PNG written (matplotlib unavailable: %s)", exc)
        return False
    phases = _phases(doc)
    fig, axes = plt.subplots(2, len(phases), figsize=(4.5 * len(phases), 7), squeeze=False)
    for col, phase in enumerate(phases):
        rows = doc["phases"][phase]
        labels = list(rows)
        ax = axes[0][col]
        ax.bar(range(len(labels)), [rows[v].get("x_natural") or 0 for v in labels], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{phase}: x natural (EP{doc['ep_size']})")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax = axes[1][col]
        bottom = [0.0] * len(labels)
        parts = [step_parts(rows[v]) for v in labels]
        for part, color in (("local", "tab:gray"), ("experts", "tab:green"), ("local_wait", "tab:pink"),
                            ("expert_wait", "tab:red"), ("wire", "tab:orange")):
            vals = [p[part] for p in parts]
            ax.bar(range(len(labels)), vals, bottom=bottom, color=color, label=part.replace("_", " "))
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_title(f"{phase}: ms per step")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        if col == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{doc['model']['name']} EP{doc['ep_size']} what-if: {doc['routing_source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_whatif_run(doc: dict, out_dir: Path, tag: str) -> dict[str, Path]:
    folder = Path(out_dir) / "whatif"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{tag}.json", "md": folder / f"{tag}.md", "png": folder / f"{tag}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["md"].write_text(markdown(doc))
    if not plot(doc, paths["png"]):
        del paths["png"]
    return paths


if __name__ == "__main__":
    src = Path(sys.argv[1])
    document = json.loads(src.read_text())
    print(markdown(document), end="")
    plot(document, src.with_suffix(".png"))
