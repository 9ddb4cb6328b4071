"""Component catalogue on each supported family, unknown architectures and selection errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests import tiny
from selproj_plugin.components import catalogue, kind_and_layer, select


def _unique_trainable(model):
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


EXPECTED_KINDS = {
    "llama": {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"},
    "mistral": {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"},
    "qwen2": {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"},
    "olmo": {"embed", "q", "k", "v", "o", "gate", "up", "down", "lm_head"},  # OLMo-1 norms have no weights
    "olmo2": {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"},
    "gpt_neox": {"embed", "qkv", "o", "mlp_in", "mlp_out", "norm", "lm_head"},
    "gpt2": {"embed", "qkv", "o", "mlp_in", "mlp_out", "norm"},
}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_tensor_in_exactly_one_component(family):
    model = tiny.model(family)
    comps = catalogue(model, "all")
    names = [p for c in comps for p in c.param_names]
    assert len(names) == len(set(names))
    trainable = _unique_trainable(model)
    assert sorted(names) == sorted(n for n, _ in trainable)
    assert sum(c.num_params for c in comps) == sum(p.numel() for _, p in trainable)
    assert {c.kind for c in comps} == EXPECTED_KINDS[family]
    assert all(c.layer in (0, 1) for c in comps if c.kind in ("q", "k", "v", "o", "qkv", "gate", "up", "down"))


def test_family_specifics():
    qwen = {c.kind: c for c in catalogue(tiny.model("qwen2"), "all") if c.layer == 0}
    assert [p.rsplit(".", 1)[1] for p in qwen["q"].param_names] == ["weight", "bias"]
    olmo2 = [c for c in catalogue(tiny.model("olmo2"), "all") if c.layer == 1 and c.kind == "norm"]
    assert {c.name.rsplit(".", 1)[1] for c in olmo2} == {"q_norm", "k_norm", "post_attention_layernorm", "post_feedforward_layernorm"}
    gpt2 = {c.name: c for c in catalogue(tiny.model("gpt2"), "all")}
    assert gpt2["transformer.h.0.attn.c_attn"].kind == "qkv"
    assert gpt2["transformer.h.0.attn.c_proj"].kind == "o"
    assert gpt2["transformer.h.0.mlp.c_proj"].kind == "mlp_out"
    assert gpt2["transformer.wpe"].kind == "embed"
    assert gpt2["transformer.wte"].num_params == tiny.VOCAB * 16  # tied LM head counted once
    assert "lm_head" not in gpt2
    neox = {c.name: c for c in catalogue(tiny.model("gpt_neox"), "all")}
    assert neox["gpt_neox.layers.0.attention.dense"].kind == "o"
    assert neox["lm_head"].kind == "lm_head" and neox["gpt_neox.embed_in"].kind == "embed"


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_tied_embedding_counted_once(family):
    untied = catalogue(tiny.model(family, tied=False), "all")
    tied = catalogue(tiny.model(family, tied=True), "all")
    assert sum(c.num_params for c in untied) - sum(c.num_params for c in tied) == tiny.VOCAB * 16
    assert [c.kind for c in tied].count("embed") == 1 and "lm_head" not in [c.kind for c in tied]


def test_unknown_architecture_falls_back_to_one_component_per_tensor():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(3, 4)
            self.scale = nn.Parameter(torch.ones(2))
            self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)

    comps = catalogue(Odd(), "all")
    assert [(c.name, c.kind, c.num_params) for c in comps] == [
        ("scale", "other", 2),
        ("mixer.weight", "other", 12),
        ("mixer.bias", "other", 4),
    ]
    assert kind_and_layer("blocks.7.mystery.weight") == ("other", 7)


def test_select_by_component_or_parameter_and_bad_name():
    comps = catalogue(tiny.model("llama"), "all")
    chosen = select(comps, ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens"])
    assert [c.name for c in chosen] == ["model.embed_tokens", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"no existing component: model.layers.9.mlp, nonsense"):
        select(comps, ["model.layers.9.mlp", "model.norm", "nonsense"])


def test_model_without_trainable_parameters():
    model = tiny.model("gpt2")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no trainable parameters"):
        catalogue(model, "all")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_paper_set_is_embedding_and_weight_matrices(family):
    model = tiny.model(family, tied=True)
    paper = catalogue(model)  # the default set
    params = [p for c in paper for p in c.param_names]
    assert all(p.endswith(".weight") for p in params)
    assert not any(c.kind in ("norm", "other") for c in paper)
    # independent count: 2-D weights of the model, tied tensors once, minus norms (1-D) -> every matrix
    seen, expected = set(), 0
    for _name, p in model.named_parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            expected += p.numel()
    assert sum(c.num_params for c in paper) == expected
    layers = {c.layer for c in paper if c.layer is not None}
    assert len([c for c in paper if c.layer == 0]) == (4 if family == "gpt2" else 7)
    assert len(layers) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="unknown component set 'some'; choose from paper, all"):
        catalogue(model, "some")
