"""Reducer: the one interface every gradient-reduction strategy implements.

A reducer decides which components' gradients are kept (``select``), how a kept
per-sample gradient becomes the vector that is compared (``reduce``), and how it scores
a component table (``similarity``).  Strategies that learn from data (greedy selection)
override ``fit``; the base class then reports held-out accuracy by k-fold over queries.
Options are dataclass fields, so ``get_strategy(name, **options)`` can check them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from selproj_plugin import scoring
from selproj_plugin.components import Component
from selproj_plugin.table import ComponentTable


@dataclass
class StrategyResult:
    """What one strategy achieved on one table; ``to_json`` gives the CLI's ``results.<name>``."""

    name: str
    accuracy: float
    fidelity: float
    components: list[str]
    param_fraction: float
    dim: int
    seconds: float
    heldout_accuracy: float | None = None
    similarity: np.ndarray | None = field(default=None, repr=False)
    path: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "accuracy": self.accuracy, "heldout_accuracy": self.heldout_accuracy,
            "components": self.components, "param_fraction": self.param_fraction,
            "fidelity": self.fidelity, "dim": self.dim, "seconds": self.seconds,
        }
        if self.path is not None:
            out["path"] = self.path
        out.update(self.extra)
        return out


@dataclass
class Reducer:
    """Base reducer: keeps every component, concatenated (the full gradient).

    Subclass and set ``name``; override ``select`` for a fixed choice of components,
    ``fit`` (and set ``fitted = True``) to learn the choice from a table.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    fitted: ClassVar[bool] = False
    folds: ClassVar[int] = 5

    # ---- what to keep ---------------------------------------------------------------
    def fit(self, table: ComponentTable) -> None:
        """Learn from a table; the base reducer has nothing to learn."""

    def select(self, components: Sequence[Component]) -> list[str]:
        """Names of the components this reducer keeps, in selection order."""
        return [c.name for c in components]

    # ---- how to compare -------------------------------------------------------------
    def similarity(self, table: ComponentTable) -> np.ndarray:
        """[Q, K] cosine of queries and candidates under this reducer."""
        index = {str(n): i for i, n in enumerate(table.components)}
        return scoring.subset_similarity(table, [index[n] for n in self.select(table.component_list)])

    def dimension(self, components: Sequence[Component]) -> int:
        """Length of the reduced vector for a model with these components."""
        keep = set(self.select(components))
        return int(sum(c.num_params for c in components if c.name in keep))

    def reduce(self, features: Mapping[str, Any]) -> Any:
        """Per-sample component gradients ``{name: [N, d]}`` -> reduced ``[N, D]`` (kept ones, in order)."""
        import torch

        names = list(features)
        keep = self.select([Component(n, "other", None, (n,), int(features[n].shape[1])) for n in names])
        return torch.cat([features[n].flatten(1) for n in keep], dim=1)

    # ---- evaluation -----------------------------------------------------------------
    def evaluate(self, table: ComponentTable, *, folds: int | None = None, seed: int = 0) -> StrategyResult:
        """Score this reducer on ``table``: accuracy, fidelity to the full gradient, cost, held-out accuracy."""
        start = time.perf_counter()
        self.fit(table)
        sim = self.similarity(table)
        chosen = self.select(table.component_list)
        heldout = self.heldout_accuracy(table, folds or self.folds, seed) if self.fitted else None
        full = scoring.subset_similarity(table)
        return StrategyResult(
            name=self.name,
            accuracy=scoring.accuracy(sim, table.is_original),
            fidelity=scoring.fidelity(sim, full),
            components=chosen,
            param_fraction=self.dimension(table.component_list) / table.total_params,
            dim=self.dimension(table.component_list),
            seconds=time.perf_counter() - start,
            heldout_accuracy=heldout,
            similarity=sim,
            path=self.path_json(),
            extra=self.extra_json(table),
        )

    def heldout_accuracy(self, table: ComponentTable, folds: int, seed: int) -> float:
        """k-fold over queries: fit a fresh copy on the other folds, score the held-out fold."""
        hits = 0
        for test in scoring.kfold_rows(table.n_queries, folds, seed):
            train = np.setdiff1d(np.arange(table.n_queries), test)
            fresh = copy.deepcopy(self)
            fresh.fit(table.take(train))
            held = table.take(test)
            hits += int(scoring.correct(fresh.similarity(held), held.is_original).sum())
        return hits / table.n_queries

    def path_json(self) -> list[dict[str, Any]] | None:
        """The fitting path, where a strategy has one."""
        return None

    def extra_json(self, table: ComponentTable) -> dict[str, Any]:
        """Strategy-specific JSON fields beside the common ones."""
        return {}

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option names and defaults (the dataclass fields)."""
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}
