"""Scoring helpers on hand-made similarities."""

from __future__ import annotations

import numpy as np

from selproj_plugin import scoring


def test_accuracy_ties_go_to_the_earlier_candidate():
    sim = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    is_original = np.array([[False, True, False], [False, False, True]])
    assert scoring.accuracy(sim, is_original) == 0.0
    is_original = np.array([[True, False, False], [False, True, False]])
    assert scoring.accuracy(sim, is_original) == 1.0


def test_rank_metrics():
    sim = np.array([[0.9, 0.1, 0.3], [0.2, 0.9, 0.1], [0.5, 0.5, 0.5]])
    is_original = np.array([[True, False, False], [True, False, False], [False, False, True]])
    assert list(scoring.original_rank(sim, is_original)) == [1, 2, 3]
    metrics = scoring.rank_metrics(sim, is_original, cutoffs=(1, 2))
    assert metrics["mrr"] == (1 + 1 / 2 + 1 / 3) / 3
    assert metrics["recall@1"] == 1 / 3 and metrics["recall@2"] == 2 / 3


def test_fidelity_is_scale_free_cosine():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert scoring.fidelity(2 * a, a) == 1.0
    assert scoring.fidelity(a, -a) == -1.0


def test_kfold_rows_partition():
    folds = scoring.kfold_rows(11, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert [len(f) for f in folds] == [3, 2, 2, 2, 2]
