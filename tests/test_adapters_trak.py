"""TRAK adapter: scores through TRAKer against the engine's per-component dot products.

The expected cosines come from ``selproj_plugin.engine.pairwise_dots`` (hooked gradient
factors, a different computation from the adapter's ``vmap(grad)``); TRAK's own
``FunctionalGradientComputer`` is the reference for the selected-gradient computer.
The tiny model, samples and engine cosines are in ``tests/attribution.py``, the fixtures in conftest.py.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from selproj_plugin.components import catalogue, select
from tests.attribution import (
    CANDIDATES,
    QUERIES,
    RP_MIN_CORRELATION,
    SELECTION,
    TINY_LIMIT_GB,
    Recorder,
    assert_same_retrieval,
    component_order,
    engine_cosines,
    make_model,
    reduced_trak_scores,
    trak_scores,
)

trak = pytest.importorskip("trak")
from trak import TRAKer  # noqa: E402
from trak.gradient_computers import FunctionalGradientComputer  # noqa: E402

from selproj_plugin.adapters._rows import RowFile  # noqa: E402
from selproj_plugin.adapters.trak import (  # noqa: E402
    AdapterError,
    CausalLMOutput,
    CosineScoreComputer,
    ReducedTRAKer,
    ReducerProjector,
    SelectedGradientComputer,
    check_fast_jl_dim,
    encode,
    traker_kwargs,
)

# TINY_LIMIT_GB is a budget beside the model, as the process held nothing (test_adapters_budget.py: what it holds)
pytestmark = pytest.mark.usefixtures("nothing_resident")


# ---- scores against the engine --------------------------------------------------------
@pytest.mark.parametrize("strategy", ["full", "selection"])
def test_trak_ranks_like_the_engine(model, tokenizer, tmp_path, strategy):
    if strategy == "full":
        scores = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path, "full")
        expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES)
    else:
        scores = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path, "greedy", {"selection": SELECTION}, scope="all")
        expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES, component_order(model, SELECTION), scope="all")
    assert_same_retrieval(scores, expected)
    assert np.ptp(expected) > 0.2  # the check is not vacuous: candidates differ


def test_trak_random_projection_correlates(model, tokenizer, tmp_path):
    kwargs = traker_kwargs(model, "random_projection")
    total = sum(c.num_params for c in catalogue(model))
    assert kwargs["proj_dim"] == round(0.01 * total)  # the default dimension, 1%
    scores = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path, "random_projection")
    expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES)
    corr = np.corrcoef(scores.ravel(), expected.ravel())[0, 1]
    print(f"random_projection dim={kwargs['proj_dim']}: correlation with exact cosines {corr:.4f}")
    assert corr >= RP_MIN_CORRELATION


def test_third_party_reducer_works_in_trak(model, tokenizer, tmp_path, weighted_plugin):
    names, weights = weighted_plugin(model)
    scores = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path, "weighted_mlp")
    assert_same_retrieval(scores, engine_cosines(model, tokenizer, QUERIES, CANDIDATES, names, weights))
    unweighted = engine_cosines(model, tokenizer, QUERIES, CANDIDATES, names)
    assert np.abs(scores - unweighted).max() > 1e-3  # the plugin's reduce was applied, not just its selection


# ---- streaming under a memory limit ------------------------------------------------------
@pytest.mark.parametrize("strategy", ["full", "selection"])
def test_reduced_traker_streams_and_ranks_like_the_engine(model, tokenizer, tmp_path, monkeypatch, strategy):
    from selproj_plugin import get_strategy

    reducer = get_strategy("full") if strategy == "full" else get_strategy("greedy", selection=SELECTION)
    names = None if strategy == "full" else component_order(model, SELECTION)
    recorder = Recorder(monkeypatch, reducer)
    widths = []
    columns = RowFile.columns
    monkeypatch.setattr(RowFile, "columns", lambda self, a, b: widths.append(b - a) or columns(self, a, b))
    scope = "paper" if strategy == "full" else "all"
    traker, scores = reduced_trak_scores(
        model, tokenizer, QUERIES, CANDIDATES, tmp_path / "store", reducer, memory_limit_gb=TINY_LIMIT_GB, scope=scope
    )
    assert_same_retrieval(scores, engine_cosines(model, tokenizer, QUERIES, CANDIDATES, names, scope=scope))
    # the transform is built once, then applied to one sample's gradients at a time
    assert recorder.built == 1
    assert recorder.rows == [1] * (len(CANDIDATES) + len(QUERIES))
    # scores read the stores a block of columns at a time, never a whole row
    dim = traker.plan.dimension
    assert dim > 4 * 1024 and max(widths) == 1024 and sum(widths) == 2 * dim
    # the stores are in save_dir, as files of rows, and nowhere else
    grads = tmp_path / "store" / "0" / "grads.mmap"
    assert grads.stat().st_size >= len(CANDIDATES) * dim * 4
    assert not (tmp_path / "store" / "0" / "features.mmap").exists()
    assert np.load(grads, mmap_mode="r").shape == (len(CANDIDATES), dim)


def test_random_projection_is_built_once_and_cut_anywhere(model, tokenizer, tmp_path, monkeypatch):
    from selproj_plugin import get_strategy

    reducer = get_strategy("random_projection", dim=512, seed=3)
    recorder = Recorder(monkeypatch, reducer)
    _, streamed = reduced_trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "a", reducer, memory_limit_gb=TINY_LIMIT_GB)
    assert recorder.built == 1 and recorder.rows == [1] * (len(CANDIDATES) + len(QUERIES))
    _, whole = reduced_trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "b", "random_projection", {"dim": 512, "seed": 3})
    np.testing.assert_allclose(streamed, whole, atol=1e-5)  # seeded: the same map however batches are cut
    _, other_seed = reduced_trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "c", "random_projection", {"dim": 512, "seed": 4})
    assert np.abs(other_seed - whole).max() > 1e-3


def test_trak_score_keeps_trak_stores(model, tokenizer, tmp_path):
    options = {"dim": 8, "seed": 1}  # fewer dimensions than samples: X^T X inverts
    _, reduced = reduced_trak_scores(
        model,
        tokenizer,
        QUERIES,
        CANDIDATES,
        tmp_path / "a",
        "random_projection",
        options,
        score="trak",
        memory_limit_gb=TINY_LIMIT_GB * 1e3,
    )
    plain = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "b", "random_projection", options, score="trak")
    np.testing.assert_allclose(reduced, plain, rtol=1e-4, atol=1e-6)


def test_plain_traker_refuses_a_batch_over_the_memory_limit(model, tokenizer, tmp_path):
    traker = TRAKer(
        train_set_size=len(CANDIDATES),
        save_dir=str(tmp_path),
        logging_level=logging.ERROR,
        **traker_kwargs(model, "full", memory_limit_gb=TINY_LIMIT_GB),
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    with pytest.raises(
        AdapterError,
        match=r"a batch of 3 samples reduces to 3 x [\d,]+ floats .* pass at most 1 per "
        r"call \(ReducedTRAKer splits batches\)",
    ) as err:
        traker.featurize(batch=encode(tokenizer, CANDIDATES[:3]), num_samples=3)
    assert "\n" not in str(err.value)


def test_memory_and_store_mistakes_are_one_line_errors(model, tokenizer, tmp_path):
    cases = [
        (lambda: traker_kwargs(model, "full", score="trak"), r"score='trak' inverts a [\d,]+-square matrix"),
        (lambda: traker_kwargs(model, "full", memory_limit_gb=0), "memory_limit_gb must be a positive number"),
        (lambda: traker_kwargs(model, "full", memory_limit_gb="lots"), "memory_limit_gb must be a positive number"),
        (lambda: ReducedTRAKer(model, "full", train_set_size=3, save_dir=None), "save_dir is required"),
        (lambda: ReducedTRAKer(model, "full", train_set_size=0, save_dir=tmp_path), "train_set_size must be a positive number"),
    ]
    for make, message in cases:
        with pytest.raises(AdapterError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
    traker = ReducedTRAKer(model, "greedy", {"selection": SELECTION[:2]}, train_set_size=2, save_dir=tmp_path / "s")
    with pytest.raises(AdapterError, match="call load_checkpoint before featurize"):
        traker.featurize(batch=encode(tokenizer, CANDIDATES[:2]), num_samples=2)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    with pytest.raises(AdapterError, match="num_samples=3 but the batch holds 2 samples"):
        traker.featurize(batch=encode(tokenizer, CANDIDATES[:2]), num_samples=3)
    with pytest.raises(AdapterError, match="model ID 0 is not fully featurized"):
        traker.finalize_features()
    traker.featurize(batch=encode(tokenizer, CANDIDATES[:2]), num_samples=2)
    with pytest.raises(AdapterError, match="model ID 0 is not finalized: call finalize_features"):
        traker.score(batch=encode(tokenizer, QUERIES[:1]), num_samples=1)
    with pytest.raises(AdapterError, match="del_grads=True would delete the stored rows"):
        traker.finalize_features(del_grads=True)
    traker.finalize_features()
    with pytest.raises(AdapterError, match="experiment 'nope' does not exist"):
        traker.finalize_scores(exp_name="nope")


# ---- the pieces -------------------------------------------------------------------------
def test_selected_gradients_equal_trak_grad_wrt(model, tokenizer):
    wrt = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    batch = encode(tokenizer, QUERIES)
    ours = SelectedGradientComputer(model, CausalLMOutput(), None, torch.float32, "cpu", grad_wrt=wrt)
    theirs = FunctionalGradientComputer(model, CausalLMOutput(), None, torch.float32, "cpu", grad_wrt=wrt)
    got, want = ours.compute_per_sample_grad(batch), theirs.compute_per_sample_grad(batch)
    assert list(got) == wrt and sorted(want) == sorted(wrt)
    for name in wrt:
        assert got[name].shape == (len(QUERIES), *dict(model.named_parameters())[name].shape)
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert got[wrt[0]].abs().sum() > 0


def test_model_output_is_the_engine_loss(model, tokenizer):
    from selproj_plugin.loss import collate, encode_samples, forward_losses, pad_token_id

    input_ids, mask, labels = encode(tokenizer, QUERIES)
    weights, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    ours = torch.stack([CausalLMOutput.get_output(model, weights, buffers, input_ids[i], mask[i], labels[i]) for i in range(len(QUERIES))])
    enc, _ = encode_samples(tokenizer, QUERIES, 512)
    with torch.no_grad():
        theirs = forward_losses(model, collate(enc, pad_token_id(tokenizer)))
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(CausalLMOutput().get_out_to_loss_grad(model, weights, buffers, (input_ids,)), torch.ones(len(QUERIES), 1))


def test_projector_takes_both_gradient_forms_and_survives_free_memory(model, tokenizer):
    projector = ReducerProjector(model, "greedy", {"selection": SELECTION}, scope="all")
    wrt = list(projector.plan.param_names)
    grads = SelectedGradientComputer(model, CausalLMOutput(), grad_wrt=wrt).compute_per_sample_grad(encode(tokenizer, QUERIES))
    by_dict = projector.project(grads, model_id=0)
    flat_selected = torch.cat([grads[n].flatten(1) for n in wrt], 1)
    every = {n: torch.zeros(len(QUERIES), p.numel()) for n, p in model.named_parameters()}
    every.update({n: g.flatten(1) for n, g in grads.items()})
    flat_model = torch.cat(list(every.values()), 1)
    assert by_dict.shape == (len(QUERIES), projector.proj_dim)
    assert projector.proj_dim == sum(c.num_params for c in select(catalogue(model, "all"), SELECTION))
    # greedy concatenates in selection order: the first selected component leads
    first = grads["model.layers.1.mlp.down_proj.weight"].flatten(1)
    torch.testing.assert_close(by_dict[:, : first.shape[1]], first)
    torch.testing.assert_close(projector.project(flat_selected, model_id=0), by_dict)
    torch.testing.assert_close(projector.project(flat_model, model_id=1), by_dict)
    projector.free_memory()
    torch.testing.assert_close(projector.project(grads, model_id=0), by_dict)
    with pytest.raises(AdapterError, match=r"flat gradient has 7 entries per sample, expected one of \[\d+, \d+\]"):
        projector.project(torch.zeros(2, 7), model_id=0)


def test_proj_type_is_stable_json_and_tells_reducers_apart(model):
    a = ReducerProjector(model, "greedy", {"selection": SELECTION}, scope="all").proj_type
    b = ReducerProjector(model, "greedy", {"selection": list(SELECTION)}, scope="all").proj_type
    c = ReducerProjector(model, "greedy", {"selection": SELECTION[:2]}, scope="all").proj_type
    d = ReducerProjector(model, "random_projection", {"dim": 64, "seed": 1}).proj_type
    e = ReducerProjector(model, "random_projection", {"dim": 64, "seed": 2}).proj_type
    assert a == b and len({a, c, d, e}) == 4
    assert json.loads(json.dumps({"JL matrix type": a}))["JL matrix type"] == a
    assert a.startswith("selproj:greedy:")
    from selproj_plugin import get_strategy

    instance = get_strategy("greedy", selection=SELECTION)  # a configured (e.g. fitted) reducer works too
    assert ReducerProjector(model, instance, scope="all").proj_type == a
    with pytest.raises(AdapterError, match="pass a configured reducer or a name, not both"):
        ReducerProjector(model, instance, {"selection": SELECTION}, scope="all")
    with pytest.raises(AdapterError, match="greedy has no selection yet"):
        ReducerProjector(model, "greedy")


def test_cosine_score_computer():
    rng = np.random.default_rng(0)
    train, target = torch.tensor(rng.normal(size=(5, 8))), torch.tensor(rng.normal(size=(3, 8)))
    sc = CosineScoreComputer(torch.float32, "cpu")
    features = sc.get_x_xtx_inv(train.float(), sc.get_xtx(train.float()))
    acc = torch.zeros(5, 3)
    sc.get_scores(features, target.float(), acc)
    a, b = train.numpy(), target.numpy()
    want = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(acc.numpy(), want, atol=1e-6)


# ---- pitfalls -----------------------------------------------------------------------------
def test_sdpa_model_keeps_sdpa_and_scores_as_eager(model, tokenizer, tmp_path):
    sdpa = make_model(attn="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    kwargs = traker_kwargs(sdpa, "greedy", {"selection": SELECTION}, scope="all")
    assert sdpa.config._attn_implementation == "sdpa" and kwargs["model"] is sdpa
    got = trak_scores(sdpa, tokenizer, QUERIES, CANDIDATES, tmp_path / "sdpa", "greedy", {"selection": SELECTION}, scope="all")
    assert sdpa.config._attn_implementation == "sdpa"  # eager only while vmap runs (sdpa has no batching rule)
    want = trak_scores(model, tokenizer, QUERIES, CANDIDATES, tmp_path / "eager", "greedy", {"selection": SELECTION}, scope="all")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_device_object_becomes_a_string(model, tokenizer, tmp_path):
    kwargs = traker_kwargs(model, "full", device=torch.device("cpu"))
    assert kwargs["device"] == "cpu" and isinstance(kwargs["device"], str)
    assert kwargs["projector"].device == "cpu"
    assert kwargs["use_half_precision"] is False
    # TRAKer compares the device with "cpu" (pinning memory otherwise): the whole run must work
    options = {"selection": SELECTION}
    with_object = trak_scores(
        model, tokenizer, QUERIES, CANDIDATES, tmp_path / "a", "greedy", options, device=torch.device("cpu"), scope="all"
    )
    expected = engine_cosines(model, tokenizer, QUERIES, CANDIDATES, component_order(model, SELECTION), scope="all")
    assert_same_retrieval(with_object, expected)


def test_bad_selections_are_one_line_errors(model):
    with pytest.raises(AdapterError, match=r"selects 'model\.nope', which is not a component") as err:
        traker_kwargs(model, "greedy", {"selection": ["model.nope"]})
    assert "\n" not in str(err.value)
    with pytest.raises(AdapterError, match="selects component model.norm twice"):
        traker_kwargs(model, "greedy", {"selection": ["model.norm", "model.norm.weight"]}, scope="all")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        traker_kwargs(model, "nope")
    with pytest.raises(ValueError, match="has no option dims"):
        traker_kwargs(model, "random_projection", {"dims": 3})


def test_projection_dimension_problems_are_one_line_errors(model):
    with pytest.raises(AdapterError, match=r"dimension 300 does not suit TRAK's CudaProjector.*pick dim=512"):
        check_fast_jl_dim(300)
    check_fast_jl_dim(1024)
    with pytest.raises(AdapterError, match="fast_jl=True needs a CUDA device"):
        traker_kwargs(model, "random_projection", fast_jl=True)
    with pytest.raises(AdapterError, match="fast_jl replaces a random projection"):
        traker_kwargs(model, "full", fast_jl=True)
    with pytest.raises(ValueError, match="projection dimension must be at least 1"):
        traker_kwargs(model, "random_projection", {"dim": "0.0001%"})


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def test_trak_on_a_named_device_matches_the_default(tokenizer, tmp_path, device):
    """A reducer given ``device=`` scores as on the default CPU path (on CUDA up to float error)."""
    want = trak_scores(make_model(), tokenizer, QUERIES, CANDIDATES, tmp_path / "default", "greedy", {"selection": SELECTION}, scope="all")
    got = trak_scores(
        make_model().to(device),
        tokenizer,
        QUERIES,
        CANDIDATES,
        tmp_path / device,
        "greedy",
        {"selection": SELECTION},
        scope="all",
        device=torch.device(device),
    )
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_fast_jl_is_opt_in_on_cuda(model, monkeypatch):
    """On a GPU with fast_jl installed the default is still the reducer's own count sketch (the engine's vectors)."""
    from selproj_plugin.adapters import trak as trak_adapter

    monkeypatch.setattr(trak_adapter, "fast_jl_available", lambda: True)
    monkeypatch.setattr(trak_adapter, "device_name", lambda device, model: "cuda")
    projector = ReducerProjector(model, "random_projection", device="cuda")  # dim "1%": no multiple of 512
    assert projector.inner is None and not projector.proj_type.endswith(":fast_jl")
    assert projector.proj_dim == projector.plan.dimension


def test_half_precision_is_refused_for_unprojected_gradients(model):
    assert torch.tensor(1e-8).half() == 0  # a 135M model's gradient entries are often this small
    for strategy, options in [("full", None), ("greedy", {"selection": SELECTION})]:
        with pytest.raises(
            AdapterError,
            match=rf"strategy '{strategy}' keeps unprojected gradients, whose small "
            r"entries underflow in float16",
        ) as err:
            traker_kwargs(model, strategy, options, use_half_precision=True, scope="all")
        assert "\n" not in str(err.value)
    assert traker_kwargs(model, "random_projection", use_half_precision=True)["use_half_precision"] is True
