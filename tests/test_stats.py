"""Intervals and paired tests against values computed independently (closed forms, published tables, enumeration)."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from selproj_plugin import stats


def credits(hits: int, n: int) -> np.ndarray:
    return np.r_[np.ones(hits), np.zeros(n - hits)]


def test_clopper_pearson_at_the_edges_has_closed_forms():
    # all hits: lower bound (alpha/2)^(1/n); no hit: upper bound 1 - (alpha/2)^(1/n)
    assert stats.proportion_ci(credits(64, 64)) == pytest.approx((0.025 ** (1 / 64), 1.0))
    assert stats.proportion_ci(credits(0, 10)) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))


def test_clopper_pearson_matches_published_values():
    # Clopper-Pearson 95% for 5/10 and 1/20 (e.g. R's binom.test: 0.1870860-0.8129140, 0.001265-0.248733)
    assert stats.proportion_ci(credits(5, 10)) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    assert stats.proportion_ci(credits(1, 20)) == pytest.approx((0.0012650, 0.2487328), abs=1e-6)


def test_fractional_credits_take_the_bounds_of_floor_and_ceiling():
    tied = np.array([1, 1, 0.5, 0, 1 / 3, 0])  # 2.83 hits of 6
    assert stats.proportion_ci(tied) == (stats.proportion_ci(credits(2, 6))[0], stats.proportion_ci(credits(3, 6))[1])


def test_mcnemar_is_the_binomial_test_on_discordant_queries():
    # 10 queries only the strategy gets right, 2 only the reference: 2 * P(X <= 2), X ~ Bin(12, 1/2)
    expected = 2 * Fraction(comb(12, 0) + comb(12, 1) + comb(12, 2), 2**12)
    assert stats.mcnemar_p(10, 2) == pytest.approx(float(expected))
    assert stats.mcnemar_p(2, 10) == stats.mcnemar_p(10, 2)
    assert stats.mcnemar_p(3, 3) == 1.0 and stats.mcnemar_p(0, 0) == 1.0


def test_paired_test_uses_mcnemar_on_hits():
    a, b = np.r_[np.ones(12), np.zeros(4)], np.r_[np.ones(2), np.zeros(10), np.ones(4)]
    test = stats.paired_test(a, b)
    assert test.method == "exact McNemar" and (test.better, test.worse) == (10, 4)
    assert test.p_value == pytest.approx(stats.mcnemar_p(10, 4)) and test.difference == pytest.approx(6 / 16)


def test_sign_flip_matches_exact_enumeration_on_fractional_credits():
    a = np.array([1, 1, 0.5, 1, 1 / 3, 1, 0, 1, 1, 0.25])
    b = np.array([0, 1, 1, 0, 0, 0.5, 0, 0, 1, 0])
    d = (a - b)[a != b]
    observed = abs(d.sum())
    exact = np.mean([abs(np.dot(s, d)) >= observed - 1e-12 for s in itertools.product([-1, 1], repeat=d.size)])
    test = stats.paired_test(a, b, seed=1)
    assert test.method.startswith("sign-flip")
    assert test.p_value == pytest.approx(exact, abs=0.015)  # Monte Carlo error of 10,000 draws
    assert stats.paired_test(a, b, seed=1).p_value == test.p_value  # seeded


def test_bootstrap_interval_is_seeded_and_about_the_normal_width():
    values = np.random.default_rng(0).uniform(size=400)
    low, high = stats.bootstrap_ci(values, seed=3)
    assert (low, high) == stats.bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.1)
