"""The checkpoint study: do the informative components stay the same along training?

Given one component table per checkpoint (same queries, candidates and components):
- the transfer matrix: a selection fitted at checkpoint i, its held-out accuracy at checkpoint j (k-fold over
  queries with the folds every strategy uses, so the diagonal is the strategy's own held-out accuracy);
- the Jaccard overlap of the selections fitted on all queries;
- a TracIn-style table: the learning-rate-weighted sum of the checkpoints' per-component dot products, whose
  cosines (from the sums) every strategy scores like any other table.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from selproj_plugin import scoring, stats
from selproj_plugin.strategies.base import Reducer, reduction, table_similarity
from selproj_plugin.table import ComponentTable


def check_aligned(tables: Sequence[ComponentTable]) -> None:
    """Raise ``ValueError`` (one line) unless every table has the first one's queries, candidates and components."""
    first = tables[0]
    for i, t in enumerate(tables[1:], 1):
        for what, a, b in (
            ("queries", first.query_ids, t.query_ids),
            ("candidates", first.candidate_ids, t.candidate_ids),
            ("components", first.components, t.components),
        ):
            if np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a, str), np.asarray(b, str)):
                raise ValueError(f"checkpoint {i}'s table has other {what} than checkpoint 0's")


def transfer_matrix(tables: Sequence[ComponentTable], make: Callable[[], Reducer], folds: int, seed: int) -> dict[str, Any]:
    """``accuracy[i][j]``: held-out top-1 accuracy at checkpoint j of the selection fitted at checkpoint i.

    For each fold, a fresh reducer is fitted on the other folds' queries of table i and scores the fold's
    queries of table j.  With 95% intervals (``ci[i][j]``).
    """
    check_aligned(tables)
    n, q = len(tables), tables[0].n_queries
    sims = [[np.zeros(t.is_original.shape) for t in tables] for _ in tables]
    for test in scoring.kfold_rows(q, folds, seed):
        train = np.setdiff1d(np.arange(q), test)
        for i, fit_on in enumerate(tables):
            reducer = make()
            reducer.fit(fit_on.take(train))
            for j, score_on in enumerate(tables):
                held = score_on.take(test)
                sims[i][j][test] = table_similarity(reduction(reducer, held.component_list), held)
    acc = np.zeros((n, n))
    ci = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            credits = scoring.hits(sims[i][j], tables[j].is_original)
            acc[i, j] = float(np.mean(credits))
            ci[i][j] = list(stats.proportion_ci(credits))
    return {"accuracy": acc.tolist(), "accuracy_ci": ci}


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|a & b| / |a | b| of two selections (1 for two empty ones)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def jaccard_matrix(selections: Sequence[Sequence[str]]) -> list[list[float]]:
    return [[jaccard(a, b) for b in selections] for a in selections]


def tracin_table(tables: Sequence[ComponentTable], weights: Sequence[float]) -> ComponentTable:
    """The table of ``sum_i weights[i] * <g_i(q), g_i(c)>`` per component (TracInCP's learning-rate weights).

    Its cosines are those of the gradients of all checkpoints concatenated, checkpoint i scaled by
    sqrt(weights[i]); stored projections are left out (they are per checkpoint).
    """
    check_aligned(tables)
    if len(weights) != len(tables) or not all(w > 0 for w in weights):
        raise ValueError(f"TracIn needs one positive weight per checkpoint, got {list(weights)} for {len(tables)}")
    w = np.asarray(weights, dtype=np.float64)
    first = tables[0]
    return ComponentTable(
        cross=sum(wi * t.cross for wi, t in zip(w, tables)),
        query_self=sum(wi * t.query_self for wi, t in zip(w, tables)),
        candidate_self=sum(wi * t.candidate_self for wi, t in zip(w, tables)),
        is_original=first.is_original,
        components=first.components,
        num_params=first.num_params,
        kinds=first.kinds,
        layers=first.layers,
        query_ids=first.query_ids,
        candidate_ids=first.candidate_ids,
        meta={k: v for k, v in first.meta.items() if k in ("param_names", "component_set")},
    )
