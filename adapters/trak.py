"""TRAK adapter: any selproj reducer as TRAK's projector, on causal LMs.

``traker_kwargs(model, strategy, options=...)`` returns ready keyword arguments for
``trak.TRAKer``: a :class:`ReducerProjector` that applies the reducer (from the plugin
registry, so third-party reducers work unchanged), a :class:`SelectedGradientComputer`
that differentiates only the selected components' tensors, the response-masked loss as
the model output (:class:`CausalLMOutput`) and, by default, cosine scores
(:class:`CosineScoreComputer`), which is how the selproj benchmark retrieves.

    traker = TRAKer(train_set_size=len(train), save_dir=dir, **traker_kwargs(model, "greedy", options=...))
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=encode(tokenizer, train), num_samples=len(train))
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from trak.gradient_computers import AbstractGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, CudaProjector, ProjectionType
from trak.score_computers import AbstractScoreComputer, BasicScoreComputer

from selproj_plugin.adapters._common import (
    AdapterError, Plan, check_batch, device_name, encode, plan, reduce_gradients, require_eager,
    resolve_reducer, response_loss, split_flat,
)
from selproj_plugin.strategies.base import Reducer

__all__ = [
    "AdapterError", "CausalLMOutput", "CosineScoreComputer", "ReducerProjector",
    "SelectedGradientComputer", "encode", "traker_kwargs",
]

FAST_JL_MULTIPLE = 512  # fast_jl kernels project to multiples of 512 dimensions


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
    def get_output(model: nn.Module, weights: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                   input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Loss of one sample (unbatched tensors, as under ``vmap``) with the given weights."""
        out = torch.func.functional_call(
            model, (dict(weights), dict(buffers)), args=(),
            kwargs={"input_ids": input_ids.unsqueeze(0), "attention_mask": attention_mask.unsqueeze(0),
                    "use_cache": False},
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

    def __init__(self, model: nn.Module, task: AbstractModelOutput, grad_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 grad_wrt: Optional[Iterable[str]] = None) -> None:
        super().__init__(model, task, grad_dim, dtype, device)
        require_eager(model)
        self.grad_wrt = list(grad_wrt) if grad_wrt is not None else None
        if self.grad_wrt is not None and not self.grad_wrt:
            raise AdapterError("grad_wrt names no parameter")
        self.load_model_params(model)

    def load_model_params(self, model: nn.Module) -> None:
        """Split the (new) weights into differentiated ones and constants."""
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

        return torch.func.vmap(
            torch.func.grad(output, argnums=0),
            in_dims=(None, None, *([0] * len(batch))),
            randomness="different",
        )(self.func_weights, self.func_buffers, *batch)

    def compute_loss_grad(self, batch: Sequence[Tensor]) -> Tensor:
        """Out-to-loss gradient from the model output function."""
        weights = {**self.constants, **self.func_weights}
        return self.modelout_fn.get_out_to_loss_grad(self.model, weights, self.func_buffers, batch)


class ReducerProjector(AbstractProjector):
    """A TRAK projector that applies a selproj reducer to per-sample gradients.

    Accepts TRAK's two gradient forms: ``{param name: [B, ...]}`` (functional
    computers) and a flat ``[B, P]`` tensor laid out either over the selected tensors
    or over every model parameter (iterative computer).  ``proj_dim`` is the reducer's
    dimension; ``proj_type`` a stable string naming reducer, options and selection.
    The same reduction is used for every ``model_id`` (checkpoint).
    """

    def __init__(self, model: nn.Module, strategy: str | Reducer = "full", options: Mapping[str, Any] | None = None,
                 *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0, fast_jl: bool | None = None, max_batch_size: int = 32, scope: str = "paper") -> None:
        self.plan: Plan = plan(model, resolve_reducer(strategy, options), scope)
        dim = self.plan.dimension
        if dim < 1:
            raise AdapterError(f"strategy {self.plan.reducer.name!r} reduces to {dim} dimensions; TRAK needs at least 1")
        device = device_name(device, model)
        proj_type = self.plan.fingerprint()
        self.inner: AbstractProjector | None = None
        if fast_jl is None:
            fast_jl = self.plan.reducer.name == "random_projection" and device.startswith("cuda") and fast_jl_available()
        if fast_jl:
            if self.plan.reducer.name != "random_projection":
                raise AdapterError(f"fast_jl replaces a random projection; strategy {self.plan.reducer.name!r} is not one")
            if not (device.startswith("cuda") and fast_jl_available()):
                raise AdapterError("fast_jl=True needs a CUDA device and the fast_jl package")
            check_fast_jl_dim(dim)
            seed = int(getattr(self.plan.reducer, "seed", seed))
            self.inner = CudaProjector(grad_dim=self.plan.num_params, proj_dim=dim, seed=seed,
                                       proj_type=ProjectionType.rademacher, device=device,
                                       max_batch_size=max_batch_size, dtype=dtype)
            proj_type += ":fast_jl"
        super().__init__(grad_dim=self.plan.num_params, proj_dim=dim, seed=seed, proj_type=proj_type, device=device)
        self.dtype = dtype
        numel = {n: p.numel() for n, p in model.named_parameters()}
        self._selected_layout = [(n, numel[n]) for n in self.plan.param_names]
        self._model_layout = list(numel.items())

    def project(self, grads: Mapping[str, Tensor] | Tensor, model_id: int) -> Tensor:
        """Reduce a batch of per-sample gradients to ``[B, proj_dim]``."""
        if isinstance(grads, Tensor):
            grads = split_flat(grads, [self._selected_layout, self._model_layout])
        elif not isinstance(grads, Mapping):
            raise AdapterError(f"gradients must be a dict of tensors or a [batch, params] tensor, got {type(grads).__name__}")
        if self.inner is not None:
            flat = torch.cat([grads[p].flatten(1) for p in self.plan.param_names], dim=1)
            return self.inner.project(flat.to(self.dtype).contiguous(), model_id)
        out = reduce_gradients(self.plan, grads, self.proj_dim)
        return out.to(device=self.device, dtype=self.dtype)

    def free_memory(self) -> None:
        """Release projector state; ``project`` keeps working afterwards (state is rebuilt)."""
        if self.inner is not None:
            self.inner.free_memory()


class CosineScoreComputer(AbstractScoreComputer):
    """Scores = cosine of train and target reduced gradients (averaged over checkpoints).

    Retrieval in selproj ranks candidates by cosine; TRAK's default score computer
    instead whitens by ``(XᵀX)⁻¹``.  ``get_xtx`` returns the squared row norms.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 logging_level: int = logging.INFO, lambda_reg: float = 0.0, **_: Any) -> None:
        super().__init__(dtype, device)

    def get_xtx(self, grads: Tensor) -> Tensor:
        """Squared norm of every row ``[n]`` (stands in for XᵀX)."""
        g = grads.to(self.device, torch.float32)
        return (g * g).sum(dim=1)

    def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
        """Unit-norm rows (all-zero rows stay zero)."""
        g = grads.to(self.device, torch.float32)
        return (g / xtx.sqrt().clamp(min=1e-30).unsqueeze(1)).to(self.dtype)

    def get_scores(self, features: Tensor, target_grads: Tensor, accumulator: Tensor) -> None:
        """``accumulator[n, m] += cos(train n, target m)``."""
        t = target_grads.to(self.device, torch.float32)
        t = t / t.norm(dim=1, keepdim=True).clamp(min=1e-30)
        accumulator += (features.to(self.device, torch.float32) @ t.T).detach().cpu()


def traker_kwargs(model: nn.Module, strategy: str | Reducer = "full", options: Mapping[str, Any] | None = None,
                  *, device: str | torch.device | None = None, score: str = "cosine",
                  use_half_precision: bool = False, fast_jl: bool | None = None, scope: str = "paper") -> dict[str, Any]:
    """Keyword arguments for ``trak.TRAKer`` (add ``train_set_size`` and ``save_dir``).

    ``strategy`` is a registered reducer name (``options`` are its options) or a
    configured :class:`~selproj_plugin.Reducer`; ``score`` is ``"cosine"`` (retrieval, the
    selproj default) or ``"trak"`` (TRAK's whitened inner product); ``scope`` is the component
    set the reducer selects from (``"paper"``: embedding and weight matrices; ``"all"``).  Switches an sdpa
    model to eager attention and turns ``device`` into the string TRAK expects.
    """
    if score not in ("cosine", "trak"):
        raise AdapterError(f"score must be 'cosine' or 'trak', got {score!r}")
    device = device_name(device, model)
    require_eager(model)
    dtype = torch.float16 if use_half_precision else torch.float32
    projector = ReducerProjector(model, strategy, options, device=device, dtype=dtype, fast_jl=fast_jl, scope=scope)
    return {
        "model": model,
        "task": CausalLMOutput(),
        "device": device,
        "gradient_computer": SelectedGradientComputer,
        "grad_wrt": list(projector.plan.param_names),
        "projector": projector,
        "proj_dim": projector.proj_dim,
        "score_computer": CosineScoreComputer if score == "cosine" else BasicScoreComputer,
        "use_half_precision": use_half_precision,
    }
