"""One right number on every path (``benchmark.parity`` on a tiny model): for every registered reducer, the
CONTRIBUTING.md plugin included, the engine's table and features, ReducedTRAKer, plain TRAKer and ReducedTracInCP
give the same cosines to 1e-5 relative, whatever state the model comes in, and leave that state as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from selproj_plugin.registry import list_strategies

pytest.importorskip("trak")
pytest.importorskip("captum")
from benchmark.parity import CONDITIONS, PATHS, TOLERANCE, Setting, compare, format_table, relative  # noqa: E402
from tests.attribution import state  # noqa: E402

BUILTIN = tuple(list_strategies())
SETTING = Setting(tuple(tiny.SAMPLES[:2]), tuple(tiny.SAMPLES[2:]), max_length=128)


def dropout_llama() -> torch.nn.Module:
    """Tiny Llama with attention dropout 0.1, sdpa attention, in train mode (as a training loop leaves it)."""
    config = tiny.config("llama")
    config.attention_dropout = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(5.0)  # gradients less alike
    return model.train()


def test_train_mode_is_a_different_model():
    """The conditions are not vacuous: in train mode the model's own outputs are random draws."""
    model = dropout_llama()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_relative_difference_is_against_the_largest_reference_value():
    assert relative(np.array([[0.5, 1e-9]]), np.array([[0.5, -2e-6]])) == pytest.approx(2.001e-6 / 0.5)
    with pytest.raises(ValueError, match=r"a path gave shape \(1, 2\), the reference \(2, 1\)"):
        relative(np.zeros((1, 2)), np.ones((2, 1)))


def check(name: str, tokenizer) -> None:
    model = dropout_llama()
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation notes and TRAK's logging
        differences = compare(model, tokenizer, SETTING, [name])
    print(format_table(differences))
    assert {(d.path, d.condition) for d in differences} == {(p, str(c)) for p in PATHS for c in CONDITIONS}
    bad = [d for d in differences if not d.ok]
    assert not bad, f"over {TOLERANCE:.0e} or state changed: {bad}"
    assert state(model) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_every_path_agrees_for_a_builtin_reducer(name, tokenizer):
    check(name, tokenizer)


@pytest.mark.slow
def test_every_path_agrees_for_the_documented_plugin(attention_plugin, tokenizer):
    check("attention_only", tokenizer)
