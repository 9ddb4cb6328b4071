"""Scoring helpers on hand-made similarities."""

from __future__ import annotations

import numpy as np
import pytest

from selproj_plugin import scoring


def test_ties_at_the_top_earn_one_over_m():
    sim = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3], [0.1, 0.8, 0.2], [0.9, 0.1, 0.2]])
    is_original = np.zeros((5, 3), dtype=bool)
    is_original[np.arange(5), [1, 2, 0, 1, 1]] = True
    # tie of 2 at the top (either column), a 3-way tie, a clear hit, a clear miss
    assert scoring.hits(sim, is_original).tolist() == [0.5, 0.5, 1 / 3, 1.0, 0.0]
    assert scoring.accuracy(sim, is_original) == pytest.approx((0.5 + 0.5 + 1 / 3 + 1) / 5)


def test_a_constant_component_earns_chance_not_the_first_candidates_rate():
    # a component that scores every candidate alike, on queries whose original is always the first candidate
    sim = np.full((8, 5), 0.7)
    is_original = np.zeros((8, 5), dtype=bool)
    is_original[:, 0] = True
    assert scoring.accuracy(sim, is_original) == pytest.approx(0.2)


def test_batched_hits_match_one_subset_at_a_time():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 3, size=(6, 4, 5)).astype(float)  # small integers: many ties
    is_original = np.eye(4, dtype=bool)[rng.integers(0, 4, size=6)]
    batched = scoring.hits(sims, is_original)
    for r in range(5):
        assert np.array_equal(batched[:, r], scoring.hits(sims[:, :, r], is_original))
    assert np.array_equal(batched, scoring.recall_at(sims, is_original, 1))


def test_ranks_are_expectations_over_tie_breaks():
    sim = np.array([[0.9, 0.1, 0.3], [0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [0.4, 0.9, 0.9]])
    is_original = np.array([[True, False, False], [True, False, False], [False, False, True], [False, True, False]])
    # query 3: ranks 1, 2, 3 equally likely; query 4: ranks 1, 2 equally likely
    assert scoring.original_rank(sim, is_original).tolist() == [1, 2, 2, 1.5]
    credits = scoring.rank_credits(sim, is_original, cutoffs=(1, 2))
    assert credits["mrr"] == pytest.approx([1, 1 / 2, (1 + 1 / 2 + 1 / 3) / 3, (1 + 1 / 2) / 2])
    assert credits["recall@1"] == pytest.approx([1, 0, 1 / 3, 1 / 2])
    assert credits["recall@2"] == pytest.approx([1, 1, 2 / 3, 1])


def test_mean_margin_and_best_of():
    sim = np.array([[0.9, 0.5, 0.1], [0.2, 0.6, 0.4]])
    is_original = np.array([[True, False, False], [False, False, True]])
    assert scoring.mean_margin(sim, is_original) == pytest.approx(((0.9 - 0.5) + (0.4 - 0.6)) / 2)
    # three tie on the best accuracy; the largest margin wins, and among equal margins the first
    margins = np.array([9.0, 0.1, 0.3, 0.3])
    index, tied = scoring.best_of(np.array([0.5, 0.9, 0.9, 0.9]), lambda idx: margins[idx])
    assert (index, tied) == (2, 3)


def test_fidelity_is_scale_free_cosine():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert scoring.fidelity(2 * a, a) == 1.0
    assert scoring.fidelity(a, -a) == -1.0


def test_kfold_rows_partition():
    folds = scoring.kfold_rows(11, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert [len(f) for f in folds] == [3, 2, 2, 2, 2]
