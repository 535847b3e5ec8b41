"""Heatmap of expert load (layer x expert), written with matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path

from .types import ExpertLoad


def plot_expert_load(load: ExpertLoad, path: str | Path, title: str = "") -> Path:
    """Write a PNG heatmap of token counts per (MoE layer, expert); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = load.matrix()  # [layer][expert]
    if not matrix:
        raise ValueError("no MoE layers to plot")
    width = min(max(6.0, load.num_experts * 0.12 + 2), 24.0)
    height = min(max(3.0, load.num_layers * 0.25 + 1.5), 18.0)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if load.ep_size > 1:  # rank boundaries
        per = load.num_experts // load.ep_size
        for r in range(1, load.ep_size):
            ax.axvline(r * per - 0.5, color="white", linewidth=0.8)
    ax.set_title(title or f"expert load: max/mean {load.expert_max_over_mean:.2f}, "
                          f"rank max/mean {load.rank_max_over_mean:.2f} (ep_size {load.ep_size})")
    fig.colorbar(image, ax=ax, label="tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
