"""Candidate sets for retrieval: BM25 top-k over the originals, as in the paper, or the full set."""

from __future__ import annotations

from typing import Sequence

import bm25s
import numpy as np


def bm25_scores(query_texts: Sequence[str], pool_texts: Sequence[str]) -> np.ndarray:
    """BM25 score of every pool text for every query, [Q, P] (bm25s, English stopwords).

    Besides choosing candidates, these are the BM25 baseline's similarities: under
    ``--full-set`` BM25 is ranked over the whole pool like the gradient strategies.
    """
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(pool_texts), stopwords="en", show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(list(query_texts), stopwords="en", show_progress=False, return_ids=False)
    scores = np.zeros((len(query_texts), len(pool_texts)))
    for i, tokens in enumerate(query_tokens):
        scores[i] = retriever.get_scores(tokens)
    return scores


def top_k(scores: np.ndarray, k: int, force: Sequence[int] | None = None) -> np.ndarray:
    """Indices [Q, k] into the pool of each query's k best ``scores`` ([Q, P]), best first.

    ``force[q]`` (the query's true original) is put into the last slot when the top k missed
    it, as the paper did; ties in score keep pool order, so the result is deterministic.
    """
    if k < 1 or k > scores.shape[1]:
        raise ValueError(f"candidate count k={k} must be between 1 and the pool size {scores.shape[1]}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    if force is not None:
        for q, original in enumerate(force):
            if original not in order[q]:
                order[q, -1] = original
    return order


def bm25_topk(query_texts: Sequence[str], pool_texts: Sequence[str], k: int, force: Sequence[int] | None = None) -> np.ndarray:
    """Indices [Q, k] into the pool of each query's BM25 top-k, best first (see :func:`top_k`)."""
    return top_k(bm25_scores(query_texts, pool_texts), k, force)
