"""Selections exported for other tools name real modules and parameters, and globs match exactly the selection."""

from __future__ import annotations

import fnmatch

import pytest

from tests import tiny
from selproj_plugin.adapters.captum import tracin_layers
from selproj_plugin.adapters.trak import traker_kwargs
from selproj_plugin.components import catalogue, resolve
from selproj_plugin.export import selection_export


@pytest.mark.parametrize(
    "names, globs",
    [
        (
            ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
            ["model.layers.*.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
        ),
        (["L1 down", "embed"], ["model.layers.1.mlp.down_proj", "model.embed_tokens"]),
    ],
)
def test_export_forms_agree_with_the_model_and_the_adapters(names, globs):
    model = tiny.model("llama", tied=True)
    comps = catalogue(model)
    selected = resolve(comps, names)
    out = selection_export(selected, comps)
    assert out["module_globs"] == globs
    modules = [m for m, _ in model.named_modules()]
    matched = {m for m in modules for g in out["module_globs"] if fnmatch.fnmatchcase(m, g)}
    assert matched == set(out["modules"])
    params = dict(model.named_parameters())
    assert set(out["parameters"]) <= params.keys()
    assert sum(params[p].numel() for p in out["parameters"]) == sum(c.num_params for c in selected)
    kwargs = traker_kwargs(model, "greedy", {"selection": names})
    assert set(kwargs["grad_wrt"]) == set(out["parameters"])  # TRAK's grad_wrt, dattri's layer_name
    assert set(tracin_layers(model, "greedy", {"selection": names})) == set(out["modules"])  # Captum, Kronfluence


def test_a_table_named_by_parameters_exports_module_names(synthetic_paraphrased):
    comps = synthetic_paraphrased.component_list
    out = selection_export(resolve(comps, ["model.layers.9.mlp.down_proj.weight"]), comps)
    assert out["modules"] == ["model.layers.9.mlp.down_proj"]
    assert out["parameters"] == ["model.layers.9.mlp.down_proj.weight"]
