"""``single_component``: every component alone, the baseline that shows where the signal lives.

Fitting picks the best single component: highest accuracy, equal accuracies broken by the
mean margin of the originals over the best other candidate, then by model order.  The
per-component accuracies, averaged and maximised by kind and by layer, go into the report
(and the layer x kind heatmap), with how many components tied on the best accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from selproj_plugin import scoring
from selproj_plugin.components import Component
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.table import ComponentTable


def per_component_similarity(table: ComponentTable) -> np.ndarray:
    """[Q, K, C] cosine of each component used alone."""
    return scoring.cosine_from_sums(table.cross, table.query_self, table.candidate_self)


def per_component_accuracy(table: ComponentTable) -> np.ndarray:
    """[C] top-1 accuracy (ties credited 1/m) of each component used alone."""
    return scoring.hits(per_component_similarity(table), table.is_original).mean(axis=0)


@dataclass
class SingleComponent(Reducer):
    """The best single component; reports every component's accuracy, by kind and by layer."""

    name = "single_component"
    summary = "each component alone; keeps the best one (ties: larger mean margin, then model order)"
    fitted = True

    _best: str | None = field(default=None, init=False, repr=False)
    _tied: int = field(default=0, init=False, repr=False)

    def fit(self, table: ComponentTable) -> None:
        sims = per_component_similarity(table)
        accuracy = scoring.hits(sims, table.is_original).mean(axis=0)
        best, self._tied = scoring.best_of(accuracy, lambda idx: scoring.mean_margin(sims[:, :, idx], table.is_original))
        self._best = str(table.components[best])

    def select(self, components: Sequence[Component]) -> list[str]:
        if self._best is None:
            raise ValueError("single_component has no selection yet: fit it on a component table")
        return [self._best]

    def extra_json(self, table: ComponentTable) -> dict[str, Any]:
        sims = per_component_similarity(table)
        acc, margin = scoring.hits(sims, table.is_original).mean(axis=0), scoring.mean_margin(sims, table.is_original)
        groups: dict[str, dict[str, list[float]]] = {"by_kind": defaultdict(list), "by_layer": defaultdict(list)}
        for a, kind, layer in zip(acc, table.kinds, table.layers):
            groups["by_kind"][str(kind)].append(float(a))
            groups["by_layer"]["none" if layer < 0 else str(int(layer))].append(float(a))
        out: dict[str, Any] = {
            "tied": self._tied,
            "per_component": {str(n): float(a) for n, a in zip(table.components, acc)},
            "per_component_margin": {str(n): float(m) for n, m in zip(table.components, margin)},
        }
        for key, group in groups.items():
            out[key] = {g: {"mean": float(np.mean(v)), "max": float(np.max(v))} for g, v in group.items()}
        return out
