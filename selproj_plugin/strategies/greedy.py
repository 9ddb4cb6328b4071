"""Greedy forward selection of components, by retrieval accuracy or by fidelity to the full gradient.

Each step adds the component that most raises the objective on the table.  Equal
objectives (accuracy ties are common: at 64 queries dozens of components reach the best
accuracy) go to the larger mean margin of the originals over the best other candidate
(:func:`~selproj_plugin.scoring.mean_margin`), then to the earlier component in model
order; each step records how many components tied on the objective.  Selection stops
at a budget (a count, or a fraction of parameters when below 1) or after ``patience``
steps without improvement, and keeps the shortest prefix that reached the best objective.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from selproj_plugin import scoring, stats
from selproj_plugin.components import Component
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.table import ComponentTable


def load_selection(selection: str | Sequence[str]) -> list[str]:
    """Component names from a list, a comma-separated string, or a selection JSON file."""
    if isinstance(selection, str):
        path = Path(selection)
        if path.suffix == ".json" or path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read selection file {path}: {exc}") from None
            names = data.get("components") if isinstance(data, dict) else data
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"selection file {path} must hold a list of component names under 'components'")
            return names
        return [n.strip() for n in selection.split(",") if n.strip()]
    return list(selection)


@dataclass
class Greedy(Reducer):
    """Forward selection by top-1 retrieval accuracy (the paper's greedy search)."""

    name = "greedy"
    summary = "greedy forward selection of components by retrieval accuracy"
    fitted = True

    budget: float | None = None
    patience: int = 1
    selection: str | list[str] | None = None
    _chosen: list[str] = field(default_factory=list, init=False, repr=False)
    _path: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _queries: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"budget must be a positive count or a fraction of parameters in (0, 1), got {self.budget}")
        if self.selection is not None:
            self._chosen = load_selection(self.selection)
            if not self._chosen:
                raise ValueError("selection names no component")
            self.fitted = False  # a given selection learns nothing: no held-out figure to report

    # ---- objective over a batch of candidate subsets --------------------------------
    def objective(self, sims: np.ndarray, table: ComponentTable, full: np.ndarray) -> np.ndarray:
        """Score of each candidate subset; ``sims`` is [Q, K, R] for R candidate components."""
        return scoring.hits(sims, table.is_original).mean(axis=0)

    def fit(self, table: ComponentTable) -> None:
        if self.selection is not None:
            return
        chosen, path = self._forward(table)
        self._chosen = [str(table.components[i]) for i in chosen]
        self._path, self._queries = path, table.n_queries

    def _forward(self, table: ComponentTable) -> tuple[list[int], list[dict[str, Any]]]:
        q, k, c = table.cross.shape
        full = scoring.subset_similarity(table)
        allowed = self._allowed(table)
        sum_x, sum_q, sum_c = np.zeros((q, k)), np.zeros(q), np.zeros((q, k))
        order: list[int] = []
        path: list[dict[str, Any]] = []
        best, best_len, params = -np.inf, 0, 0
        while True:
            remaining = np.array(
                [i for i in range(c) if i not in order and allowed(params + int(table.num_params[i]), len(order) + 1)], dtype=int
            )
            if remaining.size == 0:
                break
            sims = scoring.cosine_from_sums(
                sum_x[:, :, None] + table.cross[:, :, remaining],
                sum_q[:, None] + table.query_self[:, remaining],
                sum_c[:, :, None] + table.candidate_self[:, :, remaining],
            )
            scores = self.objective(sims, table, full)
            pick, tied = scoring.best_of(scores, lambda idx: scoring.mean_margin(sims[:, :, idx], table.is_original))
            i = int(remaining[pick])
            order.append(i)
            params += int(table.num_params[i])
            sum_x += table.cross[:, :, i]
            sum_q += table.query_self[:, i]
            sum_c += table.candidate_self[:, :, i]
            chosen = sims[:, :, pick]
            path.append(
                {
                    "component": str(table.components[i]),
                    "objective": float(scores[pick]),
                    "accuracy": scoring.accuracy(chosen, table.is_original),
                    "margin": float(scoring.mean_margin(chosen, table.is_original)),
                    "tied": tied,
                    "fidelity": scoring.fidelity(chosen, full),
                    "param_fraction": params / table.total_params,
                }
            )
            if scores[pick] > best + scoring.TIE_TOLERANCE:
                best, best_len = float(scores[pick]), len(order)
            elif len(order) - best_len >= self.patience:
                break
        return order[:best_len], path

    def _allowed(self, table: ComponentTable):
        """Predicate (params, count) -> within budget."""
        if self.budget is None:
            return lambda params, count: True
        if self.budget < 1:
            limit = self.budget * table.total_params
            return lambda params, count: params <= limit
        return lambda params, count: count <= int(self.budget)

    # ---- Reducer interface ----------------------------------------------------------
    def select(self, components: Sequence[Component]) -> list[str]:
        if not self._chosen:
            raise ValueError(f"{self.name} has no selection yet: fit it on a component table or pass selection=FILE")
        return list(self._chosen)

    def path_json(self) -> list[dict[str, Any]] | None:
        """The path with each step's 95% interval (computed here, not in every cross-validation fit)."""
        if not self._path:
            return None
        return [{**step, "accuracy_ci": list(stats.binomial_ci(step["accuracy"] * self._queries, self._queries))} for step in self._path]


@dataclass
class GreedyFidelity(Greedy):
    """Forward selection by fidelity: subset similarities that best match the full gradient's."""

    name = "greedy_fidelity"
    summary = "greedy forward selection by fidelity to the full-gradient similarities"

    def objective(self, sims: np.ndarray, table: ComponentTable, full: np.ndarray) -> np.ndarray:
        flat = sims.reshape(-1, sims.shape[2])
        ref = full.ravel()
        den = np.linalg.norm(flat, axis=0) * np.linalg.norm(ref)
        return np.divide(ref @ flat, den, out=np.zeros(flat.shape[1]), where=den > 0)
