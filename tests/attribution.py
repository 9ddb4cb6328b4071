"""Shared by the TRAK, Captum, README and parity tests: the tiny Llama they score, its samples, the
engine's cosines every adapter path must give, and TRAK runs. TRAK and the adapters are imported inside
the functions that need them, so a module importing this one skips cleanly where TRAK is not installed."""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selproj_plugin.components import catalogue, select
from selproj_plugin.engine import EngineConfig, pairwise_dots
from selproj_plugin.samples import Sample
from tests import tiny

SELECTION = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj.weight", "model.norm"]
RP_MIN_CORRELATION = 0.95
TINY_LIMIT_GB = 1e-6  # every step holds one sample; score blocks of the minimum width

QUERIES = [
    Sample("q0", "What is the capital of France?", "The capital of France is Paris."),
    Sample("q1", "Give me a fruit", "An apple a day keeps the doctor away."),
    Sample("q2", "Count to five", "one two three four five"),
    Sample("q3", "Describe the sea", "The sea is wide, deep and blue."),
]
CANDIDATES = [
    Sample("c0", "What's France's capital city?", "Paris is the capital of France."),
    Sample("c1", "Name a fruit", "An apple a day keeps doctors away!"),
    Sample("c2", "Count up to 5", "one, two, three, four, five"),
    Sample("c3", "Tell me about the ocean", "The ocean is wide and deep and blue."),
    Sample("c4", "Say something", "zzz qqq xxx"),
    Sample("c5", "Random numbers", "8 1 9 3 3 7 2"),
    Sample("c6", "Weather?", "It may rain tomorrow afternoon."),
    Sample("c7", "Write code", "def f(x): return x * 2"),
    Sample("c8", "A colour", "Green."),
    Sample("c9", "Greeting", "Hello there, friend!"),
]


def make_model(seed: int = 0, attn: str = "eager") -> LlamaForCausalLM:
    """Tiny random-init Llama (~150k parameters), fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tiny.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    return model


def engine_cosines(model, tokenizer, queries, candidates, components=None, weights=None, scope="paper") -> np.ndarray:
    """[Q, K] cosines of the (optionally per-component weighted) concatenated gradients, from the engine."""
    config = EngineConfig(progress=False, batch_size=4)
    cross = pairwise_dots(model, tokenizer, queries, candidates, components, config, scope=scope)
    q_self = np.einsum("iic->ic", pairwise_dots(model, tokenizer, queries, queries, components, config, scope=scope))
    k_self = np.einsum("iic->ic", pairwise_dots(model, tokenizer, candidates, candidates, components, config, scope=scope))
    w = np.ones(cross.shape[2]) if weights is None else np.asarray(weights, dtype=np.float64) ** 2
    num = (cross * w).sum(-1)
    return num / np.sqrt(np.outer((q_self * w).sum(-1), (k_self * w).sum(-1)))


def component_order(model, names) -> list[str]:
    """Component names of a selection in model order (the engine's column order)."""
    return [c.name for c in select(catalogue(model, "all"), names)]


def trak_scores(model, tokenizer, queries, candidates, tmp_path, strategy, options=None, **kwargs) -> np.ndarray:
    """[Q, K] scores from a TRAKer built with ``traker_kwargs``."""
    from trak import TRAKer

    from selproj_plugin.adapters.trak import encode, traker_kwargs

    traker = TRAKer(
        train_set_size=len(candidates),
        save_dir=str(tmp_path / "trak"),
        logging_level=logging.ERROR,
        **traker_kwargs(model, strategy, options, **kwargs),
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    device = next(model.parameters()).device
    traker.featurize(batch=encode(tokenizer, candidates, device=device), num_samples=len(candidates))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0, num_targets=len(queries))
    traker.score(batch=encode(tokenizer, queries, device=device), num_samples=len(queries))
    return np.asarray(traker.finalize_scores(exp_name="queries"), dtype=np.float64).T


def reduced_trak_scores(model, tokenizer, queries, candidates, save_dir, strategy, options=None, **kwargs):
    """(traker, [Q, K] scores) from a ReducedTRAKer, every batch passed whole."""
    from selproj_plugin.adapters.trak import ReducedTRAKer, encode

    traker = ReducedTRAKer(model, strategy, options, train_set_size=len(candidates), save_dir=save_dir, **kwargs)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=encode(tokenizer, candidates), num_samples=len(candidates))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0, num_targets=len(queries))
    traker.score(batch=encode(tokenizer, queries), num_samples=len(queries))
    return traker, np.asarray(traker.finalize_scores(exp_name="queries"), dtype=np.float64).T


class Recorder:
    """Counts a reducer's transform constructions and the rows of every transform call."""

    def __init__(self, monkeypatch, reducer) -> None:
        self.built, self.rows = 0, []
        build = reducer.transform

        def counted(selected):
            self.built += 1
            transform = build(selected)
            call = type(transform).__call__

            def recording(this, features):
                self.rows.append(next(iter(features.values())).shape[0])
                return call(this, features)

            monkeypatch.setattr(type(transform), "__call__", recording)
            return transform

        reducer.transform = counted


def assert_same_retrieval(scores: np.ndarray, expected: np.ndarray) -> None:
    """Same per-query ranking of candidates, correlation >= 0.999, same values to 1e-4."""
    assert scores.shape == expected.shape
    np.testing.assert_array_equal(np.argsort(-scores, axis=1), np.argsort(-expected, axis=1))
    assert np.corrcoef(scores.ravel(), expected.ravel())[0, 1] >= 0.999
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def state(model: torch.nn.Module) -> tuple:
    """Everything the adapters may touch: each module's training flag, each parameter's requires_grad, attention."""
    return (
        tuple(m.training for m in model.modules()),
        tuple(p.requires_grad for p in model.parameters()),
        model.config._attn_implementation,
    )


# ---- a third-party reducer, installed as a real entry-point plugin by the weighted_plugin fixture ------
WEIGHTED_PLUGIN = '''
from dataclasses import dataclass
from selproj_plugin import Concatenate, Reducer, hookimpl

@dataclass
class WeightedMLP(Reducer):
    """Every MLP matrix, the down projections weighted by ``down_weight``."""
    name = "weighted_mlp"
    summary = "MLP components, down projections up-weighted"
    down_weight: float = 3.0

    def select(self, components):
        return [c.name for c in components if c.kind in ("gate", "up", "down")]

    def transform(self, selected):
        return Concatenate(selected, weights=[self.down_weight if c.kind == "down" else 1.0 for c in selected])

@hookimpl
def selproj_strategies():
    return [WeightedMLP]
'''
