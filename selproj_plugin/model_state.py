"""What computing gradients may change on a user's model, saved and put back: the engine and both adapters use it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def attention(model: nn.Module) -> str | None:
    """The model's attention implementation (transformers' ``config._attn_implementation``; None elsewhere)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@dataclass(frozen=True)
class ModelState:
    """Every module's training flag, every parameter's ``requires_grad`` and the attention implementation."""

    training: tuple[bool, ...]  # every module's flag, in ``model.modules()`` order
    requires_grad: tuple[bool, ...]  # every parameter's, in ``model.parameters()`` order
    attention: str | None  # see :func:`attention`

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        return cls(tuple(m.training for m in model.modules()), tuple(p.requires_grad for p in model.parameters()), attention(model))

    def restore(self, model: nn.Module) -> None:
        if attention(model) != self.attention:
            model.set_attn_implementation(self.attention)
        self.restore_training(model)
        for p, flag in zip(model.parameters(), self.requires_grad):
            p.requires_grad_(flag)

    def restore_training(self, model: nn.Module) -> None:
        for m, flag in zip(model.modules(), self.training):
            m.training = flag
