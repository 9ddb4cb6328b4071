"""Transforms fed a component at a time: the same outputs and cosines as on whole materialised gradients.

Expected values come from ``transform(sample_features(...))``: every selected gradient materialised at once,
the path the engine took before it streamed components.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import tiny
from selproj_plugin import get_strategy
from selproj_plugin.components import Component, catalogue
from selproj_plugin.engine import EngineConfig, build_table, iter_factors, plan_table, prepare, sample_features
from selproj_plugin.loss import encode_samples
from selproj_plugin.projection import CountSketch, PerComponentSketch
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import reduction
from selproj_plugin.projector import Projector, share_codes
from selproj_plugin.transforms import Concatenate, TransformError


def _comps(sizes: list[int]) -> list[Component]:
    return [Component(f"c{i}", "w", i, (f"c{i}.weight",), n) for i, n in enumerate(sizes)]


def _cosines(projected: torch.Tensor, n_q: int, index: np.ndarray) -> np.ndarray:
    p = torch.nn.functional.normalize(projected.double(), dim=1)
    return np.array([[float(p[q] @ p[n_q + int(c)]) for c in row] for q, row in enumerate(index)])


@pytest.mark.parametrize("order", ["stream", "gram"])
def test_streamed_cosines_equal_those_of_materialised_gradients(order):
    model, tok = tiny.model("qwen2", tied=True), tiny.tokenizer()  # biases: parameter layout differs from matrix form
    comps = catalogue(model, "all")
    maps = [
        reduction(get_strategy("random_projection", dim=512, seed=1), comps).transform,
        reduction(get_strategy("random_projection_per_component", dim="10%", seed=2), comps).transform,
    ]
    queries = [Sample("q0", "Tell me about the sky", "It is blue."), tiny.SAMPLES[2]]
    index = np.array([[0, 1, 2, 3], [2, 3, 1, 0]])
    cfg = EngineConfig(batch_size=3, progress=False, dot_order=order)
    table = build_table(model, tok, queries, tiny.SAMPLES[:4], index, np.array([0, 0]), transforms=maps, config=cfg, scope="all")
    assert table.meta["plan"]["dot_order"] == order
    feats = sample_features(model, tok, queries + tiny.SAMPLES[:4], config=cfg, scope="all")
    for r, t in enumerate(maps):
        np.testing.assert_allclose(table.rp_similarity[r], _cosines(t(feats), len(queries), index), rtol=1e-5)


def test_a_sketch_fed_a_component_at_a_time_equals_its_call_bit_for_bit():
    comps = _comps([300, 7, 50])
    gen = torch.Generator().manual_seed(3)
    x = {c.name: torch.randn(2, c.num_params, generator=gen) for c in comps}
    for t in (CountSketch(comps, 40, seed=4), PerComponentSketch(comps, [10, 3, 5], seed=4)):
        sums = t.begin(2)
        for c in comps:
            sums.add(c.name, x[c.name])
        assert torch.equal(sums.finish().double(), t(x))
    with pytest.raises(TransformError, match="does not project"):
        CountSketch(comps, 40).begin(1).add("other", torch.zeros(1, 3))
    with pytest.raises(TransformError, match=r"must be \[1, 7\]"):
        CountSketch(comps, 40).begin(1).add("c1", torch.zeros(1, 8))


def test_codes_beyond_the_cache_are_drawn_again_to_the_same_map():
    comps = _comps([400, 400, 400])
    x = {c.name: torch.randn(1, c.num_params) for c in comps}
    cached, bounded = CountSketch(comps, 64, seed=9), CountSketch(comps, 64, seed=9)
    bounded.cache_bytes = 4 * 400  # the first component's codes only
    assert torch.equal(cached(x), bounded(x)) and torch.equal(cached(x), bounded(x))
    assert cached.cached_bytes == 3 * 4 * 400 and bounded.cached_bytes == 4 * 400
    # held: the sums, the cache, one component's codes drawn afresh with their temporaries
    assert bounded.held_bytes(1) == 2 * 4 * 64 + 4 * 400 + 4 * 400
    assert cached.held_bytes(1) == 2 * 4 * 64 + 3 * 4 * 400
    assert share_codes([cached, bounded], 2 * 4 * 400 * 3) == 4 * 400 * 3  # half the room, first ones first
    assert cached.cache_bytes == 3 * 4 * 400 and bounded.cache_bytes == 0


def test_a_transform_that_is_not_additive_gets_its_components_gathered():
    model, tok = tiny.model("llama"), tiny.tokenizer()
    prep = prepare(model, tok, None)
    comps = [s.component for s in prep.specs][1:4]
    concat = Concatenate(comps, weights=[1.0, 2.0, 0.5])
    feats = sample_features(model, tok, tiny.SAMPLES[:2], components=[c.name for c in comps], config=EngineConfig(progress=False))
    encoded, _ = encode_samples(tok, tiny.SAMPLES[:2], 512)
    projector = Projector(prep.specs, [concat, CountSketch(comps, 16)])
    for i, f in iter_factors(prep, encoded, [0, 1], EngineConfig(progress=False)):
        out = projector(f)
        expected = concat({n: v[i : i + 1] for n, v in feats.items()})[0]
        torch.testing.assert_close(out[0].double(), expected.double(), rtol=1e-6, atol=1e-7)


def test_the_plan_counts_what_projecting_holds_and_less_than_a_whole_gradient():
    model, tok = tiny.model("llama"), tiny.tokenizer()
    comps = catalogue(model)
    total = sum(c.num_params for c in comps)
    sketch = CountSketch(comps, 64)
    index = np.tile(np.arange(3), (2, 1))
    cfg = EngineConfig(progress=False, memory_limit_gb=64)
    plain = plan_table(model, tok, tiny.SAMPLES[:2], tiny.SAMPLES[:3], index, config=cfg)
    projected = plan_table(model, tok, tiny.SAMPLES[:2], tiny.SAMPLES[:3], index, transforms=[sketch], config=cfg)
    assert plain.projection_bytes == 0 and projected.projection_bytes > 0
    assert projected.summary()["projection_bytes"] == projected.projection_bytes
    assert "projections" in projected.describe()
    # the sketch's sums, its codes (all cached at this limit), the largest component, fp32 and float64 outputs
    largest = max(c.num_params for c in comps)
    assert projected.projection_bytes == 2 * 4 * 64 + 4 * total + 4 * largest + 20 * 64
    assert projected.peak_bytes - plain.peak_bytes <= projected.projection_bytes
