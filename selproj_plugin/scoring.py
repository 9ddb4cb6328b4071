"""Retrieval scores on a component table: subset cosines, top-1 accuracy, fidelity.

Cosine for a set L of components is sum_L cross / (sqrt(sum_L query_self) * sqrt(sum_L candidate_self));
a query is correct when its original has the highest cosine (ties: the earlier candidate wins).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from selproj_plugin.table import ComponentTable


def cosine_from_sums(cross: np.ndarray, query_self: np.ndarray, candidate_self: np.ndarray) -> np.ndarray:
    """Cosine from summed dot products; query_self broadcasts over candidates (0 where a norm is 0)."""
    den = np.sqrt(query_self[:, None, ...]) * np.sqrt(candidate_self)
    return np.divide(cross, den, out=np.zeros(np.broadcast_shapes(cross.shape, den.shape)), where=den > 0)


def subset_similarity(table: ComponentTable, components: Sequence[int] | np.ndarray | None = None,
                      rows: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
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


def correct(similarity: np.ndarray, is_original: np.ndarray) -> np.ndarray:
    """Whether each query ranks its original first; works on [Q, K] or batched [Q, K, R]."""
    target = original_column(is_original)
    target = target.reshape(target.shape + (1,) * (similarity.ndim - 2))
    return np.argmax(similarity, axis=1) == target


def accuracy(similarity: np.ndarray, is_original: np.ndarray) -> float:
    """Top-1 retrieval accuracy of a [Q, K] similarity."""
    return float(np.mean(correct(similarity, is_original)))


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
    """1-based rank of each query's original among its candidates (ties: earlier candidate first)."""
    target = original_column(is_original)
    rows = np.arange(similarity.shape[0])
    own = similarity[rows, target][:, None]
    before = np.arange(similarity.shape[1])[None, :] < target[:, None]
    return 1 + np.sum((similarity > own) | ((similarity == own) & before), axis=1)


def rank_metrics(similarity: np.ndarray, is_original: np.ndarray, cutoffs: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Mean reciprocal rank and recall@k of the originals (for full-set retrieval)."""
    ranks = original_rank(similarity, is_original)
    out = {"mrr": float(np.mean(1.0 / ranks))}
    out.update({f"recall@{k}": float(np.mean(ranks <= k)) for k in cutoffs})
    return out
