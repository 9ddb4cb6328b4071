"""Counting aten operations: the engine's proxy for GPU cost.

On an accelerator every aten call is at least one kernel launch plus Python dispatch (10-20 us), so the
number of calls, not their arithmetic, bounds small-batch speed.  :class:`OpCounter` counts every call
dispatched inside its ``with`` block; :func:`plain_backward_ops` counts a plain batched forward and
backward (weight gradients included) over the same batches, the yardstick the engine is held to.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts aten calls made while active: ``total`` and ``by_op`` (overload packet name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the mode protocol
        self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def plain_backward(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Any], batch_size: int,
                   max_length: int = 512, device: str | torch.device = "cpu") -> tuple[int, int]:
    """A plain batched forward and backward of ``samples`` in batches of ``batch_size`` (weight gradients included,
    the model's own loss path): its aten calls and padded tokens."""
    from selproj_plugin.loss import collate, encode_samples, forward_losses, pad_token_id

    encoded, _ = encode_samples(tokenizer, samples, max_length)
    pad = pad_token_id(tokenizer)
    counter, tokens = OpCounter(), 0
    params = [p for p in model.parameters() if p.requires_grad]
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start: start + batch_size], pad, device)
        tokens += batch.input_ids.numel()
        with counter:
            forward_losses(model, batch).sum().backward()
        for p in params:
            p.grad = None
    return counter.total, tokens
