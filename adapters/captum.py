"""Captum adapter: selproj reducers in TracInCP, on causal LMs, within a memory limit.

:func:`tracin_layers` gives the module names of a reducer's selection, for plain
``TracInCP(layers=...)``.  :class:`ReducedTracInCP` is a ``TracInCP`` whose per-sample
gradients (of the response-masked loss, for the selected components only) go through
the reducer — a projection, a selection, or a third-party plugin from the registry —
before Captum's dot products; with ``normalize=True`` (default) scores are cosines, the
selproj retrieval score.  Gradients are taken a few samples at a time and reduced by the
transform built once per model; training batches are sized, and test rows that would not
fit are kept on disk, so that the process, model included, stays within ``memory_limit_gb``.  Data: ``(input_ids, attention_mask, labels)``
tuples, e.g. :func:`dataset` for training samples and :func:`encode` for test samples.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selproj_plugin.adapters._common import (
    DEFAULT_MEMORY_LIMIT_GB,
    AdapterError,
    ModelState,
    Plan,
    check_labels,
    encode,
    evaluating,
    gigabytes,
    memory_budget_bytes,
    plan,
    reduce_gradients,
    resolve_reducer,
    response_loss,
    row_slices,
    rows_in_parts,
    take_rows,
)
from selproj_plugin.adapters._private import (
    KMostInfluentialResults,
    TracInCPBase,
    compute_jacobian_sample_wise,
    extract_parameters_from_layers,
    format_inputs_dataset,
    load_flexible_state_dict,
)
from selproj_plugin.adapters._rows import RowFile, streamed_dots
from selproj_plugin.budget import release_freed_memory
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer

__all__ = ["AdapterError", "ReducedTracInCP", "ResponseLoss", "dataset", "encode", "tracin_layers"]

# Captum's per-sample trick (sample_wise_grads_per_batch=True) hooks only these, listed directly.
TRICK_MODULES = (nn.Linear, nn.Conv2d)
CURRENT = "<the model's current weights>"  # the one checkpoint when none is given
MAX_BATCH = 32  # largest automatic training batch (gradients are taken a few samples at a time anyway)


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


def tracin_layers(
    model: nn.Module, strategy: str | Reducer = "full", options: Mapping[str, Any] | None = None, *, prefix: str = "", scope: str = "paper"
) -> list[str]:
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
        check_labels(labels)
        losses = response_loss(logits, labels)
        return losses if self.reduction == "none" else losses.sum()


class _Logits(nn.Module):
    """``model(input_ids, attention_mask)`` -> logits tensor, the form Captum differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def dataset(tokenizer: Any, samples: Sequence[Sample], *, max_length: int = EngineConfig.max_length) -> TensorDataset:
    """Training samples as a ``TensorDataset`` of ``(input_ids, attention_mask, labels)``."""
    return TensorDataset(*encode(tokenizer, samples, max_length=max_length))


def _no_load(model: nn.Module, checkpoint: str) -> float:
    """Checkpoint loader for :data:`CURRENT`: keeps the weights, learning rate 1."""
    return 1.0


class ReducedTracInCP(TracInCPBase):
    """TracInCP over a selproj reducer's reduced per-sample gradients of a causal LM.

    Gradients of the response-masked per-sample loss are taken for the selected
    components only, mapped to the reducer's ``{component: [N, d]}`` features, reduced to
    ``[N, D]`` by the transform built once per model and, with ``normalize``, scaled to
    unit norm, so ``influence`` returns learning-rate-weighted cosines summed over
    checkpoints.  ``checkpoints=None`` scores the model as it is, with no checkpoint file.

    ``memory_limit_gb`` bounds the whole process, as the engine's does: of what it leaves beside what the process
    holds with the model loaded, an eighth bounds the
    per-sample gradients taken at once, an eighth the training batch's reduced rows
    (``batch_size=None`` picks the largest batch that fits), half the test inputs' reduced
    rows, which Captum keeps for the whole pass over the training data.  Test rows beyond
    that are written to a temporary file in ``spill_dir`` (default: the system's temporary
    directory; removed when the call returns) and every training batch meets them a block
    of columns at a time, so each gradient is still computed once.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Union[str, List[str], Iterator[str], None] = None,
        strategy: str | Reducer = "full",
        options: Mapping[str, Any] | None = None,
        *,
        checkpoints_load_func: Optional[Callable[[nn.Module, str], float]] = None,
        batch_size: Optional[int] = None,
        normalize: bool = True,
        sample_wise_grads_per_batch: bool = False,
        memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
        scope: str = "paper",
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.plan = plan(model, resolve_reducer(strategy, options), scope)
        self.dim = self.plan.dimension
        self.limit_bytes = memory_budget_bytes(memory_limit_gb, model)
        # float64 rows: Captum's products of float32 rows, summed over a full gradient, lose digits
        self.row_bytes = 2 * self.plan.row_bytes
        self.test_rows = self.plan.rows(self.limit_bytes / 2, self.row_bytes)
        self.spill_dir = spill_dir
        train_rows = self.plan.rows(self.limit_bytes / 8, self.row_bytes)
        if batch_size is None:
            batch_size = min(MAX_BATCH, train_rows)
        given = getattr(train_dataset, "batch_size", None) if isinstance(train_dataset, DataLoader) else batch_size
        if given is not None and (not isinstance(given, int) or given < 1):
            raise AdapterError(f"batch_size must be a positive number of samples, got {given!r}")
        if given is not None and given > train_rows:
            raise AdapterError(
                f"a training batch of {given} samples holds {given} x {self.dim:,} reduced floats "
                f"({gigabytes(given * self.row_bytes)}), over an eighth of the "
                f"{gigabytes(self.limit_bytes)} the memory limit leaves beside the model; use batch_size<={train_rows} or batch_size=None"
            )
        layers = _layers_of(model, self.plan)
        if sample_wise_grads_per_batch:
            modules = dict(model.named_modules())
            bad = [n for n in layers if not isinstance(modules[n], TRICK_MODULES)]
            if bad:
                raise AdapterError(
                    f"sample_wise_grads_per_batch=True supports only nn.Linear/nn.Conv2d layers; "
                    f"{bad[0]} is {type(modules[bad[0]]).__name__} (use sample_wise_grads_per_batch=False)"
                )
        if checkpoints is None:
            if checkpoints_load_func is not None:
                raise AdapterError("checkpoints_load_func needs checkpoints to load")
            checkpoints, checkpoints_load_func = [CURRENT], _no_load
        loss = ResponseLoss("sum" if sample_wise_grads_per_batch else "none")
        user_state = ModelState.of(model)  # Captum sets requires_grad on the layers' parameters for good
        super().__init__(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func or load_flexible_state_dict,
            layers=layers,
            loss_fn=loss,
            batch_size=batch_size,
            sample_wise_grads_per_batch=sample_wise_grads_per_batch,
        )
        user_state.restore(model)
        self.normalize = normalize
        self._logits = _Logits(model)
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.plan.param_names]
        names = {id(p): n for n, p in named.items()}
        self._layer_params = list(extract_parameters_from_layers(self.layer_modules))
        self._layer_param_names = [names.get(id(p)) for p in self._layer_params]

    # ---- per-sample gradients, reduced a micro-batch at a time -------------------------
    def _gradients(self, inputs: Tuple[Any, ...], targets: Tensor, loss_fn: Callable, reduction_type: Optional[str]) -> dict[str, Tensor]:
        """``{param: [m, ...]}`` per-sample gradients of the selected tensors for one micro-batch."""
        if self.sample_wise_grads_per_batch:
            jac = compute_jacobian_sample_wise(self._logits, inputs, targets, loss_fn, reduction_type or "sum", self.layer_modules)
            wanted = set(self.plan.param_names)
            return {n: g for n, g in zip(self._layer_param_names, jac) if n in wanted}
        with torch.enable_grad():
            losses = loss_fn(self._logits(*inputs), targets)
            m = losses.shape[0]
            rows = [torch.autograd.grad(losses[i], self._params, retain_graph=i < m - 1) for i in range(m)]
        del losses
        if m == 1:
            return {n: g.unsqueeze(0) for n, g in zip(self.plan.param_names, rows[0])}
        return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(self.plan.param_names)}

    def batch_gradients(
        self,
        inputs: Tuple[Any, ...],
        targets: Optional[Tensor] = None,
        loss_fn: Optional[Union[nn.Module, Callable]] = None,
        reduction_type: Optional[str] = None,
    ) -> Tuple[Tensor, ...]:
        """Reduced (and, with ``normalize``, unit-norm) per-sample gradients: a 1-tuple ``([N, D],)``."""
        if len(inputs) != 2 or targets is None:
            raise AdapterError("a batch is (input_ids, attention_mask, labels)")
        check_labels(targets)
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        n = targets.shape[0]
        step = self.plan.gradient_rows(self.limit_bytes / 8, self.model, targets.shape[1])

        def part_of(rows: slice) -> Tensor:
            *part_inputs, part_targets = take_rows((*inputs, targets), rows)
            with evaluating(self.model, self._layer_params if self.sample_wise_grads_per_batch else self._params):
                grads = self._gradients(tuple(part_inputs), part_targets, loss_fn, reduction_type)
            release_freed_memory()  # the backward's temporaries
            part = reduce_gradients(self.plan, grads).double()
            del grads
            release_freed_memory()
            if self.normalize:
                part /= part.norm(dim=1, keepdim=True).clamp(min=1e-30)
            return part

        return (rows_in_parts(n, step, part_of),)

    # ---- test inputs beyond the memory limit ----------------------------------------------
    def _batches(self, inputs: Union[Tuple[Any, ...], DataLoader]) -> list[tuple[Any, ...]]:
        """Test inputs as batches of at most ``test_rows`` samples."""
        return [take_rows(batch, rows) for batch in format_inputs_dataset(inputs) for rows in row_slices(batch[0].shape[0], self.test_rows)]

    def _fits(self, inputs: Union[Tuple[Any, ...], DataLoader]) -> bool:
        """Whether the test inputs' reduced rows fit their share of the limit (Captum then runs as is)."""
        batches = list(inputs) if isinstance(inputs, DataLoader) else [tuple(inputs)]
        return sum(b[0].shape[0] for b in batches) <= self.test_rows

    def influence_matrix(self, inputs: Union[Tuple[Any, ...], DataLoader], show_progress: bool = False, aggregate: bool = False) -> Tensor:
        """Captum's influence matrix; test rows beyond their share wait on disk, met a block of columns at a time."""
        if self._fits(inputs):
            return super().influence_matrix(inputs, show_progress, aggregate)
        batches = self._batches(inputs)
        total = None
        with tempfile.TemporaryDirectory(dir=self.spill_dir, prefix="selproj-tracin-") as spill:
            for c, checkpoint in enumerate(self.checkpoints):
                learning_rate = self.checkpoints_load_func(self.model, checkpoint)
                tests = RowFile.open(Path(spill) / f"test-{c}.npy", (sum(len(b[0]) for b in batches), self.dim), np.float32, "w+")
                start = 0
                for batch in batches:
                    (rows,) = self.batch_gradients(batch[0:-1], batch[-1], self.test_loss_fn, self.test_reduction_type)
                    tests[start : start + len(rows)] = rows
                    start += len(rows)
                    del rows
                scores = []
                for batch in self.train_dataloader:
                    (rows,) = self.batch_gradients(batch[0:-1], batch[-1], self.loss_fn, self.reduction_type)
                    scores.append(streamed_dots(tests, rows, self.limit_bytes // 8))
                    del rows
                part = torch.cat(scores, dim=1) * learning_rate
                total = part if total is None else total + part
        return total.sum(dim=0, keepdim=True) if aggregate else total

    def most_influential(
        self,
        inputs: Union[Tuple[Any, ...], DataLoader],
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        if self._fits(inputs):
            return super().most_influential(inputs, k, proponents, show_progress, aggregate)
        scores, indices = torch.topk(self.influence_matrix(inputs, show_progress, aggregate), k, dim=1, largest=proponents)
        return KMostInfluentialResults(indices, scores)

    def self_influence(
        self, inputs: Union[Tuple[Any, ...], DataLoader, None] = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> Tensor:
        if inputs is None or self._fits(inputs):
            return super().self_influence(inputs, show_progress, outer_loop_by_checkpoints)
        loader = DataLoader(self._batches(inputs), batch_size=None, shuffle=False)
        return super().self_influence(loader, show_progress, outer_loop_by_checkpoints)
