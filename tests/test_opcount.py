"""The engine's aten operations against a plain batched forward and backward: the GPU cost proxy (issue #25)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from selproj_plugin.engine import EngineConfig, build_table, prepare
from selproj_plugin.loss import collate, encode_samples
from selproj_plugin.opcount import OpCounter, plain_backward
from selproj_plugin.samples import Sample

QUERIES = [Sample(f"q{i}", f"Question number {i} about things?", f"Answer {i} is here, and long.") for i in range(16)]
ORIGINALS = [Sample(f"o{i}", f"Original {i} about things?", f"Reply {i} is there.") for i in range(16)]
INDEX = np.array([[(q + k) % 16 for k in range(5)] for q in range(16)])  # 16 x 5: 32 distinct samples, 80 pairs


def _model(layers: int) -> torch.nn.Module:
    cfg = tiny.config("llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


def test_counter_counts_each_aten_call_once():
    with OpCounter() as counter:
        a = torch.ones(3)
        (a + a).sum()
    assert counter.by_op["add"] == 1 and counter.by_op["sum"] == 1 and counter.total >= 3


@pytest.mark.parametrize("order", ["stream", "gram"])
def test_a_table_dispatches_at_most_half_again_a_plain_backwards_ops(order):
    model, tok = _model(6), tiny.tokenizer()
    plain, _ = plain_backward(model, tok, QUERIES + ORIGINALS, 4)
    with OpCounter() as counter:
        table = build_table(
            model,
            tok,
            QUERIES,
            ORIGINALS,
            INDEX,
            np.zeros(16, dtype=int),
            config=EngineConfig(batch_size=4, progress=False, dot_order=order),
        )
    assert table.meta["plan"]["dot_order"] == order and table.meta["distinct_samples"] == 32
    assert counter.total <= 1.5 * plain, (counter.total, plain, counter.by_op.most_common(8))


def test_capture_dispatches_fewer_ops_than_a_plain_backward_and_as_many_at_any_depth():
    """Stacks: the capture's own work (hooks, stacking, each sample's views) does not grow with the layers."""
    tok = tiny.tokenizer()
    extra = {}
    for layers in (2, 6):
        model = _model(layers)
        prep = prepare(model, tok, None)
        enc, _ = encode_samples(tok, QUERIES[:4], 512)
        with OpCounter() as counter:
            prep.capture.run(collate(enc, prep.pad_id))
        plain, _ = plain_backward(model, tok, QUERIES[:4], 4)
        assert counter.total <= 1.25 * plain
        extra[layers] = counter.total
    plain2, plain6 = (plain_backward(_model(n), tok, QUERIES[:4], 4)[0] for n in (2, 6))
    # the capture's ops grow by the model's own per-layer ops, not by the stacks' per-layer slicing
    assert extra[6] - extra[2] <= plain6 - plain2
