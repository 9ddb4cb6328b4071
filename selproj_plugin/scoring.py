"""Retrieval scores on a component table: subset cosines, tie-credited accuracy and ranks, fidelity.

Cosine for a set L of components is sum_L cross / (sqrt(sum_L query_self) * sqrt(sum_L candidate_self)).
A query's credit is its expected score under a random tie-break: an original that shares the top
cosine with m - 1 other candidates earns 1/m (a component that scores every candidate alike earns
1/K, not BM25's top-1 rate); ranks, MRR and recall@k are expectations the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: table.py imports transforms, which scores through this module
    from selproj_plugin.table import ComponentTable

# Accuracies (means of credits) closer than this are equal: they differ only by summation order.
TIE_TOLERANCE = 1e-9


def cosine_from_sums(cross: np.ndarray, query_self: np.ndarray, candidate_self: np.ndarray) -> np.ndarray:
    """Cosine from summed dot products; query_self broadcasts over candidates (0 where a norm is 0)."""
    den = np.sqrt(query_self[:, None, ...]) * np.sqrt(candidate_self)
    return np.divide(cross, den, out=np.zeros(np.broadcast_shapes(cross.shape, den.shape)), where=den > 0)


def subset_similarity(
    table: ComponentTable,
    components: Sequence[int] | np.ndarray | None = None,
    rows: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """[Q, K] cosine using only ``components`` (indices; None = all), for ``rows`` of queries.

    ``weights`` (one per listed component) multiply each component's dot products: the
    cosine of gradients whose component c is scaled by sqrt(weights[c]).
    """
    idx = np.arange(table.n_components) if components is None else np.asarray(components, dtype=int)
    rows = slice(None) if rows is None else rows
    if weights is None:
        total = lambda a: a.sum(axis=-1)  # noqa: E731
    else:
        w = np.asarray(weights, dtype=np.float64)
        total = lambda a: a @ w  # noqa: E731
    return cosine_from_sums(
        total(table.cross[rows][:, :, idx]),
        total(table.query_self[rows][:, idx]),
        total(table.candidate_self[rows][:, :, idx]),
    )


def original_column(is_original: np.ndarray) -> np.ndarray:
    """Index of the original among each query's candidates, [Q]."""
    return np.argmax(is_original, axis=1)


def _own(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """The original's similarity, [Q, 1, ...]; works on [Q, K] or batched [Q, K, R]."""
    target = original_column(is_original).reshape((-1, 1) + (1,) * (similarity.ndim - 2))
    return np.take_along_axis(similarity, target, axis=1)


def _standing(similarity: np.ndarray, is_original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates scored above the original, and the size of its tie group (itself included)."""
    own = _own(similarity, is_original)
    return np.sum(similarity > own, axis=1), np.sum(similarity == own, axis=1)


def recall_at(similarity: np.ndarray, is_original: np.ndarray, k: int = 1) -> np.ndarray:
    """Per query, the probability that a random tie-break ranks the original within the top ``k``."""
    above, tied = _standing(similarity, is_original)
    return np.clip(k - above, 0, tied) / tied


def hits(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """Per-query top-1 credit: 1 for a clear hit, 1/m for an m-way tie at the top, else 0; [Q] or [Q, R].

    Equal to ``recall_at(similarity, is_original, 1)``, in two passes over the similarities (greedy's inner loop).
    """
    top = np.max(similarity, axis=1)
    tied = np.sum(similarity == top[:, None], axis=1)
    return np.where(_own(similarity, is_original)[:, 0] == top, 1.0 / tied, 0.0)


def accuracy(similarity: np.ndarray, is_original: np.ndarray) -> float:
    """Top-1 retrieval accuracy of a [Q, K] similarity, ties credited 1/m."""
    return float(np.mean(hits(similarity, is_original)))


def mean_margin(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """Mean over queries of the original's cosine minus the best other candidate's; [] or [R].

    The continuous score that breaks ties between equal accuracies: 0 for a component
    that scores every candidate alike, positive when originals lead by a wide margin.
    """
    if similarity.shape[1] < 2:
        return np.zeros(similarity.shape[2:])
    mask = np.asarray(is_original, dtype=bool).reshape(is_original.shape + (1,) * (similarity.ndim - 2))
    best_other = np.max(np.where(mask, -np.inf, similarity), axis=1)
    return np.mean(_own(similarity, is_original)[:, 0] - best_other, axis=0)


def best_of(scores: np.ndarray, margins: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
    """Index of the best score and how many indices tied on it (within :data:`TIE_TOLERANCE`).

    Ties go to the largest ``margins(tied_indices)``, then to the first index (model order);
    margins are computed only for the tied indices, and only when there is a tie.
    """
    tied = np.flatnonzero(scores >= np.max(scores) - TIE_TOLERANCE)
    if tied.size == 1:
        return int(tied[0]), 1
    return int(tied[np.argmax(margins(tied))]), int(tied.size)


def fidelity(similarity: np.ndarray, reference: np.ndarray) -> float:
    """Cosine between two similarity tables flattened over all query x candidate pairs."""
    a, b = similarity.ravel(), reference.ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def kfold_rows(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Deterministic k-fold split of query rows (seeded permutation)."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be between 2 and the number of queries ({n}), got {folds}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def original_rank(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """Expected 1-based rank of each query's original among its candidates under a random tie-break."""
    above, tied = _standing(similarity, is_original)
    return 1 + above + (tied - 1) / 2


def reciprocal_rank(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """Per query, the expected 1/rank of the original under a random tie-break (mean of 1/r over its tie group)."""
    above, tied = _standing(similarity, is_original)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, similarity.shape[1] + 1))])
    return (harmonic[above + tied] - harmonic[above]) / tied


def rank_credits(similarity: np.ndarray, is_original: np.ndarray, cutoffs: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per-query reciprocal rank and recall@k of the originals (full-set retrieval); their means are MRR and recall@k."""
    out = {"mrr": reciprocal_rank(similarity, is_original)}
    out.update({f"recall@{k}": recall_at(similarity, is_original, k) for k in cutoffs})
    return out
