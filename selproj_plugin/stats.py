"""Uncertainty of the benchmark's figures: 95% intervals over queries, paired tests against ``full``.

An accuracy is the mean of per-query credits in [0, 1] (1 per hit, 1/m for an m-way tie at
the top), so it is a binomial proportion over queries.  Intervals are exact binomial
(Clopper-Pearson): they keep their coverage at 64 queries and at accuracies of 1.0, where
a bootstrap collapses to a point.  A tie-credited, fractional number of hits s gets the lower
bound of floor(s) and the upper bound of ceil(s), which keeps the interval conservative.
The paired test is exact McNemar (two-sided binomial test on the queries where exactly one
of the two hits) when every credit is 0 or 1; with fractional credits it is the sign-flip
randomisation test of the summed differences, of which McNemar is the 0/1 case (seeded
Monte Carlo).  Means that are not proportions (MRR) get a seeded percentile bootstrap.
No scipy: these need only binomial tails, in log space with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

LEVEL = 0.95
DRAWS = 10_000  # Monte Carlo draws of the sign-flip test and the bootstrap
_CHUNK = 500


@lru_cache(maxsize=64)
def _log_comb(n: int) -> tuple[np.ndarray, np.ndarray]:
    """log C(n, k) and k for k = 0..n."""
    k = np.arange(1, n + 1)
    return np.concatenate([[0.0], np.cumsum(np.log(n - k + 1) - np.log(k))]), np.arange(n + 1)


def _log_binom_pmf(n: int, p: float) -> np.ndarray:
    """log P(X = k) for k = 0..n, X ~ Binomial(n, p), 0 < p < 1."""
    log_comb, j = _log_comb(n)
    return log_comb + j * math.log(p) + (n - j) * math.log1p(-p)


def _tail(n: int, p: float, x: int, upper: bool) -> float:
    """P(X >= x) when ``upper``, else P(X <= x), X ~ Binomial(n, p)."""
    if p <= 0.0:
        return float(x <= 0) if upper else 1.0
    if p >= 1.0:
        return 1.0 if upper else float(x >= n)
    logs = _log_binom_pmf(n, p)
    part = logs[x:] if upper else logs[: x + 1]
    top = part.max()
    return float(math.exp(top) * np.exp(part - top).sum())


def _solve(f, target: float) -> float:
    """p in [0, 1] with f(p) = target for f increasing in p (bisection to machine precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):  # 2^-50: below any printed digit
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def proportion_ci(credits: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of the mean of per-query credits in [0, 1]."""
    credits = np.asarray(credits, dtype=np.float64).ravel()
    return binomial_ci(float(credits.sum()), credits.size, level)


def binomial_ci(total: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of ``total`` hits (possibly fractional) in ``n`` queries."""
    if n < 1:
        raise ValueError("an interval needs at least one query")
    low_hits, high_hits = math.floor(total + 1e-9), math.ceil(total - 1e-9)
    alpha = (1 - level) / 2
    low = 0.0 if low_hits <= 0 else _solve(lambda p: _tail(n, p, low_hits, upper=True), alpha)
    high = 1.0 if high_hits >= n else _solve(lambda p: -_tail(n, p, high_hits, upper=False), -alpha)
    return low, high


def bootstrap_ci(values: np.ndarray, seed: int = 0, level: float = LEVEL, draws: int = DRAWS) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of a mean over queries."""
    values = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, values.size, size=(min(_CHUNK, draws - i), values.size))].mean(axis=1)
                            for i in range(0, draws, _CHUNK)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedTest:
    """A strategy's per-query credits against a reference's (``full``) on the same queries."""

    difference: float  # mean credit of the strategy minus the reference's
    better: float  # summed credit by which the strategy beats the reference, over queries where it does
    worse: float  # the same where the reference wins
    p_value: float  # two-sided
    method: str
    basis: str = "in-sample"  # which of the strategy's credits: "in-sample" or "held-out"

    def to_json(self) -> dict[str, Any]:
        return {"p_value": self.p_value, "difference": self.difference, "better": self.better,
                "worse": self.worse, "method": self.method, "basis": self.basis}


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value: discordant queries split as Binomial(better + worse, 1/2)."""
    n = better + worse
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1))
    return min(1.0, 2 * tail / 2**n) if n else 1.0


def sign_flip_p(differences: np.ndarray, seed: int = 0, draws: int = DRAWS) -> float:
    """Two-sided p-value of the summed paired differences under random sign flips (seeded Monte Carlo)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-12
    rng = np.random.default_rng(seed)
    extreme = sum(int(np.sum(np.abs(rng.choice([-1.0, 1.0], size=(min(_CHUNK, draws - i), d.size)) @ d) >= observed))
                  for i in range(0, draws, _CHUNK))
    return (1 + extreme) / (1 + draws)


def paired_test(credits: np.ndarray, reference: np.ndarray, seed: int = 0, basis: str = "in-sample") -> PairedTest:
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
