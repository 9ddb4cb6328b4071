"""Captum adapter: TracInCP through a reducer against the engine's per-component dot products."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("captum")
from captum.influence import TracInCP  # noqa: E402

from selproj_plugin.adapters.captum import (  # noqa: E402
    AdapterError,
    ReducedTracInCP,
    ResponseLoss,
    dataset,
    encode,
    tracin_layers,
)
from selproj_plugin.adapters.captum import _Logits  # noqa: E402
from selproj_plugin.components import catalogue  # noqa: E402
from tests.attribution import (  # noqa: E402
    CANDIDATES,
    QUERIES,
    RP_MIN_CORRELATION,
    SELECTION,
    TINY_LIMIT_GB,
    Recorder,
    assert_same_retrieval,
    component_order,
    engine_cosines,
    reduced_trak_scores,
    trak_scores,
)
from selproj_plugin.engine import EngineConfig, pairwise_dots  # noqa: E402

LINEAR_SELECTION = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj", "model.layers.2.mlp.up_proj"]

# TINY_LIMIT_GB is a budget beside the model, as the process held nothing (test_adapters_budget.py: what it holds)
pytestmark = pytest.mark.usefixtures("nothing_resident")


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def tracin_scores(model, tokenizer, checkpoint, strategy, options=None, **kwargs) -> np.ndarray:
    """[Q, K] influence of candidates (train) on queries (test) through ReducedTracInCP."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that integer token ids take no gradient
        tracin = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), [checkpoint], strategy, options, batch_size=4, **kwargs)
        return tracin.influence(encode(tokenizer, QUERIES)).detach().double().numpy()


@pytest.mark.parametrize("strategy", ["full", "selection"])
def test_tracin_ranks_like_the_engine(model, tokenizer, checkpoint, strategy):
    if strategy == "full":
        scores = tracin_scores(model, tokenizer, checkpoint, "full")
        expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES)
    else:
        scores = tracin_scores(model, tokenizer, checkpoint, "greedy", {"selection": SELECTION}, scope="all")
        expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES, component_order(model, SELECTION), scope="all")
    assert_same_retrieval(scores, expected)


@pytest.mark.parametrize("strategy", ["full", "random_projection"])
def test_tracin_streams_under_a_memory_limit(model, tokenizer, checkpoint, monkeypatch, tmp_path, strategy):
    from selproj_plugin import get_strategy

    reducer = get_strategy(strategy) if strategy == "full" else get_strategy(strategy, dim=512)
    recorder = Recorder(monkeypatch, reducer)
    spill = tmp_path / "spill"
    spill.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, reducer, memory_limit_gb=TINY_LIMIT_GB, spill_dir=spill)
        streamed = tracin.influence(encode(tokenizer, QUERIES)).detach().double().numpy()
    # built once; one sample's gradients at a time, each computed once (test rows wait on disk), disk cleaned
    assert recorder.built == 1 and tracin.batch_size == 1 and tracin.test_rows == 1
    assert recorder.rows == [1] * (len(QUERIES) + len(CANDIDATES))
    assert list(spill.iterdir()) == []
    whole = tracin_scores(model, tokenizer, checkpoint, strategy, None if strategy == "full" else {"dim": 512})
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    if strategy == "full":
        assert_same_retrieval(streamed, engine_cosines(model, tokenizer, QUERIES, CANDIDATES))


def test_tracin_parts_give_every_influence_mode(model, tokenizer, checkpoint):
    options = {"selection": LINEAR_SELECTION}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "greedy", options, memory_limit_gb=TINY_LIMIT_GB)
        whole = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), [checkpoint], "greedy", options, batch_size=4)
        loader = torch.utils.data.DataLoader(dataset(tokenizer, QUERIES), batch_size=3)
        for inputs in (encode(tokenizer, QUERIES), loader):
            torch.testing.assert_close(parts.influence(inputs), whole.influence(encode(tokenizer, QUERIES)), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            parts.influence(loader, aggregate=True), whole.influence(encode(tokenizer, QUERIES), aggregate=True), atol=1e-5, rtol=0
        )
        a, b = parts.influence(loader, k=3), whole.influence(encode(tokenizer, QUERIES), k=3)
        torch.testing.assert_close(a.influence_scores, b.influence_scores, atol=1e-5, rtol=0)
        assert torch.equal(a.indices, b.indices)
        a, b = parts.influence(loader, k=2, aggregate=True), whole.influence(encode(tokenizer, QUERIES), k=2, aggregate=True)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(
            parts.self_influence(encode(tokenizer, QUERIES)), whole.self_influence(encode(tokenizer, QUERIES)), atol=1e-5, rtol=0
        )
    assert parts.test_rows == 1 and whole.test_rows >= len(QUERIES)


def test_tracin_batch_over_the_memory_limit_is_one_line_error(model, tokenizer):
    with pytest.raises(
        AdapterError,
        match=r"a training batch of 4 samples holds 4 x [\d,]+ reduced floats .* "
        r"use batch_size<=1 or batch_size=None",
    ) as err:
        ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "full", batch_size=4, memory_limit_gb=TINY_LIMIT_GB)
    assert "\n" not in str(err.value)
    with pytest.raises(AdapterError, match="checkpoints_load_func needs checkpoints"):
        ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "full", checkpoints_load_func=lambda m, p: 1.0)
    with pytest.raises(AdapterError, match="memory_limit_gb must be a positive number"):
        ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "full", memory_limit_gb=-1)


def test_per_sample_trick_on_linear_layers_matches(model, tokenizer, checkpoint):
    expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES, component_order(model, LINEAR_SELECTION))
    trick = tracin_scores(model, tokenizer, checkpoint, "greedy", {"selection": LINEAR_SELECTION}, sample_wise_grads_per_batch=True)
    assert_same_retrieval(trick, expected)


def test_per_sample_trick_refuses_non_linear_layers(model, tokenizer, checkpoint):
    with pytest.raises(AdapterError, match=r"supports only nn.Linear/nn.Conv2d layers; model.norm is LlamaRMSNorm"):
        ReducedTracInCP(
            model,
            dataset(tokenizer, CANDIDATES),
            [checkpoint],
            "greedy",
            {"selection": SELECTION},
            scope="all",
            sample_wise_grads_per_batch=True,
        )


def test_unnormalised_scores_are_gradient_dot_products(model, tokenizer, checkpoint):
    names = component_order(model, LINEAR_SELECTION)
    scores = tracin_scores(model, tokenizer, checkpoint, "greedy", {"selection": LINEAR_SELECTION}, normalize=False)
    dots = pairwise_dots(model, tokenizer, QUERIES, CANDIDATES, names, EngineConfig(progress=False)).sum(-1)
    np.testing.assert_allclose(scores, dots, rtol=1e-4, atol=1e-6 * np.abs(dots).max())


def test_random_projection_correlates(model, tokenizer, checkpoint):
    scores = tracin_scores(model, tokenizer, checkpoint, "random_projection")
    corr = np.corrcoef(scores.ravel(), engine_cosines(model, tokenizer, QUERIES, CANDIDATES).ravel())[0, 1]
    print(f"captum random_projection (1%): correlation with exact cosines {corr:.4f}")
    assert corr >= RP_MIN_CORRELATION


def test_third_party_reducer_works_in_captum(model, tokenizer, checkpoint, weighted_plugin):
    names, weights = weighted_plugin(model)
    scores = tracin_scores(model, tokenizer, checkpoint, "weighted_mlp")
    assert_same_retrieval(scores, engine_cosines(model, tokenizer, QUERIES, CANDIDATES, names, weights))


def test_layers_for_plain_tracincp(model, tokenizer, checkpoint):
    layers = tracin_layers(model, "greedy", {"selection": ["model.layers.1.mlp.down_proj.weight", "model.norm"]}, scope="all")
    assert layers == ["model.layers.1.mlp.down_proj", "model.norm"]
    assert tracin_layers(model, "full") == [c.name for c in catalogue(model)]
    wrapped = tracin_layers(model, "greedy", {"selection": LINEAR_SELECTION}, prefix="model.")
    assert wrapped == ["model." + n for n in component_order(model, LINEAR_SELECTION)]
    # plain Captum with these layers computes the selected components' gradient dot products
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = TracInCP(
            _Logits(model),
            dataset(tokenizer, CANDIDATES),
            [checkpoint],
            checkpoints_load_func=lambda m, path: (m.model.load_state_dict(torch.load(path)), 1.0)[1],
            layers=wrapped,
            loss_fn=ResponseLoss("none"),
            batch_size=4,
        )
        scores = plain.influence(encode(tokenizer, QUERIES)).detach().double().numpy()
    dots = pairwise_dots(model, tokenizer, QUERIES, CANDIDATES, component_order(model, LINEAR_SELECTION), EngineConfig(progress=False)).sum(
        -1
    )
    np.testing.assert_allclose(scores, dots, rtol=1e-4, atol=1e-6 * np.abs(dots).max())


def test_bad_input_is_a_one_line_error(model, tokenizer, checkpoint):
    with pytest.raises(AdapterError, match=r"selects 'model\.layers\.9\.mlp', which is not a component") as err:
        tracin_layers(model, "greedy", {"selection": ["model.layers.9.mlp"]})
    assert "\n" not in str(err.value)
    with pytest.raises(AdapterError, match="reduction must be 'none' or 'sum'"):
        ResponseLoss("mean")


def test_a_row_without_response_tokens_is_a_one_line_error(model, tokenizer):
    from selproj_plugin.adapters.trak import CausalLMOutput, SelectedGradientComputer

    input_ids, mask, labels = encode(tokenizer, QUERIES[:3])
    labels[1] = -100  # e.g. a prompt longer than max_length: nothing left to take the loss of
    batch = (input_ids, mask, labels)
    message = r"row 1 of the batch has no response token \(every label is -100\)"
    computer = SelectedGradientComputer(model, CausalLMOutput(), grad_wrt=["model.norm.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES[:2]), None, "greedy", {"selection": LINEAR_SELECTION})
        calls = [
            lambda: computer.compute_per_sample_grad(batch),
            lambda: tracin.influence(batch),
            lambda: ResponseLoss("none")(torch.zeros(3, input_ids.shape[1], 8), labels),
        ]
        for call in calls:
            with pytest.raises(AdapterError, match=message) as err:
                call()
            assert "\n" not in str(err.value)


# ---- long vectors: a full gradient has 10^8 entries ------------------------------------
from selproj_plugin.transforms import Concatenate, Transform  # noqa: E402


class Tiled(Transform):
    """The selected gradients concatenated, then repeated: same cosines, ~4M entries a row.

    A repeated pattern makes partial sums grow coherently, so float32 accumulation over the row
    loses digits as it does on a real model's full gradient (4e-2 of a cosine on SmolLM2-135M).
    """

    def __init__(self, selected, repeats):
        self.inner, self.repeats = Concatenate(selected), repeats
        self.components, self.dim = self.inner.components, self.inner.dim * repeats
        self.key = f"tiled{repeats}:{self.inner.key}"

    def __call__(self, features):
        return self.inner(features).repeat(1, self.repeats)


def tiled_reducer(repeats):
    from dataclasses import dataclass

    from selproj_plugin import Reducer

    @dataclass
    class TiledFull(Reducer):
        name = "tiled_full"

        def transform(self, selected):
            return Tiled(selected, repeats)

    return TiledFull()


@pytest.mark.slow
def test_cosines_of_long_rows_are_summed_in_float64(model, tokenizer, tmp_path):
    pytest.importorskip("trak")
    expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES)
    total = sum(c.num_params for c in catalogue(model))
    reducer = tiled_reducer(4_000_000 // total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, reducer, batch_size=4)
        captum = tracin.influence(encode(tokenizer, QUERIES)).detach().double().numpy()
        spilled = (
            ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, reducer, memory_limit_gb=0.05, spill_dir=tmp_path)
            .influence(encode(tokenizer, QUERIES))
            .detach()
            .double()
            .numpy()
        )
    _, reduced = reduced_trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "r", reducer)
    plain = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "p", reducer, memory_limit_gb=1.0)
    paths = {"ReducedTracInCP": captum, "ReducedTracInCP spilled": spilled, "ReducedTRAKer": reduced, "TRAKer": plain}
    errors = {name: np.abs(got - expected).max() / np.abs(expected).max() for name, got in paths.items()}
    assert max(errors.values()) <= 1e-5, errors
