"""The paper's own figures, recomputed from its published per-component dot products."""

from __future__ import annotations

import numpy as np
import pytest

from selproj_plugin import get_strategy, stats
from selproj_plugin.table import ComponentTable

L = "model.layers.{}.{}.weight"


def test_full_gradient_accuracy(paraphrased, model_generated):
    assert round(get_strategy("full").evaluate(paraphrased).accuracy, 4) == 0.9929
    assert round(get_strategy("full").evaluate(model_generated).accuracy, 4) == 0.2176


def test_greedy_paraphrased_picks_layer9_down_first(paraphrased):
    result = get_strategy("greedy").evaluate(paraphrased)
    assert result.components[0] == L.format(9, "mlp.down_proj")
    assert round(result.accuracy, 4) == 0.9980
    assert result.heldout_accuracy is not None and 0.2 < result.heldout_accuracy <= 1.0


def test_greedy_model_generated_path(model_generated):
    result = get_strategy("greedy").evaluate(model_generated)
    assert result.components[:2] == [L.format(1, "self_attn.o_proj"), L.format(2, "self_attn.q_proj")]
    assert round(result.path[0]["accuracy"], 4) == 0.3563
    assert round(result.accuracy, 4) == 0.3634
    # held-out is reported and, as expected of in-sample selection, not above it
    assert result.heldout_accuracy is not None and result.heldout_accuracy <= result.accuracy


@pytest.mark.parametrize(
    "setting, first, value",
    [
        ("paraphrased", L.format(6, "mlp.up_proj"), 0.9956),
        ("model_generated", L.format(3, "mlp.down_proj"), 0.8836),
    ],
)
def test_greedy_fidelity_first_pick(setting, first, value, request):
    table = request.getfixturevalue(setting)
    result = get_strategy("greedy_fidelity", budget=1).evaluate(table)
    assert result.components == [first]
    assert round(result.fidelity, 4) == value


@pytest.mark.parametrize("setting, value", [("paraphrased", 0.9988), ("model_generated", 0.9887)])
def test_paper_random_projection_fidelity(setting, value, request):
    table = request.getfixturevalue(setting)
    result = get_strategy("random_projection_per_component", dim="1%").evaluate(table)
    assert abs(result.dim - 11_767_808) <= 0.01 * 11_767_808
    assert round(result.fidelity, 4) == value
    # the paper's files hold per-component projections only, not a sketch of the whole gradient
    with pytest.raises(ValueError, match="cannot be scored from a component table"):
        get_strategy("random_projection", dim="1%").evaluate(table)


def test_single_component_baseline_by_kind(paraphrased):
    result = get_strategy("single_component").evaluate(paraphrased)
    assert result.components == [L.format(9, "mlp.down_proj")]
    assert set(result.extra["by_kind"]) == {"embed", "q", "k", "v", "o", "gate", "up", "down"}
    assert len(result.extra["per_component"]) == 113
    assert len(result.extra["by_layer"]) == 17  # 16 layers + the embedding


def with_constant_component(table: ComponentTable) -> ComponentTable:
    """The table with a first component that scores every candidate alike (no information)."""
    q, k, _ = table.cross.shape
    return ComponentTable(
        cross=np.concatenate([np.full((q, k, 1), 2.0), table.cross], axis=2),
        query_self=np.concatenate([np.full((q, 1), 3.0), table.query_self], axis=1),
        candidate_self=np.concatenate([np.full((q, k, 1), 3.0), table.candidate_self], axis=2),
        is_original=table.is_original,
        components=np.r_[["model.constant.weight"], table.components],
        num_params=np.r_[[1000], table.num_params],
    )


@pytest.mark.parametrize("setting", ["paraphrased", "model_generated"])
def test_a_constant_component_is_worth_chance_and_never_picked(setting, request):
    table = with_constant_component(request.getfixturevalue(setting))
    single = get_strategy("single_component").evaluate(table)
    # before ties were credited it scored BM25's top-1 rate, 0.836, and beat most components
    assert single.extra["per_component"]["model.constant.weight"] <= 0.25
    greedy = get_strategy("greedy", patience=3).evaluate(table)
    assert "model.constant.weight" not in [step["component"] for step in greedy.path]


@pytest.mark.parametrize("setting, full_hits", [("paraphrased", 981), ("model_generated", 215)])
def test_every_figure_has_an_interval_and_a_paired_test(setting, full_hits, request):
    table = request.getfixturevalue(setting)
    full = get_strategy("full").evaluate(table)
    assert round(full.accuracy * 988) == full_hits
    assert full.accuracy_ci == stats.proportion_ci(np.r_[np.ones(full_hits), np.zeros(988 - full_hits)])
    greedy = get_strategy("greedy").evaluate(table)
    assert greedy.vs_full.basis == "held-out"
    assert greedy.vs_full.difference == pytest.approx(greedy.heldout_accuracy - full.accuracy)
    assert greedy.vs_full.p_value == pytest.approx(stats.mcnemar_p(int(greedy.vs_full.better), int(greedy.vs_full.worse)))
