"""PNG plots of a setting: per-component accuracy as a layer x kind heatmap, and the greedy path with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmark.report import headline  # noqa: E402
from selproj_plugin.components import KINDS  # noqa: E402
from selproj_plugin.strategies.base import StrategyResult  # noqa: E402
from selproj_plugin.strategies.single import per_component_accuracy  # noqa: E402
from selproj_plugin.table import ComponentTable  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    """Every plot's file: laid out, written at one resolution, and the figure freed."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return _save(fig, path)


def greedy_path(results: Mapping[str, StrategyResult], baselines: Mapping[str, Any], path: Path, title: str) -> Path:
    """In-sample accuracy along each greedy path against the fraction of parameters (95% intervals as bars),
    its selection's held-out accuracy as a star, and the other strategies' headline accuracies and the
    baselines as lines with interval bands."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, result in results.items():
        if result.path:
            x = [step["param_fraction"] for step in result.path]
            y = np.array([step["accuracy"] for step in result.path])
            ci = np.array([step["accuracy_ci"] for step in result.path])
            bars = ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", capsize=3, label=f"{name} path")
            if result.heldout_accuracy is not None:  # the selection's held-out figure, the one to read
                held, (low, high) = result.heldout_accuracy, result.heldout_accuracy_ci
                ax.errorbar(
                    [result.param_fraction],
                    [held],
                    yerr=[[held - low], [high - held]],
                    marker="*",
                    markersize=12,
                    capsize=3,
                    linestyle="none",
                    color=bars.lines[0].get_color(),
                    label=f"{name} held-out ({held:.3f})",
                )
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    lines = [
        (f"{name} ({basis} {value:.3f})", value, interval, next(styles, "--"), "gray")
        for name, result in results.items()
        if not result.path
        for value, interval, basis in [result.headline]
    ]
    lines += [
        (f"{name} ({b.accuracy:.3f})", b.accuracy, b.accuracy_ci, ":", "black" if name == "bm25" else "lightgray")
        for name, b in baselines.items()
    ]
    for label, value, interval, style, color in lines:
        ax.axhline(value, linestyle=style, color=color, label=label)
        if interval is not None:
            ax.axhspan(interval[0], interval[1], color=color, alpha=0.12, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of parameters selected")
    ax.set_ylabel("top-1 accuracy (95% interval)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def accuracy_by_checkpoint(part: Mapping[str, Any], steps: list[int], path: Path, title: str) -> Path:
    """Each strategy's headline accuracy (held-out for fitted ones) at each checkpoint, with 95% intervals,
    and the TracIn rows (all checkpoints together) as lines at the right."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(steps))
    names = list(part["per_checkpoint"][0]["results"])
    for name in names:
        rows = [p["results"][name] for p in part["per_checkpoint"]]
        figures = [headline(r) for r in rows]
        y, ci = np.array([f[0] for f in figures]), np.array([f[1] for f in figures])
        ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", capsize=3, label=f"{name} ({figures[0][2]})")
    bm25 = [p["baselines"]["bm25"]["accuracy"] for p in part["per_checkpoint"]]
    ax.plot(x, bm25, linestyle=":", color="black", label="bm25")
    for style, (name, r) in zip(["--", "-.", ":"], part.get("tracin", {}).items()):
        value = headline(r)[0]
        ax.axhline(value, linestyle=style, color="gray", label=f"{name} ({value:.3f})")
    ax.set_xticks(x, [f"{i}\nstep {s}" for i, s in enumerate(steps)])
    ax.set_xlabel("checkpoint (0: the base model)")
    ax.set_ylabel("top-1 accuracy (95% interval)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def transfer_heatmap(accuracy: list[list[float]], steps: list[int], path: Path, title: str) -> Path:
    """The transfer matrix: row i the selection fitted at checkpoint i, column j its held-out accuracy there."""
    grid = np.asarray(accuracy, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(steps), 1.2 + 0.8 * len(steps)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    labels = [f"{i} (step {s})" for i, s in enumerate(steps)]
    ax.set_xticks(range(len(steps)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(steps)), labels)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xlabel("scored at checkpoint")
    ax.set_ylabel("selection fitted at checkpoint")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="held-out top-1 accuracy")
    return _save(fig, path)
