"""Heatmaps of expert load (layer x expert), written with matplotlib's Agg backend: the counts
since the last reset, or those of a window of engine steps (load_window.py). The title names
the routing policy, and each EP rank's block of experts is marked and labelled."""
from __future__ import annotations

from pathlib import Path

from .load_window import LoadWindow
from .types import ExpertLoad


def plot_expert_load(load: ExpertLoad, path: str | Path, title: str = "", policy: str = "") -> Path:
    """Write a PNG heatmap of token counts per (MoE layer, expert); returns the path."""
    head = f"{policy}: " if policy else ""
    return _heatmap(load.matrix(), load.ep_size, path, title or (
        f"{head}expert load since reset: max/mean {load.expert_max_over_mean:.2f}, "
        f"rank max/mean {load.rank_max_over_mean:.2f} (ep_size {load.ep_size})"))


def plot_load_window(window: LoadWindow, path: str | Path, policy: str = "") -> Path:
    """Write a PNG heatmap of the assignments of one window of engine steps; returns the path."""
    return _heatmap(window.matrix(), window.ep_size, path, window_title(window, policy))


def window_title(window: LoadWindow, policy: str = "") -> str:
    balances = [b for b in window.rank_balancedness() if b is not None]
    rank = f", rank balancedness {sum(balances) / len(balances):.3f}" if balances else ""
    steps = f"step {window.last_step}" if window.steps == 1 else f"steps {window.first_step + 1}-{window.last_step}"
    return f"{policy + ': ' if policy else ''}expert load of engine {steps} ({window.steps} step(s)){rank}"


def _heatmap(matrix: list[list[int]], ep_size: int, path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not matrix:
        raise ValueError("no MoE layers to plot")
    layers, experts = len(matrix), len(matrix[0])
    fig, ax = plt.subplots(figsize=(min(max(6.0, experts * 0.12 + 2), 24.0), min(max(3.0, layers * 0.25 + 1.5), 18.0)))
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if ep_size > 1:  # rank boundaries, each block labelled with its rank
        per = experts // ep_size
        for r in range(ep_size):
            if r:
                ax.axvline(r * per - 0.5, color="white", linewidth=0.8)
            ax.text(r * per + per / 2 - 0.5, -0.6, f"rank {r}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title, pad=14 if ep_size > 1 else 6)
    fig.colorbar(image, ax=ax, label="tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
