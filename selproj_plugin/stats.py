"""Uncertainty of the benchmark's figures: 95% intervals over queries, paired tests against ``full``.

An accuracy is the mean of per-query credits in [0, 1] (1 per hit, 1/m for an m-way tie at
the top), so it is a binomial proportion over queries.  Intervals are exact binomial
(Clopper-Pearson): they keep their coverage at 64 queries and at accuracies of 1.0, where
a bootstrap collapses to a point.  A tie-credited, fractional number of hits s gets the lower
bound of floor(s) and the upper bound of ceil(s), which keeps the interval conservative.
The paired test is exact McNemar (two-sided binomial test on the queries where exactly one
of the two hits) when every credit is 0 or 1; with fractional credits it is the sign-flip
randomisation test of the summed differences, of which McNemar is the 0/1 case (exact
enumeration when it is small, else seeded Monte Carlo).  Means that are not proportions
(MRR) get a seeded percentile bootstrap.  The tests and intervals are scipy.stats'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy

LEVEL = 0.95
DRAWS = 10_000  # Monte Carlo draws of the sign-flip test and the bootstrap


def proportion_ci(credits: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of the mean of per-query credits in [0, 1]."""
    credits = np.asarray(credits, dtype=np.float64).ravel()
    return binomial_ci(float(credits.sum()), credits.size, level)


def binomial_ci(total: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of ``total`` hits (possibly fractional) in ``n`` queries."""
    if n < 1:
        raise ValueError("an interval needs at least one query")
    low_hits, high_hits = math.floor(total + 1e-9), math.ceil(total - 1e-9)
    low = _scipy.binomtest(low_hits, n).proportion_ci(level, method="exact").low
    high = _scipy.binomtest(high_hits, n).proportion_ci(level, method="exact").high
    return float(low), float(high)


def bootstrap_ci(values: np.ndarray, seed: int = 0, level: float = LEVEL, draws: int = DRAWS) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of a mean over queries."""
    values = np.asarray(values, dtype=np.float64).ravel()
    result = _scipy.bootstrap(
        (values,), np.mean, n_resamples=draws, confidence_level=level, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


HELD_OUT = "held-out"  # scored on queries the strategy was not fitted on (k-fold over queries)
NOT_FITTED = "not fitted"  # the strategy learnt nothing from the queries, so every query scores it fairly


@dataclass(frozen=True)
class PairedTest:
    """A strategy's per-query credits against a reference's (``full``) on the same queries."""

    difference: float  # mean credit of the strategy minus the reference's
    better: float  # summed credit by which the strategy beats the reference, over queries where it does
    worse: float  # the same where the reference wins
    p_value: float  # two-sided
    method: str
    basis: str = NOT_FITTED  # which of the strategy's credits: HELD_OUT or NOT_FITTED

    def to_json(self) -> dict[str, Any]:
        return {
            "p_value": self.p_value,
            "difference": self.difference,
            "better": self.better,
            "worse": self.worse,
            "method": self.method,
            "basis": self.basis,
        }


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value: discordant queries split as Binomial(better + worse, 1/2)."""
    n = better + worse
    return float(_scipy.binomtest(better, n, 0.5).pvalue) if n else 1.0


def sign_flip_p(differences: np.ndarray, seed: int = 0, draws: int = DRAWS) -> float:
    """Two-sided p-value of the summed paired differences under random sign flips (seeded)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    result = _scipy.permutation_test(
        (d,),
        lambda x, axis: np.abs(x.sum(axis=axis)),
        permutation_type="samples",
        vectorized=True,
        n_resamples=draws,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def paired_test(credits: np.ndarray, reference: np.ndarray, seed: int = 0, basis: str = NOT_FITTED) -> PairedTest:
    """Paired test of two strategies' per-query credits: exact McNemar for 0/1 credits, else sign flips."""
    a, b = np.asarray(credits, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired credits must cover the same queries, got {a.shape} and {b.shape}")
    d = a - b
    better, worse = float(np.maximum(d, 0).sum()), float(np.maximum(-d, 0).sum())
    if np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))):
        p, method = mcnemar_p(int(better), int(worse)), "exact McNemar"
    else:
        p, method = sign_flip_p(d, seed), f"sign-flip randomisation ({DRAWS} draws, seed {seed})"
    return PairedTest(float(d.mean()), better, worse, p, method, basis)
