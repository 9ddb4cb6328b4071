"""PNG plots of a setting: per-component accuracy as a layer x kind heatmap, and the greedy path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selproj_plugin.components import KINDS  # noqa: E402
from selproj_plugin.strategies.base import StrategyResult  # noqa: E402
from selproj_plugin.strategies.single import per_component_accuracy  # noqa: E402
from selproj_plugin.table import ComponentTable  # noqa: E402


def component_heatmap(table: ComponentTable, path: Path, title: str) -> Path:
    """Accuracy of each component alone; rows are layers, columns kinds (non-layer components on top)."""
    acc = per_component_accuracy(table)
    kinds = [k for k in KINDS if k in set(table.kinds)]
    layers = sorted({int(l) for l in table.layers})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for a, kind, layer in zip(acc, table.kinds, table.layers):
        r, c = layers.index(int(layer)), kinds.index(str(kind))
        grid[r, c] = a if np.isnan(grid[r, c]) else max(grid[r, c], a)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(kinds), 1.0 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), ["-" if l < 0 else str(l) for l in layers])
    ax.set_xlabel("component kind")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="top-1 accuracy alone")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def greedy_path(results: Mapping[str, StrategyResult], baselines: Mapping[str, float], path: Path, title: str) -> Path:
    """Accuracy along each greedy path against the fraction of parameters, with reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, result in results.items():
        if result.path:
            x = [step["param_fraction"] for step in result.path]
            y = [step["accuracy"] for step in result.path]
            ax.plot(x, y, marker="o", label=f"{name} path")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for name, result in results.items():
        if not result.path:
            ax.axhline(result.accuracy, linestyle=next(styles, "--"), color="gray", label=f"{name} ({result.accuracy:.3f})")
    for name, value in baselines.items():
        ax.axhline(value, linestyle=":", color="black" if name == "bm25" else "lightgray", label=f"{name} ({value:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of parameters selected")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
