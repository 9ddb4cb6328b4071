"""Reducer: the one interface every gradient-reduction strategy implements.

The contract has two steps, the same in table scoring, the engine, TRAK and Captum:

1. ``select(catalogue)`` gets the model's real component catalogue (names, kinds, layers,
   sizes; from a table, the table's components) and returns the names it keeps, in
   order.  It is called once per model, never on its own output.
2. ``transform(selected)`` gets those components and returns a
   :class:`~selproj_plugin.transforms.Transform`, built once per model, that maps each
   sample's selected gradients ``{name: [N, d_c]}`` to ``[N, transform.dim]``.

:func:`reduction` runs both steps and checks the answers; every consumer goes through it.
Strategies that learn from data override ``fit`` (and set ``fitted = True``); held-out
accuracy is then reported by k-fold over queries.  Options are dataclass fields.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from selproj_plugin import scoring, stats
from selproj_plugin.components import Component, resolve
from selproj_plugin.errors import one_line
from selproj_plugin.table import ComponentTable
from selproj_plugin.transforms import Concatenate, Transform


class ReducerError(ValueError):
    """A reducer that breaks the contract on a model or table; the message is one line."""


@dataclass
class StrategyResult:
    """What one strategy achieved on one table; ``to_json`` gives the CLI's ``results.<name>``.

    Accuracies credit an m-way tie at the top 1/m; intervals are 95% exact binomial over
    queries (:mod:`selproj_plugin.stats`).  ``vs_full`` pairs the headline credits (held-out
    for a fitted strategy; an unfitted one's learnt nothing from the queries) with the full gradient's.
    """

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
    accuracy_ci: tuple[float, float] | None = None
    heldout_accuracy_ci: tuple[float, float] | None = None
    vs_full: stats.PairedTest | None = None
    hits: np.ndarray | None = field(default=None, repr=False)  # [Q] credit per query of the selection fitted on all
    heldout_similarity: np.ndarray | None = field(default=None, repr=False)  # [Q, K], each row fitted without it

    @property
    def headline(self) -> tuple[float, tuple[float, float] | None, str]:
        """The figure to read first, its interval and its basis: held-out accuracy for a fitted strategy, else the
        accuracy over every query (:data:`~selproj_plugin.stats.NOT_FITTED`)."""
        if self.heldout_accuracy is not None:
            return self.heldout_accuracy, self.heldout_accuracy_ci, stats.HELD_OUT
        return self.accuracy, self.accuracy_ci, stats.NOT_FITTED

    def to_json(self) -> dict[str, Any]:
        out = {
            "accuracy": self.accuracy,
            "accuracy_ci": _pair(self.accuracy_ci),
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_accuracy_ci": _pair(self.heldout_accuracy_ci),
            "vs_full": None if self.vs_full is None else self.vs_full.to_json(),
            "components": self.components,
            "param_fraction": self.param_fraction,
            "fidelity": self.fidelity,
            "dim": self.dim,
            "seconds": self.seconds,
        }
        if self.path is not None:
            out["path"] = self.path
        out.update(self.extra)
        return out


def _pair(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


@dataclass
class Reducer:
    """Base reducer: keeps every component, concatenated (the full gradient).

    Subclass, set ``name`` and ``summary``, and override ``select`` (which components),
    ``transform`` (what is done to their per-sample gradients), or ``fit`` (learn the
    selection from a table; set ``fitted = True``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    fitted: ClassVar[bool] = False
    folds: ClassVar[int] = 5

    def fit(self, table: ComponentTable) -> None:
        """Learn from a table; the base reducer has nothing to learn."""

    def select(self, components: Sequence[Component]) -> list[str]:
        """Names of the components kept from the model's catalogue ``components``, in order."""
        return [c.name for c in components]

    def transform(self, selected: Sequence[Component]) -> Transform:
        """The per-sample map of the selected gradients; default: concatenate them."""
        return Concatenate(selected)

    # ---- evaluation on a component table ------------------------------------------
    def evaluate(
        self, table: ComponentTable, *, folds: int | None = None, seed: int = 0, similarity: "Similarity | None" = None
    ) -> StrategyResult:
        """Score on ``table``: accuracy, fidelity to the full gradient, cost, held-out accuracy.

        ``similarity(reduction, rows)`` gives [len(rows), K] cosines from per-sample gradients
        for transforms a table cannot express (the benchmark passes the engine's); without it
        such a reducer raises :class:`ReducerError`.
        """
        start = time.perf_counter()
        self.fit(table)
        red = reduction(self, table.component_list)
        sim = table_similarity(red, table, similarity)
        held = self.heldout_similarity(table, folds or self.folds, seed, similarity) if self.fitted else None
        full = scoring.subset_similarity(table)
        hits = scoring.hits(sim, table.is_original)
        held_hits = None if held is None else scoring.hits(held, table.is_original)
        headline, basis = (hits, stats.NOT_FITTED) if held_hits is None else (held_hits, stats.HELD_OUT)
        return StrategyResult(
            name=self.name,
            accuracy=float(np.mean(hits)),
            fidelity=scoring.fidelity(sim, full),
            components=red.names,
            param_fraction=red.transform.dim / table.total_params,
            dim=red.transform.dim,
            seconds=time.perf_counter() - start,
            heldout_accuracy=None if held_hits is None else float(np.mean(held_hits)),
            similarity=sim,
            path=self.path_json(),
            extra=self.extra_json(table),
            accuracy_ci=stats.proportion_ci(hits),
            heldout_accuracy_ci=None if held_hits is None else stats.proportion_ci(held_hits),
            vs_full=stats.paired_test(headline, scoring.hits(full, table.is_original), seed=seed, basis=basis),
            hits=hits,
            heldout_similarity=held,
        )

    def heldout_similarity(self, table: ComponentTable, folds: int, seed: int, similarity: "Similarity | None" = None) -> np.ndarray:
        """[Q, K] similarities by k-fold over queries: each fold scored by a fresh copy fitted on the others."""
        out = np.zeros(table.is_original.shape)
        for test in scoring.kfold_rows(table.n_queries, folds, seed):
            train = np.setdiff1d(np.arange(table.n_queries), test)
            fresh = copy.deepcopy(self)
            fresh.fit(table.take(train))
            held = table.take(test)
            out[test] = table_similarity(reduction(fresh, held.component_list), held, similarity, rows=test)
        return out

    def path_json(self) -> list[dict[str, Any]] | None:
        """The fitting path, where a strategy has one."""
        return None

    def extra_json(self, table: ComponentTable) -> dict[str, Any]:
        """Strategy-specific JSON fields beside the common ones."""
        return {}

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option names and defaults (the dataclass fields)."""
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls) if f.init}


@dataclass(frozen=True)
class Reduction:
    """What one reducer does on one model or table: the catalogue, its selection, its transform."""

    reducer: Reducer
    catalogue: tuple[Component, ...]
    selected: tuple[Component, ...]
    transform: Transform

    @property
    def names(self) -> list[str]:
        """Selected component names, in the reducer's order."""
        return [c.name for c in self.selected]

    @property
    def num_params(self) -> int:
        """Gradient entries the selection keeps (before the transform)."""
        return int(sum(c.num_params for c in self.selected))


Similarity = Callable[[Reduction, np.ndarray], np.ndarray]


def _label(reducer: Reducer) -> str:
    return reducer.name or type(reducer).__name__


def reduction(reducer: Reducer, catalogue: Sequence[Component]) -> Reduction:
    """Run the contract's two steps once on ``catalogue`` and check every answer (one-line errors)."""
    catalogue = tuple(catalogue)
    label = _label(reducer)
    try:
        names = reducer.select(catalogue)
    except ReducerError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ReducerError(f"strategy {label!r}: select failed: {one_line(exc)}") from None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names or ()):
        raise ReducerError(f"strategy {label!r}: select must return a list of component names, got {names!r:.80}")
    names = list(names)
    if not names:
        raise ReducerError(f"strategy {label!r} selects no component of the {len(catalogue)} in the catalogue")
    try:
        selected = tuple(resolve(catalogue, names))
    except ValueError:
        unknown = [n for n in names if not _resolves(catalogue, n)]
        raise ReducerError(
            f"strategy {label!r} selects {unknown[0]!r}, which is not a component here "
            f"({len(unknown)} unknown; see selproj_plugin.components.catalogue or --list-components)"
        ) from None
    if len({c.name for c in selected}) != len(selected):
        dup = next(c.name for i, c in enumerate(selected) if c.name in {d.name for d in selected[:i]})
        raise ReducerError(f"strategy {label!r} selects component {dup} twice")
    try:
        transform = reducer.transform(selected)
    except (ValueError, TypeError) as exc:
        raise ReducerError(f"strategy {label!r}: transform failed: {one_line(exc)}") from None
    if not isinstance(transform, Transform):
        raise ReducerError(
            f"strategy {label!r}: transform must return a selproj_plugin.transforms.Transform, got {type(transform).__name__}"
        )
    if not isinstance(transform.dim, (int, np.integer)) or transform.dim < 1:
        raise ReducerError(f"strategy {label!r}: transform declares dimension {transform.dim!r}; need a positive int")
    if tuple(transform.components) != selected:
        raise ReducerError(f"strategy {label!r}: transform was built for other components than the selection")
    return Reduction(reducer, catalogue, selected, transform)


def table_similarity(
    red: Reduction, table: ComponentTable, similarity: Similarity | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """[Q, K] cosine of a reduction on ``table``: from the table when the transform allows, else from gradients."""
    sim = red.transform.on_table(table)
    if sim is not None:
        return np.asarray(sim, dtype=np.float64)
    if similarity is None:
        raise ReducerError(
            f"strategy {_label(red.reducer)!r}: its transform ({type(red.transform).__name__}, {red.transform.key}) "
            "cannot be scored from a component table; run it on a model (without --table) so per-sample gradients are used"
        )
    rows = np.arange(table.n_queries) if rows is None else rows
    return np.asarray(similarity(red, rows), dtype=np.float64)


def _resolves(catalogue: Sequence[Component], name: str) -> bool:
    try:
        resolve(catalogue, [name])
    except ValueError:
        return False
    return True
