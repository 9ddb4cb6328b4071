"""Count-sketch projections: unbiased, with the variance of their formula, reproducible, one map in the engine.

Expected variances come from the count-sketch formula on the exact vectors, not from the code:
``Var<Pa, Pb> = sum over blocks (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / buckets``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import tiny
from selproj_plugin import get_strategy
from selproj_plugin.components import Component, catalogue
from selproj_plugin.engine import EngineConfig, build_table, projected_features, sample_features
from selproj_plugin.projection import CountSketch, PerComponentSketch, split_dims
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import reduction
from selproj_plugin.transforms import TransformError

SEEDS = 400


def _comps(sizes: list[int]) -> list[Component]:
    return [Component(f"c{i}", "w", i, (f"c{i}.weight",), n) for i, n in enumerate(sizes)]


def _heavy_small_components() -> tuple[list[Component], dict, dict]:
    """One big component with little of the norm and ten small ones with most of it (like a model's norms)."""
    comps = _comps([4000] + [20] * 10)
    gen = torch.Generator().manual_seed(0)
    a = {c.name: torch.randn(1, c.num_params, generator=gen, dtype=torch.float64) * (0.05 if i == 0 else 1.0) for i, c in enumerate(comps)}
    b = {n: 0.6 * v + torch.randn(v.shape, generator=gen, dtype=torch.float64) * (0.05 if n == "c0" else 1.0) for n, v in a.items()}
    return comps, a, b


def _flat(x: dict) -> torch.Tensor:
    return torch.cat([v[0] for v in x.values()])


def _block_variance(a: torch.Tensor, b: torch.Tensor, buckets: int) -> float:
    """Count-sketch variance of <Pa, Pb> for one block of ``buckets`` (fully random hashes and signs)."""
    na, nb, ab = float(a @ a), float(b @ b), float(a @ b)
    return (na * nb + ab**2 - 2 * float((a * a) @ (b * b))) / buckets


def _estimates(make, a: dict, b: dict) -> np.ndarray:
    out = []
    for seed in range(SEEDS):
        t = make(seed)
        out.append(float(t(a)[0] @ t(b)[0]))
    return np.array(out)


def test_count_sketch_is_unbiased_with_the_count_sketch_variance():
    comps, a, b = _heavy_small_components()
    dim = 64
    est = _estimates(lambda s: CountSketch(comps, dim, seed=s), a, b)
    fa, fb = _flat(a), _flat(b)
    exact = float(fa @ fb)
    expected_var = _block_variance(fa, fb, dim)
    assert abs(est.mean() - exact) < 4 * np.sqrt(expected_var / SEEDS)
    # sample variance of 400 draws is within ~7% (1 sigma) of the truth
    assert 0.75 < est.var() / expected_var < 1.25
    dense = (float(fa @ fa) * float(fb @ fb) + exact**2) / dim  # dense Gaussian projection at the same dim
    assert est.var() < 1.25 * dense


def test_split_by_parameter_count_is_the_noisier_paper_variant():
    comps, a, b = _heavy_small_components()
    dim = 64
    dims = split_dims([c.num_params for c in comps], dim)
    assert sum(dims) == dim and max(dims[1:]) <= 2  # the small, heavy components get one or two buckets each
    est = _estimates(lambda s: PerComponentSketch(comps, dims, seed=s), a, b)
    exact = float(_flat(a) @ _flat(b))
    expected_var = sum(_block_variance(a[c.name][0], b[c.name][0], d) for c, d in zip(comps, dims))
    assert abs(est.mean() - exact) < 4 * np.sqrt(expected_var / SEEDS)  # unbiased too ...
    assert 0.75 < est.var() / expected_var < 1.25
    # ... but far noisier than one shared sketch: the tolerance above would reject it as a JL map
    assert est.var() > 3 * _block_variance(_flat(a), _flat(b), dim)


def test_per_component_blocks_and_keys():
    comps = _comps([300, 50, 7])
    t = get_strategy("random_projection_per_component", dim="10%").transform(comps)
    assert isinstance(t, PerComponentSketch) and t.dims == [30, 5, 1] and t.dim == 36
    assert t.key.startswith("per_component@36:")
    x = {c.name: torch.zeros(1, c.num_params) for c in comps}
    x["c1"][0, 3] = 1.0
    out = t(x)[0]
    assert out.shape == (36,) and out.abs().sum() == 1 and out[30:35].abs().sum() == 1  # only c1's block
    shared = get_strategy("random_projection", dim=36).transform(comps)
    assert isinstance(shared, CountSketch) and shared.key.startswith("count_sketch@36:")


def test_seeded_and_reproducible():
    comps = _comps([500, 40])
    gen = torch.Generator().manual_seed(1)
    x = {c.name: torch.randn(3, c.num_params, generator=gen) for c in comps}
    one = CountSketch(comps, 32, seed=5)(x)
    assert one.shape == (3, 32) and one.dtype == torch.float64
    assert torch.equal(one, CountSketch(comps, 32, seed=5)(x))  # a fresh object: the same map
    assert not torch.allclose(one, CountSketch(comps, 32, seed=6)(x))
    # rows are independent: a batch equals its rows one at a time
    assert torch.equal(one[1], CountSketch(comps, 32, seed=5)({n: v[1:2] for n, v in x.items()})[0])
    with pytest.raises(TransformError, match="expects features"):
        CountSketch(comps, 32)({"c0": x["c0"]})


def test_engine_stores_cosines_of_the_same_map_within_the_jl_bound():
    model = tiny.model("qwen2", tied=True)  # with biases: parameter layout differs from matrix form
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    dim = 1024
    transform = reduction(get_strategy("random_projection", dim=dim, seed=3), comps).transform
    queries = [Sample("q0", "Tell me about the sky", "It is blue."), tiny.SAMPLES[2]]
    index = np.array([[0, 1, 2], [2, 3, 1]])
    cfg = EngineConfig(batch_size=3, progress=False)
    table = build_table(model, tok, queries, tiny.SAMPLES, index, np.array([0, 0]), transforms=[transform], config=cfg, scope="all")
    assert list(table.rp_keys) == [transform.key] and list(table.rp_dims) == [dim]
    stored = table.rp_similarity[0]
    # one map everywhere: the stored cosine is that of transform(sample_features(...)) ...
    feats = sample_features(model, tok, queries + tiny.SAMPLES, config=cfg, scope="all")
    projected = transform(feats)
    assert torch.allclose(
        projected_features(model, tok, queries + tiny.SAMPLES, transform, cfg, scope="all"),
        projected,
        rtol=1e-5,
        atol=1e-5 * float(projected.abs().max()),
    )
    p = torch.nn.functional.normalize(projected, dim=1)
    expected = np.array([[float(p[q] @ p[len(queries) + int(c)]) for c in row] for q, row in enumerate(index)])
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    # ... and within the JL bound of the exact cosine at this dim (std of a projected cosine <= (1 - cos^2) / sqrt(dim))
    exact = table.cross.sum(-1) / np.sqrt(table.query_self.sum(-1)[:, None] * table.candidate_self.sum(-1))
    assert np.all(np.abs(stored - exact) <= 5 * (1 - exact**2) / np.sqrt(dim) + 1e-6)
    assert np.any(np.abs(stored - exact) > 1e-6)  # projected, not exact


def test_a_transform_of_other_components_is_refused():
    model = tiny.model("llama")
    other = CountSketch(_comps([10]), 4)
    with pytest.raises(ValueError, match="not a component of this table"):
        build_table(
            model,
            tiny.tokenizer(),
            tiny.SAMPLES[:1],
            tiny.SAMPLES[:2],
            np.array([[0, 1]]),
            np.array([0]),
            transforms=[other],
            config=EngineConfig(progress=False),
        )
