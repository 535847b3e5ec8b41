"""The evaluation's outputs: a markdown table, a JSON file and a PNG (matplotlib, Agg)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = [
    ("policy", "policy", "{}"),
    ("perplexity", "held-out perplexity", "{:.3f}"),
    ("perplexity_vs_natural", "vs natural", "{:+.1%}"),
    ("fidelity", "fidelity", "{:.3f}"),
    ("expert_max_over_mean", "expert max/mean", "{:.3f}"),
    ("step_expert_max_over_mean", "expert max/mean per step", "{:.3f}"),
    ("rank_max_over_mean", "rank max/mean", "{:.3f}"),
    ("mean_ranks_per_token", "ranks per token", "{:.3f}"),
]


#: beside the policies that solve a capacitated top-k: the exact optimum of the same calls
OPTIMUM_COLUMNS = [
    ("policy", "policy", "{}"),
    ("fidelity", "fidelity", "{:.3f}"),
    ("optimum_fidelity", "exact optimum's fidelity", "{:.3f}"),
    ("objective_per_pair", "objective per pair", "{:.4f}"),
    ("optimum_objective_per_pair", "exact optimum per pair", "{:.4f}"),
    ("objective_gap", "gap (share of balance's cost)", "{:.2%}"),
    ("fallback_calls", "fallback calls", "{}"),
]


def _cell(fmt: str, value: Any) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" if key == "policy" else "---:" for key, _, _ in columns) + "|"
    body = ["| " + " | ".join(_cell(fmt, row[key]) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def optimum_table(rows: list[dict[str, Any]]) -> str:
    """The policies with an exact optimum beside them (empty string when there are none)."""
    solved = [row for row in rows if "optimum_fidelity" in row]
    return markdown_table(solved, OPTIMUM_COLUMNS) if solved else ""


def write_markdown(path: Path, rows: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    lines = [
        f"Held-out: {setup['scored_tokens']} bytes of the standard library ({setup['num_seqs']} windows of "
        f"{setup['seq_len']}), model `{setup['model']}`, ep_size {setup['ep_size']} (simulated), "
        f"{setup['seqs_per_rank']} sequences per rank per step ({setup['tokens_per_rank_call']} tokens per policy call).",
        "",
        markdown_table(rows),
        "Loads are (token, expert) assignments summed over the run (\"per step\": within each step), "
        "max/mean per MoE layer, averaged over layers. Fidelity: fraction of the router's own (token, expert) "
        "pairs the policy kept.",
        "",
        f"Balanced ceiling: no assignment with per-expert loads within ±1 in each policy call can keep more than "
        f"{rows[0]['balanced_fidelity_ceiling']:.3f} of the router's pairs on this text (per call, an expert takes at most "
        f"ceil(n*k/E) tokens). A rule that stays within ±1 at every prefix of the token walk, as greedy_balanced "
        f"(LightLLM's rule) does, can keep at most {rows[0]['walk_fidelity_ceiling']:.3f}.",
        "",
    ]
    if optimum_table(rows):
        lines += [
            "Capacity-solving policies against the exact optimum of the same calls (an LP per call, scipy): objective = "
            "summed selection scores (+ keep_bonus per router pair kept), per (token, expert) pair; gap = policy's "
            "shortfall below the optimum as a share of what balance costs (natural - optimum).",
            "",
            optimum_table(rows),
        ]
    path.write_text("\n".join(lines))


def write_json(path: Path, rows: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    path.write_text(json.dumps({"setup": setup, "policies": rows}, indent=1) + "\n")


def write_png(path: Path, rows: list[dict[str, Any]], natural_loads: list[list[int]] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    ppl = [r["perplexity"] for r in rows]
    bars = ax.bar(names, ppl, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylim(min(ppl) * 0.9, max(ppl) * 1.05)
    ax.set_title("held-out perplexity (lower is better; axis does not start at 0)")
    ax = axes[0, 1]
    ax.bar(names, [r["fidelity"] for r in rows], color="tab:green")
    ax.set_ylim(0, 1.05)
    ax.set_title("fidelity: router's (token, expert) pairs kept")
    ax = axes[1, 0]
    x = range(len(rows))
    width = 0.27
    for i, (key, label) in enumerate([("expert_max_over_mean", "expert, whole run"),
                                      ("step_expert_max_over_mean", "expert, per step"),
                                      ("rank_max_over_mean", "EP rank, whole run")]):
        ax.bar([xi + (i - 1) * width for xi in x], [r[key] for r in rows], width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), names)
    ax.set_title("load max/mean (1.0 = perfectly balanced)")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    if natural_loads:
        relative = [[v * len(row) / max(1, sum(row)) for v in row] for row in natural_loads]  # load / mean
        image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="load / mean load of the layer")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(relative)))
        ax.set_title("natural routing: load per layer and expert")
    else:
        ax.axis("off")
    for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
        a.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
