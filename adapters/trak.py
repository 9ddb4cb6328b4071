"""TRAK adapter: any selproj reducer as TRAK's projector, on causal LMs, within a memory limit.

:class:`ReducedTRAKer` is a ``trak.TRAKer`` for a reducer (from the plugin registry, so
third-party reducers work unchanged) that streams: batches are split so that per-sample
gradients and reduced rows fit what ``memory_limit_gb`` (the whole process's, as the engine's) leaves beside
the model, the reducer's transform is
built once per model, stores are written row by row into ``save_dir`` without memory
maps, and cosine scores are computed a block of columns at a time.  With it the full
gradient of a 135M model fits in 4 GB.

    traker = ReducedTRAKer(model, "greedy", {"selection": [...]}, train_set_size=len(train), save_dir=tmp)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=encode(tokenizer, train), num_samples=len(train))

``traker_kwargs(model, strategy, options=...)`` gives the same parts for a plain
``TRAKer``: a :class:`ReducerProjector`, a :class:`ReducingGradientComputer` that
differentiates only the selected tensors and reduces them a few samples at a time, the
response-masked loss as model output (:class:`CausalLMOutput`) and cosine scores
(:class:`CosineScoreComputer`).  Plain TRAKer then holds every stored row in memory when
it finalizes: fine for selections and projections, not for ``full`` on a real model.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

import torch
from torch import Tensor, nn
from trak.gradient_computers import AbstractGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, CudaProjector, ProjectionType
from trak.score_computers import AbstractScoreComputer, BasicScoreComputer

from selproj_plugin.adapters._common import (
    DEFAULT_MEMORY_LIMIT_GB,
    AdapterError,
    ModelState,
    Plan,
    check_batch,
    device_name,
    encode,
    evaluating,
    gigabytes,
    memory_budget_bytes,
    plan,
    reduce_gradients,
    check_eager_possible,
    resolve_reducer,
    response_loss,
    row_slices,
    rows_in_parts,
    split_flat,
    take_rows,
)
from selproj_plugin.adapters._private import SaverBase, TRAKerBase
from selproj_plugin.adapters._rows import RowFile, streamed_cosine
from selproj_plugin.budget import release_freed_memory
from selproj_plugin.strategies.base import Reducer

__all__ = [
    "AdapterError",
    "CausalLMOutput",
    "CosineScoreComputer",
    "ReducedBatch",
    "ReducedTRAKer",
    "ReducerProjector",
    "ReducingGradientComputer",
    "SelectedGradientComputer",
    "encode",
    "traker_kwargs",
]

FAST_JL_MULTIPLE = 512  # fast_jl kernels project to multiples of 512 dimensions
SCORE_BLOCK_COLUMNS = 2**20  # float64 copies of this many columns at a time when scoring
WIDE_STORES = ("grads.mmap", "features.mmap")  # and "<experiment>_grads.mmap": [samples, proj_dim]


def fast_jl_available() -> bool:
    """Whether TRAK's CUDA projector can be used here (``fast_jl`` importable and a GPU present)."""
    return torch.cuda.is_available() and importlib.util.find_spec("fast_jl") is not None


def check_fast_jl_dim(dim: int) -> None:
    """fast_jl projects only to positive multiples of 512; anything else is one clear error."""
    if dim < FAST_JL_MULTIPLE or dim % FAST_JL_MULTIPLE:
        raise AdapterError(
            f"projection dimension {dim} does not suit TRAK's CudaProjector (fast_jl needs a multiple of "
            f"{FAST_JL_MULTIPLE}); pick dim={max(FAST_JL_MULTIPLE, -(-dim // FAST_JL_MULTIPLE) * FAST_JL_MULTIPLE)} or fast_jl=False"
        )


class CausalLMOutput(AbstractModelOutput):
    """Model output = the per-sample loss: mean cross-entropy over response tokens + EOS.

    A batch is ``(input_ids, attention_mask, labels)`` as :func:`encode` builds it
    (labels -100 on the prompt and padding).  The output is the loss itself, so the
    out-to-loss gradient TRAK multiplies scores by is exactly 1.
    """

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def get_output(
        model: nn.Module,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
    ) -> Tensor:
        """Loss of one sample (unbatched tensors, as under ``vmap``) with the given weights."""
        out = torch.func.functional_call(
            model,
            (dict(weights), dict(buffers)),
            args=(),
            kwargs={"input_ids": input_ids.unsqueeze(0), "attention_mask": attention_mask.unsqueeze(0), "use_cache": False},
        )
        return response_loss(out.logits, labels.unsqueeze(0)).sum()

    def get_out_to_loss_grad(self, model: nn.Module, weights: Any, buffers: Any, batch: Sequence[Tensor]) -> Tensor:
        """d(loss)/d(output) = 1 for every sample: ``[B, 1]`` ones."""
        return torch.ones(batch[0].shape[0], 1, device=batch[0].device)


class SelectedGradientComputer(AbstractGradientComputer):
    """Per-sample gradients of only the ``grad_wrt`` tensors, via ``vmap(grad(...))``.

    TRAK's ``FunctionalGradientComputer`` differentiates every parameter and then drops
    those outside ``grad_wrt``; here the others enter the functional call as constants, so
    their per-sample gradients are never formed.  Returns ``{param name: [B, ...]}``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: AbstractModelOutput,
        grad_dim: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        grad_wrt: Optional[Iterable[str]] = None,
    ) -> None:
        super().__init__(model, task, grad_dim, dtype, device)
        self.user_state = ModelState.of(model)
        check_eager_possible(model)
        self.grad_wrt = list(grad_wrt) if grad_wrt is not None else None
        if self.grad_wrt is not None and not self.grad_wrt:
            raise AdapterError("grad_wrt names no parameter")
        self.load_model_params(model)

    def load_model_params(self, model: nn.Module) -> None:
        """Split the (new) weights into differentiated ones and constants.

        TRAKer calls this right after ``model.eval()`` in ``load_checkpoint`` and
        ``start_scoring_checkpoint``: the training flags the model had are put back.
        """
        if hasattr(self, "user_state"):
            self.user_state.restore_training(model)
        named = dict(model.named_parameters())
        wanted = self.grad_wrt if self.grad_wrt is not None else [n for n, p in named.items() if p.requires_grad]
        missing = [n for n in wanted if n not in named]
        if missing:
            raise AdapterError(f"grad_wrt names no parameter of the model: {', '.join(missing[:3])}")
        keep = set(wanted)
        self.model = model
        self.func_weights = {n: named[n].detach() for n in wanted}
        self.constants = {n: p.detach() for n, p in named.items() if n not in keep}
        self.func_buffers = {n: b.detach() for n, b in model.named_buffers()}

    def compute_per_sample_grad(self, batch: Sequence[Tensor]) -> dict[str, Tensor]:
        """``{param: [B, ...]}`` per-sample gradients of the model output for the kept tensors."""
        check_batch(batch)
        task, model, constants = self.modelout_fn, self.model, self.constants

        def output(weights: dict[str, Tensor], buffers: dict[str, Tensor], *row: Tensor) -> Tensor:
            return task.get_output(model, {**constants, **weights}, buffers, *row)

        with evaluating(model, eager=True):
            return torch.func.vmap(
                torch.func.grad(output, argnums=0),
                in_dims=(None, None, *([0] * len(batch))),
                randomness="different",
            )(self.func_weights, self.func_buffers, *batch)

    def compute_loss_grad(self, batch: Sequence[Tensor]) -> Tensor:
        """Out-to-loss gradient from the model output function."""
        weights = {**self.constants, **self.func_weights}
        return self.modelout_fn.get_out_to_loss_grad(self.model, weights, self.func_buffers, batch)


@dataclass(frozen=True)
class ReducedBatch:
    """Reduced rows ``[B, D]`` a :class:`ReducingGradientComputer` hands to its projector."""

    values: Tensor
    proj_type: str


class ReducerProjector(AbstractProjector):
    """A TRAK projector that applies a selproj reducer to per-sample gradients.

    The reducer's selection and transform are built once, here (:func:`plan`), and reused
    for every batch and every ``model_id`` (checkpoint).  Accepts rows already reduced by
    a :class:`ReducingGradientComputer` sharing this projector, and TRAK's two gradient
    forms: ``{param name: [B, ...]}`` (functional computers) and a flat ``[B, P]`` tensor
    laid out over the selected tensors or over every model parameter (iterative computer).
    ``proj_dim`` is the reducer's dimension; ``proj_type`` a stable string naming reducer,
    options and selection.  ``fast_jl=True`` (CUDA, a ``random_projection`` to a multiple of
    512) swaps in TRAK's dense CUDA projector: other vectors than the engine's, so never by default.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str | Reducer = "full",
        options: Mapping[str, Any] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        fast_jl: bool = False,
        max_batch_size: int = 32,
        scope: str = "paper",
    ) -> None:
        self.plan: Plan = plan(model, resolve_reducer(strategy, options), scope)
        dim = self.plan.dimension
        device = device_name(device, model)
        proj_type = self.plan.fingerprint()
        self.inner: AbstractProjector | None = None
        if fast_jl:  # opt-in only: TRAK's dense projector gives other vectors than the engine's count sketch
            if self.plan.reducer.name != "random_projection":
                raise AdapterError(f"fast_jl replaces a random projection; strategy {self.plan.reducer.name!r} is not one")
            if not (device.startswith("cuda") and fast_jl_available()):
                raise AdapterError("fast_jl=True needs a CUDA device and the fast_jl package")
            check_fast_jl_dim(dim)
            seed = int(getattr(self.plan.reducer, "seed", seed))
            self.inner = CudaProjector(
                grad_dim=self.plan.num_params,
                proj_dim=dim,
                seed=seed,
                proj_type=ProjectionType.rademacher,
                device=device,
                max_batch_size=max_batch_size,
                dtype=dtype,
            )
            proj_type += ":fast_jl"
        super().__init__(grad_dim=self.plan.num_params, proj_dim=dim, seed=seed, proj_type=proj_type, device=device)
        self.dtype = dtype
        numel = {n: p.numel() for n, p in model.named_parameters()}
        self._selected_layout = [(n, numel[n]) for n in self.plan.param_names]
        self._model_layout = list(numel.items())

    def reduce(self, grads: Mapping[str, Tensor] | Tensor) -> Tensor:
        """Per-sample gradients (either TRAK form) -> ``[B, proj_dim]`` in the projector's dtype and device."""
        if isinstance(grads, Tensor):
            grads = split_flat(grads, [self._selected_layout, self._model_layout])
        elif not isinstance(grads, Mapping):
            raise AdapterError(f"gradients must be a dict of tensors or a [batch, params] tensor, got {type(grads).__name__}")
        if self.inner is not None:  # one projection for every checkpoint, as for the other reducers
            flat = torch.cat([grads[p].flatten(1) for p in self.plan.param_names], dim=1)
            return self.inner.project(flat.to(self.dtype).contiguous(), 0)
        return reduce_gradients(self.plan, grads).to(device=self.device, dtype=self.dtype)

    def project(self, grads: ReducedBatch | Mapping[str, Tensor] | Tensor, model_id: int) -> Tensor:
        """Reduce a batch of per-sample gradients to ``[B, proj_dim]`` (reduced rows pass through)."""
        if isinstance(grads, ReducedBatch):
            if grads.proj_type != self.proj_type:
                raise AdapterError(f"rows reduced by {grads.proj_type} reached the projector of {self.proj_type}")
            return grads.values
        return self.reduce(grads)

    def free_memory(self) -> None:
        """Release projector state; ``project`` keeps working afterwards (state is rebuilt)."""
        if self.inner is not None:
            self.inner.free_memory()


class ReducingGradientComputer(SelectedGradientComputer):
    """Per-sample gradients of the selected tensors, reduced as they are computed, a few samples at a time.

    TRAKer passes the gradient computer's result to the projector; this computer applies its
    projector's reduction itself, to micro-batches whose gradients, activations and reduced
    rows fit ``limit_bytes``, so no more than a micro-batch of per-sample gradients ever
    exists.  The projector receives only the reduced rows (:class:`ReducedBatch`).  A batch
    whose reduced rows alone would exceed the limit is refused with a one-line error.
    """

    def __init__(
        self,
        model: nn.Module,
        task: AbstractModelOutput,
        grad_dim: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        grad_wrt: Optional[Iterable[str]] = None,
        *,
        projector: ReducerProjector,
        limit_bytes: int,
    ) -> None:
        super().__init__(model, task, grad_dim, dtype, device, grad_wrt)
        self.projector, self.limit_bytes = projector, limit_bytes
        self.max_rows = projector.plan.rows(limit_bytes, projector.plan.row_bytes, copies=2)  # TRAKer copies them

    def compute_per_sample_grad(self, batch: Sequence[Tensor]) -> ReducedBatch:
        """Reduced rows ``[B, D]`` of a batch, computed a micro-batch at a time."""
        check_batch(batch)
        plan_, n = self.projector.plan, batch[0].shape[0]
        if n > self.max_rows:
            raise AdapterError(
                f"a batch of {n} samples reduces to {n} x {plan_.dimension:,} floats "
                f"({gigabytes(2 * n * plan_.row_bytes)} with TRAKer's copy), over the {gigabytes(self.limit_bytes)} "
                f"the memory limit leaves beside the model; pass at most {self.max_rows} per call (ReducedTRAKer splits batches)"
            )
        step = plan_.gradient_rows(self.limit_bytes, self.model, batch[0].shape[1])
        selected_grads = super().compute_per_sample_grad

        def part_of(rows: slice) -> Tensor:
            grads = selected_grads(take_rows(batch, rows))
            release_freed_memory()  # the backward's temporaries
            part = self.projector.reduce(grads)
            del grads
            release_freed_memory()
            return part

        return ReducedBatch(rows_in_parts(n, step, part_of), self.projector.proj_type)


class CosineScoreComputer(AbstractScoreComputer):
    """Scores = cosine of train and target reduced gradients (averaged over checkpoints).

    Retrieval in selproj ranks candidates by cosine; TRAK's default score computer
    instead whitens by ``(XᵀX)⁻¹``.  ``get_xtx`` returns the squared row norms.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        logging_level: int = logging.INFO,
        lambda_reg: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__(dtype, device)

    def get_xtx(self, grads: Tensor) -> Tensor:
        """Squared norm of every row ``[n]`` (stands in for XᵀX), summed in float64."""
        g = grads.to(self.device, torch.float32)
        return torch.sum(g * g, dim=1, dtype=torch.float64)

    def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
        """Unit-norm rows (all-zero rows stay zero)."""
        g = grads.to(self.device, torch.float32)
        return (g / xtx.sqrt().clamp(min=1e-30).to(torch.float32).unsqueeze(1)).to(self.dtype)

    def get_scores(self, features: Tensor, target_grads: Tensor, accumulator: Tensor) -> None:
        """``accumulator[n, m] += cos(train n, target m)``, products summed in float64 a block of columns at a
        time: float32 sums over a full gradient's 10^8 entries lose digits."""
        t = target_grads.to(self.device, torch.float32)
        f = features.to(self.device, torch.float32)
        dots = torch.zeros(f.shape[0], t.shape[0], dtype=torch.float64, device=self.device)
        for start in range(0, t.shape[1], SCORE_BLOCK_COLUMNS):
            stop = start + SCORE_BLOCK_COLUMNS
            dots += f[:, start:stop].double() @ t[:, start:stop].double().T
        norms = torch.sum(t * t, dim=1, dtype=torch.float64).sqrt().clamp(min=1e-30)
        accumulator += (dots / norms).to(accumulator.dtype).detach().cpu()


class RowSaver(SaverBase):
    """TRAK's ``MmapSaver`` with the ``[samples, proj_dim]`` stores as :class:`RowFile` (same files, same metadata).

    TRAK maps those arrays, so every page it writes or reads stays resident; the small
    ones (scores, out-to-loss, bookkeeping) are still mapped as TRAK does.
    """

    def load_store(self, fname, shape, mode, dtype=None):
        name = Path(fname).name
        if name not in WIDE_STORES and not name.endswith("_grads.mmap"):
            return super().load_store(fname, shape, mode, dtype)
        if name == "features.mmap":
            return None  # cosine features are the stored gradients, normalised at scoring time
        dtype = dtype or (np.float16 if self.use_half_precision else np.float32)
        try:
            return RowFile.open(fname, shape, dtype, mode)
        except FileNotFoundError:
            return None  # as MmapSaver: a missing store is reported by whoever needs it


def traker_kwargs(
    model: nn.Module,
    strategy: str | Reducer = "full",
    options: Mapping[str, Any] | None = None,
    *,
    device: str | torch.device | None = None,
    score: str = "cosine",
    use_half_precision: bool = False,
    fast_jl: bool = False,
    scope: str = "paper",
    memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
) -> dict[str, Any]:
    """Keyword arguments for ``trak.TRAKer`` (add ``train_set_size`` and ``save_dir``).

    ``strategy`` is a registered reducer name (``options`` are its options) or a
    configured :class:`~selproj_plugin.Reducer`; ``score`` is ``"cosine"`` (retrieval, the
    selproj default) or ``"trak"`` (TRAK's whitened inner product, which inverts a
    ``proj_dim`` square matrix); ``scope`` is the component set the reducer selects from
    (``"paper"``: embedding and weight matrices; ``"all"``).  Per-sample gradients are
    reduced in micro-batches under ``memory_limit_gb``, which bounds the whole process as the engine's does:
    they get what the process does not already hold with the model loaded.  ``use_half_precision`` (float16
    stores) is for projections only: a selection's raw gradient entries underflow in float16.
    Gradients are taken with eager attention (the model's own is put back after each call) and
    ``device`` becomes the string TRAK expects.
    """
    if score not in ("cosine", "trak"):
        raise AdapterError(f"score must be 'cosine' or 'trak', got {score!r}")
    limit = memory_budget_bytes(memory_limit_gb, model)
    device = device_name(device, model)
    check_eager_possible(model)
    dtype = torch.float16 if use_half_precision else torch.float32
    projector = ReducerProjector(model, strategy, options, device=device, dtype=dtype, fast_jl=fast_jl, scope=scope)
    if use_half_precision and projector.plan.dimension >= projector.plan.num_params:
        raise AdapterError(
            f"use_half_precision=True stores float16 rows, and strategy {projector.plan.reducer.name!r} keeps "
            "unprojected gradients, whose small entries underflow in float16; use a projecting reducer "
            "or use_half_precision=False"
        )
    xtx = 2 * projector.proj_dim**2 * 4  # TRAK's X^T X and its inverse, float32
    if score == "trak" and xtx > limit:
        raise AdapterError(
            f"score='trak' inverts a {projector.proj_dim:,}-square matrix ({gigabytes(xtx)}), over the "
            f"{gigabytes(limit)} the memory limit leaves beside the model; use score='cosine' or a reducer "
            "of lower dimension"
        )
    return {
        "model": model,
        "task": CausalLMOutput(),
        "device": device,
        "gradient_computer": functools.partial(ReducingGradientComputer, projector=projector, limit_bytes=limit),
        "grad_wrt": list(projector.plan.param_names),
        "projector": projector,
        "proj_dim": projector.proj_dim,
        "score_computer": CosineScoreComputer if score == "cosine" else BasicScoreComputer,
        "use_half_precision": use_half_precision,
    }


class ReducedTRAKer(TRAKerBase):
    """``trak.TRAKer`` over a selproj reducer that keeps the process under ``memory_limit_gb`` (the model included).

    Built from :func:`traker_kwargs`; ``save_dir`` is required (TRAK's default writes to the
    working directory): the stores there hold ``train_set_size`` (and per experiment
    ``num_targets``) rows of ``proj_dim`` floats, 17 GB for ``full`` on 32 samples of a
    135M model, so use a temporary directory or delete it after use.  ``featurize`` and
    ``score`` split their batch into parts whose reduced rows fit the limit; with cosine
    scores (the default) the rows are written to the files without memory maps and
    ``finalize_scores`` reads them a block of columns at a time.  ``score="trak"`` keeps
    TRAK's own stores and whitened scores.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str | Reducer = "full",
        options: Mapping[str, Any] | None = None,
        *,
        train_set_size: int,
        save_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        score: str = "cosine",
        memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
        scope: str = "paper",
        use_half_precision: bool = False,
        fast_jl: bool = False,
        logging_level: int = logging.WARNING,
        load_from_save_dir: bool = True,
    ) -> None:
        if not save_dir:
            raise AdapterError("save_dir is required: the stores grow to train_set_size x proj_dim floats")
        if not isinstance(train_set_size, (int, np.integer)) or train_set_size < 1:
            raise AdapterError(f"train_set_size must be a positive number of samples, got {train_set_size!r}")
        kwargs = traker_kwargs(
            model,
            strategy,
            options,
            device=device,
            score=score,
            scope=scope,
            use_half_precision=use_half_precision,
            fast_jl=fast_jl,
            memory_limit_gb=memory_limit_gb,
        )
        self.limit_bytes = kwargs["gradient_computer"].keywords["limit_bytes"]  # what the limit leaves, measured once
        self.streaming = score == "cosine"
        super().__init__(
            train_set_size=int(train_set_size),
            save_dir=str(save_dir),
            logging_level=logging_level,
            load_from_save_dir=load_from_save_dir,
            saver=RowSaver if self.streaming else None,
            **kwargs,
        )

    @property
    def plan(self) -> Plan:
        """The reducer's selection and transform on this model (built once)."""
        return self.projector.plan

    def _parts(
        self, batch: Sequence[Tensor], inds: Optional[Iterable[int]], num_samples: Optional[int], target: bool
    ) -> Iterable[tuple[tuple[Tensor, ...], np.ndarray]]:
        """``(rows of batch, their indices)`` parts that fit the memory limit; indices as TRAKer assigns them."""
        check_batch(batch)
        if (inds is None) == (num_samples is None):
            raise AdapterError("give exactly one of inds and num_samples")
        n = batch[0].shape[0]
        if inds is None:
            if num_samples != n:
                raise AdapterError(f"num_samples={num_samples} but the batch holds {n} samples")
            start = self.next_index(target)
            self.set_next_index(target, start + n)
            inds = np.arange(start, start + n)
        inds = np.asarray(inds).reshape(-1)
        if len(inds) != n:
            raise AdapterError(f"{len(inds)} indices for a batch of {n} samples")
        step = self.gradient_computer.max_rows
        return [(take_rows(batch, rows), inds[rows]) for rows in row_slices(n, step)]

    def featurize(self, batch: Iterable[Tensor], inds: Optional[Iterable[int]] = None, num_samples: Optional[int] = None) -> None:
        """TRAKer's ``featurize``, a part of the batch at a time."""
        if self.loaded_model_id != self.saver.current_model_id:
            raise AdapterError("no checkpoint loaded: call load_checkpoint before featurize")
        for part, idx in self._parts(list(batch), inds, num_samples, target=False):
            super().featurize(batch=part, inds=idx)

    def score(self, batch: Iterable[Tensor], inds: Optional[Iterable[int]] = None, num_samples: Optional[int] = None) -> None:
        """TRAKer's ``score``, a part of the batch at a time."""
        state = self.saver.model_ids.get(self.saver.current_model_id) or {}
        if not state.get("is_finalized"):
            raise AdapterError(
                f"model ID {self.saver.current_model_id} is not finalized: call finalize_features and start_scoring_checkpoint before score"
            )
        for part, idx in self._parts(list(batch), inds, num_samples, target=True):
            super().score(batch=part, inds=idx)

    def finalize_features(self, model_ids: Iterable[int] = None, del_grads: bool = False) -> None:
        """Mark featurized checkpoints final; with cosine scores the stored rows are the features."""
        if not self.streaming:
            return super().finalize_features(model_ids, del_grads)
        if del_grads:
            raise AdapterError("del_grads=True would delete the stored rows that cosine scores are computed from")
        for model_id in list(self.saver.model_ids) if model_ids is None else list(model_ids):
            state = self.saver.model_ids.get(model_id)
            if state is None or not state["is_featurized"]:
                raise AdapterError(
                    f"model ID {model_id} is {'not registered' if state is None else 'not fully featurized'}; "
                    "load_checkpoint and featurize every training sample first"
                )
            self.saver.load_current_store(model_id)
            state["is_finalized"] = 1
            self.saver.serialize_current_model_id_metadata()
        self.set_next_index(False, 0)

    def finalize_scores(self, exp_name: str, model_ids: Iterable[int] = None, allow_skip: bool = False) -> np.ndarray:
        """``[train, targets]`` scores averaged over checkpoints, as an in-memory array (the store may be deleted)."""
        if not self.streaming:
            return np.array(super().finalize_scores(exp_name, model_ids, allow_skip))
        self.set_next_index(True, 0)
        experiment = self.saver.experiments.get(exp_name)
        if experiment is None:
            raise AdapterError(f"experiment {exp_name!r} does not exist; start_scoring_checkpoint and score first")
        ids = list(self.saver.model_ids) if model_ids is None else list(model_ids)
        targets = experiment["num_targets"]
        total = torch.zeros(self.train_set_size, targets, dtype=torch.float64)
        out_to_loss = np.zeros((self.train_set_size, 1))
        used = 0
        for model_id in ids:
            if not self.saver.model_ids.get(model_id, {}).get("is_finalized"):
                raise AdapterError(f"model ID {model_id} is not finalized; call finalize_features first")
            self.saver.load_current_store(model_id)
            self.saver.load_current_store(model_id, exp_name, targets)
            rows = self.saver.current_store[f"{exp_name}_grads"]
            if not isinstance(rows, RowFile):
                if allow_skip:
                    continue
                raise AdapterError(f"no target gradients of experiment {exp_name!r} for model ID {model_id}")
            total += streamed_cosine(self.saver.current_store["grads"], rows, self.limit_bytes // 2)
            out_to_loss += np.asarray(self.saver.current_store["out_to_loss"], dtype=np.float64)
            used += 1
        if not used:
            raise AdapterError(f"no checkpoint has target gradients of experiment {exp_name!r}")
        scores = (total.numpy() / used) * (out_to_loss / used)
        store = self.saver.current_store[f"{exp_name}_scores"]
        store[:] = scores
        self.saver.save_scores(exp_name)
        self.scores = scores
        return scores
