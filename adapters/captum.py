"""Captum adapter: selproj reducers in TracInCP, on causal LMs.

:func:`tracin_layers` gives the module names of a reducer's selection, for plain
``TracInCP(layers=...)``.  :class:`ReducedTracInCP` is a ``TracInCP`` whose per-sample
gradients (of the response-masked loss, for the selected components only) go through
the reducer — a projection, a selection, or a third-party plugin from the registry —
before Captum's dot products; with ``normalize=True`` (default) scores are cosines, the
selproj retrieval score.  Data: ``(input_ids, attention_mask, labels)`` tuples, e.g.
:func:`dataset` for training samples and :func:`encode` for test samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from captum._utils.gradient import (
    _compute_jacobian_wrt_params, _compute_jacobian_wrt_params_with_sample_wise_trick,
    _extract_parameters_from_layers,
)
from captum.influence import TracInCP
from captum.influence._utils.common import _load_flexible_state_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selproj_plugin.adapters._common import (
    AdapterError, Plan, encode, plan, reduce_gradients, resolve_reducer, response_loss,
)
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer

__all__ = ["AdapterError", "ReducedTracInCP", "ResponseLoss", "dataset", "encode", "tracin_layers"]

# Captum's per-sample trick (sample_wise_grads_per_batch=True) hooks only these, listed directly.
TRICK_MODULES = (nn.Linear, nn.Conv2d)


def _layers_of(model: nn.Module, plan_: Plan) -> list[str]:
    """Owning module of every selected component, in model order, each once."""
    modules = dict(model.named_modules())
    names: list[str] = []
    for comp in sorted(plan_.chosen, key=lambda c: plan_.components.index(c)):
        module = comp.name if comp.name in modules and comp.name else comp.param_names[0].rpartition(".")[0]
        if module not in modules or not module:
            raise AdapterError(f"component {comp.name} has no owning submodule that Captum can name as a layer")
        if module not in names:
            names.append(module)
    return names


def tracin_layers(model: nn.Module, strategy: str | Reducer = "full", options: Mapping[str, Any] | None = None,
                  *, prefix: str = "", scope: str = "paper") -> list[str]:
    """Module names owning the reducer's selected components, for ``TracInCP(layers=...)``.

    ``prefix`` is prepended for a wrapper that holds ``model`` as a submodule (Captum
    needs a model returning a tensor; e.g. ``prefix="model."``).  Captum differentiates
    every tensor of a listed module; selproj components are whole modules except single
    tensors of unknown kind, whose module may own more.
    """
    return [prefix + n for n in _layers_of(model, plan(model, resolve_reducer(strategy, options), scope))]


class ResponseLoss(nn.Module):
    """Per-sample mean cross-entropy over response tokens + EOS, from logits and -100-masked labels.

    ``reduction="none"`` returns ``[B]`` (Captum's exact path); ``"sum"`` their sum
    (Captum's per-sample trick, where each sample's gradient is its own loss's).
    """

    def __init__(self, reduction: str = "none") -> None:
        super().__init__()
        if reduction not in ("none", "sum"):
            raise AdapterError(f"reduction must be 'none' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        losses = response_loss(logits, labels)
        return losses if self.reduction == "none" else losses.sum()


class _Logits(nn.Module):
    """``model(input_ids, attention_mask)`` -> logits tensor, the form Captum differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def dataset(tokenizer: Any, samples: Sequence[Sample], *, max_length: int = 512) -> TensorDataset:
    """Training samples as a ``TensorDataset`` of ``(input_ids, attention_mask, labels)``."""
    return TensorDataset(*encode(tokenizer, samples, max_length=max_length))


class ReducedTracInCP(TracInCP):
    """TracInCP over a selproj reducer's reduced per-sample gradients of a causal LM.

    Gradients of the response-masked per-sample loss are taken for the selected
    components only (Captum ``layers``), mapped to the reducer's ``{component: [N, d]}``
    features, reduced to ``[N, D]`` and, with ``normalize``, scaled to unit norm, so
    ``influence`` returns learning-rate-weighted cosines summed over checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Union[str, List[str], Iterator[str]],
        strategy: str | Reducer = "full",
        options: Mapping[str, Any] | None = None,
        *,
        checkpoints_load_func: Callable[[nn.Module, str], float] = _load_flexible_state_dict,
        batch_size: int = 8,
        normalize: bool = True,
        sample_wise_grads_per_batch: bool = False,
        scope: str = "paper",
    ) -> None:
        self.plan = plan(model, resolve_reducer(strategy, options), scope)
        self.dim = self.plan.dimension
        if self.dim < 1:
            raise AdapterError(f"strategy {self.plan.reducer.name!r} reduces to {self.dim} dimensions; need at least 1")
        layers = _layers_of(model, self.plan)
        if sample_wise_grads_per_batch:
            modules = dict(model.named_modules())
            bad = [n for n in layers if not isinstance(modules[n], TRICK_MODULES)]
            if bad:
                raise AdapterError(
                    f"sample_wise_grads_per_batch=True supports only nn.Linear/nn.Conv2d layers; "
                    f"{bad[0]} is {type(modules[bad[0]]).__name__} (use sample_wise_grads_per_batch=False)"
                )
        loss = ResponseLoss("sum" if sample_wise_grads_per_batch else "none")
        super().__init__(
            model, train_dataset, checkpoints, checkpoints_load_func, layers=layers, loss_fn=loss,
            batch_size=batch_size, sample_wise_grads_per_batch=sample_wise_grads_per_batch,
        )
        self.normalize = normalize
        self._logits = _Logits(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self._layer_param_names = [names.get(id(p)) for p in _extract_parameters_from_layers(self.layer_modules)]

    def _basic_computation_tracincp(
        self,
        inputs: Tuple[Any, ...],
        targets: Optional[Tensor] = None,
        loss_fn: Optional[Union[nn.Module, Callable]] = None,
        reduction_type: Optional[str] = None,
    ) -> Tuple[Tensor, ...]:
        """Reduced (and, with ``normalize``, unit-norm) per-sample gradients: a 1-tuple ``([N, D],)``."""
        if len(inputs) != 2 or targets is None:
            raise AdapterError("a batch is (input_ids, attention_mask, labels)")
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if self.sample_wise_grads_per_batch:
            jac = _compute_jacobian_wrt_params_with_sample_wise_trick(
                self._logits, inputs, targets, loss_fn, reduction_type or "sum", self.layer_modules)
        else:
            jac = _compute_jacobian_wrt_params(self._logits, inputs, targets, loss_fn, self.layer_modules)
        wanted = set(self.plan.param_names)
        grads = {n: g for n, g in zip(self._layer_param_names, jac) if n in wanted}
        reduced = reduce_gradients(self.plan, grads, self.dim).float()
        if self.normalize:
            reduced = reduced / reduced.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return (reduced,)
