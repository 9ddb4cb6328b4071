"""Faults the engine must survive: unused parameters, aliased modules, coinciding shapes."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

import tiny
from selproj_plugin.engine import EngineConfig, build_table, sample_features
from selproj_plugin.loss import encode_samples
from selproj_plugin.samples import Sample

CFG = EngineConfig(batch_size=3, progress=False)


def _naive_rows(model, tok, samples, names, max_length=512):
    """{component: [N, params]} from a plain backward per sample; unreached parameters give zeros."""
    enc, _ = encode_samples(tok, samples, max_length)
    params = dict(model.named_parameters())
    grads = [tiny.naive_grads(model, e) for e in enc]
    return {n: torch.stack([g[n].reshape(-1) if n in g else torch.zeros(params[n].numel()) for g in grads])
            for n in names}


def test_a_parameter_the_forward_never_uses_has_zero_gradient():
    model = tiny.model("llama")
    model.extra = nn.Linear(4, 3)  # trainable, never called
    model.extra_norm = type(model.model.norm)(16)  # a torch.func component, never called
    tok = tiny.tokenizer()
    feats = sample_features(model, tok, tiny.SAMPLES, config=CFG)
    for name in ("extra.weight", "extra.bias", "extra_norm"):
        assert name in feats and float(feats[name].abs().max()) == 0.0, name
    down = "model.layers.1.mlp.down_proj"
    ref = _naive_rows(model, tok, tiny.SAMPLES, [f"{down}.weight"])[f"{down}.weight"]
    torch.testing.assert_close(feats[down], ref, rtol=1e-5, atol=1e-6)
    table = build_table(model, tok, tiny.SAMPLES[:2], tiny.SAMPLES, np.array([[0, 1, 2], [1, 2, 3]]),
                        np.zeros(2, dtype=int), proj_dims=(16,), config=CFG)
    used = list(table.components).index(down)
    extra = list(table.components).index("extra.weight")
    assert float(np.abs(table.cross[..., extra]).max()) == 0.0 and float(np.abs(table.cross[..., used]).min()) > 0


def test_a_module_under_two_names_is_hooked_once():
    model = tiny.model("llama")
    model.alias = model.model.layers[0].mlp  # the same module registered a second time
    tok = tiny.tokenizer()
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    feats = sample_features(model, tok, tiny.SAMPLES, components=names, config=CFG)
    ref = _naive_rows(model, tok, tiny.SAMPLES, [f"{n}.weight" for n in names])
    for n in names:  # counted twice, the gradient would be 2x the reference
        torch.testing.assert_close(feats[n], ref[f"{n}.weight"], rtol=1e-5, atol=1e-6)


def test_split_does_not_guess_from_shapes_when_dimensions_coincide():
    """Batch of B=2 samples of T=16 tokens with one trained token each: the LM head sees [N=2, hidden=16] = [B, T]."""
    model = tiny.model("llama")  # untied: the LM head is its own component
    tok = tiny.tokenizer()
    samples = [Sample("a", "abcdefghijklm", "xy"), Sample("b", "nopqrstuvwxyz", "zw")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is the point here
        enc, _ = encode_samples(tok, samples, 16)
        assert [len(e.input_ids) for e in enc] == [16, 16] and [e.n_targets for e in enc] == [1, 1]
        assert model.config.hidden_size == 16
        feats = sample_features(model, tok, samples, components=["lm_head"],
                                config=EngineConfig(batch_size=2, max_length=16, progress=False))
    ref = _naive_rows(model, tok, samples, ["lm_head.weight"], max_length=16)["lm_head.weight"]
    torch.testing.assert_close(feats["lm_head"], ref, rtol=1e-5, atol=1e-6)
