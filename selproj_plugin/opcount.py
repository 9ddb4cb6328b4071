"""Counting aten operations: the engine's proxy for GPU cost.

On an accelerator every aten call is at least one kernel launch plus Python dispatch (10-20 us), so the
number of calls, not their arithmetic, bounds small-batch speed.  :class:`OpCounter` counts every call
dispatched inside its ``with`` block; :func:`plain_backward_ops` counts a plain batched forward and
backward (weight gradients included) over the same batches, the yardstick the engine is held to.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.loss import Batch


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


@dataclass(frozen=True)
class PassCost:
    """One pass over a list of batches: aten calls (0 when not counted), padded tokens, seconds."""

    ops: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def measure(step: Callable[[Batch], Any], batches: Sequence[Batch], count: bool) -> PassCost:
    """``step`` over ``batches``: counted (``count``; dispatch then costs time) or timed."""
    counter = OpCounter()
    t0 = time.perf_counter()
    for batch in batches:
        if count:
            with counter:
                step(batch)
        else:
            step(batch)
    return PassCost(counter.total, sum(b.input_ids.numel() for b in batches), time.perf_counter() - t0)


def plain_step(model: torch.nn.Module) -> Callable[[Batch], None]:
    """A plain forward and backward of a batch, weight gradients included (then dropped)."""
    from selproj_plugin.loss import forward_losses

    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: Batch) -> None:
        forward_losses(model, batch).sum().backward()
        for p in params:
            p.grad = None

    return step


def plain_backward(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Any],
    batch_size: int,
    max_length: int = EngineConfig.max_length,
    device: str | torch.device = EngineConfig.device,
) -> tuple[int, int]:
    """The yardstick: a plain batched forward and backward of ``samples`` in batches of ``batch_size`` in the
    order given: its aten calls and padded tokens."""
    from selproj_plugin.loss import collate, encode_samples, pad_token_id

    encoded, _ = encode_samples(tokenizer, samples, max_length)
    pad = pad_token_id(tokenizer)
    batches = [collate(encoded[k : k + batch_size], pad, device) for k in range(0, len(encoded), batch_size)]
    cost = measure(plain_step(model), batches, count=True)
    return cost.ops, cost.tokens
