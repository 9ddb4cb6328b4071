"""Strategies on synthetic tables whose right answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from selproj_plugin import StrategyError, get_strategy
from selproj_plugin.strategies.random_projection import parse_dim
from selproj_plugin.table import ComponentTable


def signal_table(q=40, k=4, signal=(2,), noise_scale=1.0, seed=0, c=5, num_params=None):
    """Components in ``signal`` rank each original first; the others are noise."""
    rng = np.random.default_rng(seed)
    cross = rng.normal(scale=noise_scale, size=(q, k, c))
    original = rng.integers(0, k, size=q)
    is_original = np.zeros((q, k), dtype=bool)
    is_original[np.arange(q), original] = True
    for s in signal:
        cross[:, :, s] = 0.0
        cross[np.arange(q), original, s] = 1.0
    return ComponentTable(
        cross=cross,
        query_self=np.ones((q, c)),
        candidate_self=np.ones((q, k, c)),
        is_original=is_original,
        components=np.array([f"model.layers.{i}.self_attn.q_proj.weight" for i in range(c)]),
        num_params=np.array(num_params or [100] * c, dtype=np.int64),
    )


def test_greedy_finds_the_signal_component():
    result = get_strategy("greedy").evaluate(signal_table(noise_scale=3.0))
    assert result.components == ["model.layers.2.self_attn.q_proj.weight"]
    assert result.accuracy == 1.0
    assert result.heldout_accuracy == 1.0
    assert result.param_fraction == pytest.approx(0.2)


def test_greedy_ties_go_to_model_order():
    # components 1 and 3 are identical and perfect: equal accuracy and margin, so the earlier one wins
    result = get_strategy("greedy").evaluate(signal_table(signal=(3, 1)))
    assert result.components == ["model.layers.1.self_attn.q_proj.weight"]
    assert result.path[0]["tied"] == 2


def test_greedy_and_single_break_accuracy_ties_by_margin():
    # components 1 and 3 both rank every original first; 3 by a wider margin, so it wins despite model order
    table = signal_table(signal=(1, 3), noise_scale=0.1)
    table.cross[:, :, 1] *= 0.5
    greedy = get_strategy("greedy").evaluate(table)
    assert greedy.components == ["model.layers.3.self_attn.q_proj.weight"]
    assert greedy.path[0]["tied"] == 2 and greedy.path[0]["margin"] == pytest.approx(1.0)
    single = get_strategy("single_component").evaluate(table)
    assert single.components == greedy.components and single.extra["tied"] == 2


def first_column_table(q=40, k=5, seed=1):
    """Originals always in the first column (as BM25 orders them); component 0 is constant, the rest noisy signal."""
    rng = np.random.default_rng(seed)
    cross = rng.normal(size=(q, k, 4))
    cross[:, 0, 1:] += 1.5  # informative, imperfect
    cross[:, :, 0] = 0.3  # no information: every candidate alike
    is_original = np.zeros((q, k), dtype=bool)
    is_original[:, 0] = True
    return ComponentTable(
        cross=cross,
        query_self=np.ones((q, 4)),
        candidate_self=np.ones((q, k, 4)),
        is_original=is_original,
        components=np.array(["model.embed_tokens"] + [f"model.layers.{i}.mlp.down_proj" for i in range(3)]),
        num_params=np.full(4, 100, dtype=np.int64),
    )


def test_a_constant_component_scores_chance_and_is_never_picked():
    table = first_column_table()
    single = get_strategy("single_component").evaluate(table)
    assert single.extra["per_component"]["model.embed_tokens"] <= 0.25
    assert single.components != ["model.embed_tokens"]
    greedy = get_strategy("greedy", patience=3).evaluate(table)
    assert "model.embed_tokens" not in greedy.components
    assert "model.embed_tokens" not in [step["component"] for step in greedy.path[:3]]


def test_results_carry_intervals_and_a_paired_test_against_full():
    table = signal_table(noise_scale=3.0)
    greedy = get_strategy("greedy").evaluate(table)
    assert greedy.accuracy_ci[0] <= greedy.accuracy <= greedy.accuracy_ci[1]
    assert greedy.heldout_accuracy_ci[0] <= greedy.heldout_accuracy <= greedy.heldout_accuracy_ci[1]
    full = get_strategy("full").evaluate(table)
    assert full.heldout_accuracy is None and full.heldout_accuracy_ci is None
    # the greedy pick is perfect held-out; the full gradient drowns the signal in noise
    hits_full = round(full.accuracy * 40)
    assert greedy.vs_full.basis == "held-out" and greedy.vs_full.method == "exact McNemar"
    assert (greedy.vs_full.better, greedy.vs_full.worse) == (40 - hits_full, 0)
    assert greedy.vs_full.p_value < 1e-3 and greedy.headline == (1.0, greedy.heldout_accuracy_ci, "held-out")
    json = greedy.to_json()
    assert json["vs_full"]["p_value"] == greedy.vs_full.p_value and len(json["heldout_accuracy_ci"]) == 2


def test_greedy_budget_by_params_excludes_large_components():
    # the signal component is too large for a 30% parameter budget
    table = signal_table(num_params=[100, 100, 500, 100, 100], noise_scale=3.0)
    result = get_strategy("greedy", budget=0.3).evaluate(table)
    assert "model.layers.2.self_attn.q_proj.weight" not in result.components
    assert result.param_fraction <= 0.3


def test_greedy_patience_controls_path_length():
    table = signal_table(noise_scale=3.0)
    short = get_strategy("greedy", patience=1).evaluate(table)
    long = get_strategy("greedy", patience=3).evaluate(table)
    assert len(short.path) == 2 and len(long.path) == 4
    assert short.components == long.components  # the kept prefix is the best one


def test_greedy_count_budget():
    result = get_strategy("greedy", budget=2, patience=10).evaluate(signal_table(noise_scale=3.0))
    assert len(result.path) == 2


def test_greedy_fidelity_prefers_the_component_that_dominates_the_full_gradient():
    table = signal_table(noise_scale=0.1)
    table.cross[:, :, 4] *= 50  # component 4 dominates the summed dot products
    table.query_self[:, 4] = 50
    table.candidate_self[:, :, 4] = 50
    result = get_strategy("greedy_fidelity", budget=1).evaluate(table)
    assert result.components == ["model.layers.4.self_attn.q_proj.weight"]


def test_greedy_with_given_selection_is_not_fitted(tmp_path):
    path = tmp_path / "sel.json"
    path.write_text('{"components": ["model.layers.0.self_attn.q_proj.weight"]}')
    reducer = get_strategy("greedy", selection=str(path))
    assert reducer.select([]) == ["model.layers.0.self_attn.q_proj.weight"]
    result = reducer.evaluate(signal_table())
    # a fixed selection learned nothing from the table: no held-out figure, and none needed
    assert result.heldout_accuracy is None and result.heldout_accuracy_ci is None
    assert result.vs_full.basis == "not fitted" and result.path is None
    assert result.headline == (result.accuracy, result.accuracy_ci, "not fitted")


def test_unfitted_greedy_cannot_select():
    with pytest.raises(ValueError, match="no selection yet"):
        get_strategy("greedy").select([])


def test_bad_options_are_named():
    with pytest.raises(StrategyError, match="has no option bogus; options: budget, patience, selection"):
        get_strategy("greedy", bogus=1)
    with pytest.raises(StrategyError, match="patience must be at least 1"):
        get_strategy("greedy", patience=0)


def test_random_projection_needs_stored_projections():
    with pytest.raises(ValueError, match="cannot be scored from a component table"):
        get_strategy("random_projection").evaluate(signal_table())


@pytest.mark.parametrize("dim, total, expected", [("1%", 1000, 10), (64, 10, 64), ("2.5%", 400, 10)])
def test_parse_dim(dim, total, expected):
    assert parse_dim(dim, total) == expected


def test_parse_dim_rejects_garbage():
    with pytest.raises(ValueError, match="count or a percentage"):
        parse_dim("lots", 100)


@pytest.mark.parametrize("dim, expected", [("0.5%", 61), ("0.1%", 12)])  # of the tiny llama's 12,272 parameters
def test_projection_percentages_under_one_percent(dim, expected):
    from selproj_plugin import reduction
    from selproj_plugin.components import catalogue
    from tests import tiny

    model = tiny.model("llama")
    assert sum(p.numel() for p in model.parameters()) == 12_272
    reducer = get_strategy("random_projection", dim=dim)
    assert reduction(reducer, catalogue(model, "all")).transform.dim == expected


def test_projection_percentage_that_rounds_to_nothing_is_one_line():
    from selproj_plugin import reduction
    from selproj_plugin.components import catalogue
    from selproj_plugin.strategies.base import ReducerError
    from tests import tiny

    reducer = get_strategy("random_projection", dim="0.001%")  # the syntax is fine; the model is too small
    with pytest.raises(ReducerError) as err:
        reduction(reducer, catalogue(tiny.model("llama"), "all"))
    assert str(err.value).endswith("projection dimension must be at least 1: 0.001% of 12,272 parameters gives 0")


@pytest.mark.parametrize(
    "dim, problem",
    [
        ("0%", "a percentage must be above 0 and at most 100"),
        ("150%", "a percentage must be above 0 and at most 100"),
        ("nan%", "a percentage must be above 0 and at most 100"),
        (0, "a count must be a positive whole number"),
        ("12.5", "a count must be a positive whole number"),
        ("lots", "a count or a percentage like 1%"),
    ],
)
def test_projection_dimension_syntax_is_checked_at_construction(dim, problem):
    with pytest.raises(StrategyError) as err:
        get_strategy("random_projection", dim=dim)
    assert problem in str(err.value) and repr(dim) in str(err.value) and "\n" not in str(err.value)
