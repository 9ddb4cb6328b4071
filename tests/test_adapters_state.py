"""The adapters take gradients of the model as it predicts (eval mode) and leave the user's model as it came."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny

pytest.importorskip("trak")
pytest.importorskip("captum")
from trak import TRAKer  # noqa: E402

from selproj_plugin.adapters.captum import ReducedTracInCP, dataset  # noqa: E402
from selproj_plugin.adapters.trak import (  # noqa: E402
    CausalLMOutput,
    SelectedGradientComputer,
    encode,
    traker_kwargs,
)

from tests.attribution import state  # noqa: E402

WRT = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"]


def gpt2(attn: str = "eager") -> torch.nn.Module:
    """Tiny GPT-2 with the config's default dropout (0.1 on embeddings, attention and residuals), in train mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("gpt2"), attn_implementation=attn).float()
    assert model.config.resid_pdrop > 0 and model.config.attn_pdrop > 0
    return model.train()


def test_trak_gradients_are_the_eval_mode_gradients_and_the_flags_stay(tokenizer):
    model = gpt2()
    model.transformer.h[1].eval()  # a per-module mix the user set up
    before = state(model)
    batch = encode(tokenizer, tiny.SAMPLES[:3])
    computer = SelectedGradientComputer(model, CausalLMOutput(), grad_wrt=WRT)
    first, second = computer.compute_per_sample_grad(batch), computer.compute_per_sample_grad(batch)
    model.eval()
    reference = SelectedGradientComputer(model, CausalLMOutput(), grad_wrt=WRT).compute_per_sample_grad(batch)
    model.train()
    model.transformer.h[1].eval()
    for name in WRT:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
        torch.testing.assert_close(first[name], reference[name], rtol=1e-5, atol=1e-8)
    assert state(model) == before and model.training and not model.transformer.h[1].training


def test_plain_traker_checkpoints_keep_the_training_flags(tokenizer, tmp_path):
    model = gpt2()
    before = state(model)
    traker = TRAKer(train_set_size=2, save_dir=str(tmp_path), logging_level=logging.ERROR, **traker_kwargs(model, "full"))
    traker.load_checkpoint(model.state_dict(), model_id=0)  # TRAK calls model.eval() here
    assert state(model) == before
    traker.featurize(batch=encode(tokenizer, tiny.SAMPLES[:2]), num_samples=2)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0, num_targets=1)
    assert state(model) == before


def test_captum_influence_is_the_eval_mode_influence_and_the_flags_stay(tokenizer):
    model = gpt2()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("bias"))  # frozen biases: Captum would switch them on for good
    before = state(model)
    queries = encode(tokenizer, tiny.SAMPLES[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = ReducedTracInCP(model, dataset(tokenizer, tiny.SAMPLES[2:]), None, "full", normalize=False)
        assert state(model) == before
        first, second = tracin.influence(queries), tracin.influence(queries)
        assert state(model) == before
        model.eval()
        reference = ReducedTracInCP(model, dataset(tokenizer, tiny.SAMPLES[2:]), None, "full", normalize=False).influence(queries)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_sdpa_is_put_back_after_each_gradient_call(tokenizer):
    model = gpt2("sdpa")
    before = state(model)
    batch = encode(tokenizer, tiny.SAMPLES[:3])
    got = SelectedGradientComputer(model, CausalLMOutput(), grad_wrt=WRT).compute_per_sample_grad(batch)
    assert state(model) == before and model.config._attn_implementation == "sdpa"
    want = SelectedGradientComputer(gpt2("eager"), CausalLMOutput(), grad_wrt=WRT).compute_per_sample_grad(batch)
    for name in WRT:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)
