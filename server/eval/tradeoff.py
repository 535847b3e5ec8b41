"""The balance / quality trade-off as one picture: held-out perplexity against rank max/mean.

Why a curve: "balance costs quality" is not one number. Natural routing sits at the imbalanced,
accurate end; rank_balanced at growing tolerances walks from exact rank balance towards it;
optimal_balanced, greedy_balanced and round_robin_balanced sit at exact balance with more and
more of the router thrown away. The picture shows where each policy lands, so a user can pick
the point their step time and their quality budget allow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: policies drawn as the curve (in order of rank max/mean), the rest as labelled points
CURVE = ("natural", "rank_balanced")


#: parameters that move a rank_balanced point off the tolerance curve (drawn as points instead)
OFF_CURVE = ("keep_bonus", "expert_cap")


def curve_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """natural and rank_balanced rows that differ in tolerance only, from most to least balanced."""
    points = [r for r in rows if r["policy"].split("(")[0] in CURVE and not any(k in r["policy"] for k in OFF_CURVE)]
    return sorted(points, key=lambda r: r["rank_max_over_mean"])


def write_tradeoff_png(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(15, 6))
    fig.subplots_adjust(left=0.06, right=0.64, top=0.88, bottom=0.1)
    curve = curve_points(rows)
    if curve:
        ax.plot([r["rank_max_over_mean"] for r in curve], [r["perplexity"] for r in curve], "-o", color="tab:blue",
                label="natural and rank_balanced (tolerance 0 ... 0.5)")
    key = []  # numbered points, named in a box beside the plot (names are too long to print at the points)
    for number, r in enumerate(rows, 1):
        in_curve = any(r is c for c in curve)
        x, y = r["rank_max_over_mean"], r["perplexity"]
        ax.plot(x, y, "o" if in_curve else "s", color="tab:blue" if in_curve else "tab:red")
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 3 if number % 2 else -9), fontsize=8)
        key.append(f"{number}  {r['policy']}: perplexity {y:.2f}, fidelity {r['fidelity']:.2f}, rank max/mean {x:.2f}")
    fig.text(0.66, 0.5, "\n".join(key), fontsize=7, va="center", family="monospace")
    ax.set_yscale("log")
    ax.set_xlabel("rank max/mean load (1.0 = every EP rank equally busy; a step waits for the busiest)")
    ax.set_ylabel("held-out perplexity (log scale; lower is better)")
    ax.set_title("balance against quality\n" + title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
