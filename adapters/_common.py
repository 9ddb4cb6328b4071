"""Shared plumbing of the TRAK and Captum adapters: reducer lookup, selection, memory, loss, checks.

Everything here maps a selproj reducer onto a concrete model: which parameter tensors
its selected components own (:class:`Plan`, built once per model, transform included),
how per-parameter per-sample gradients become the reducer's ``{component: [N, d]}``
features and then its reduced ``[N, D]`` vector (:func:`reduce_gradients`), how many
samples' gradients and reduced rows fit under the memory limit (:meth:`Plan.rows`), and
the response-masked per-sample loss written so ``torch.func.vmap`` can batch it
(:func:`response_loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from selproj_plugin.budget import resident_bytes
from selproj_plugin.components import Component, catalogue
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.loss import IGNORE, collate, encode_samples, pad_token_id
from selproj_plugin.model_state import ModelState, attention
from selproj_plugin.registry import get_strategy
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer, Reduction, reduction


# The whole process's memory limit, as the engine's: per-sample gradients, reduced rows and score blocks get
# what the process does not already hold with the model loaded
DEFAULT_MEMORY_LIMIT_GB = EngineConfig.memory_limit_gb
FEATURE_BYTES = 4  # reduced rows are kept as float32


class AdapterError(ValueError):
    """A reducer, model or batch the TRAK/Captum adapters cannot use; the message is one line."""


def memory_limit_bytes(gb: float) -> int:
    """``memory_limit_gb`` in bytes; anything but a positive number is a one-line error."""
    try:
        value = float(gb)
    except (TypeError, ValueError):
        raise AdapterError(f"memory_limit_gb must be a positive number of GB, got {gb!r}") from None
    if not value > 0 or value == float("inf"):
        raise AdapterError(f"memory_limit_gb must be a positive number of GB, got {gb!r}")
    return max(1, int(value * 2**30))


def memory_budget_bytes(gb: float, model: nn.Module) -> int:
    """What ``memory_limit_gb``, the whole process's, leaves for gradients, reduced rows and score blocks: the limit
    less what the process holds now with ``model`` loaded (as the engine counts it); a one-line error when that is
    already the limit or more."""
    limit = memory_limit_bytes(gb)
    held = resident_bytes(model)
    if held >= limit:
        raise AdapterError(
            f"memory_limit_gb={float(gb):g} bounds the whole process, which already holds "
            f"{gigabytes(held)} with the model loaded; raise memory_limit_gb"
        )
    return limit - held


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


def resolve_reducer(strategy: str | Reducer, options: Mapping[str, Any] | None = None) -> Reducer:
    """A reducer by registry name (plugins included) with ``options``, or a given instance."""
    if isinstance(strategy, Reducer):
        if options:
            raise AdapterError("options apply to a strategy name; pass a configured reducer or a name, not both")
        return strategy
    if not isinstance(strategy, str):
        raise AdapterError(f"strategy must be a registered name or a Reducer, got {type(strategy).__name__}")
    return get_strategy(strategy, **dict(options or {}))


@dataclass(frozen=True)
class Plan:
    """A reducer's reduction on one model, plus the parameter tensors its selection owns."""

    reduction: Reduction
    param_names: tuple[str, ...]  # parameter tensors to differentiate, model order
    grad_bytes: int  # one sample's gradient of those tensors, in bytes

    @property
    def reducer(self) -> Reducer:
        return self.reduction.reducer

    @property
    def chosen(self) -> tuple[Component, ...]:
        """Selected components, in the reducer's order."""
        return self.reduction.selected

    @property
    def components(self) -> tuple[Component, ...]:
        """The model's whole catalogue."""
        return self.reduction.catalogue

    @property
    def num_params(self) -> int:
        """Gradient entries of the selected components."""
        return self.reduction.num_params

    @property
    def dimension(self) -> int:
        """Length of the reduced vector, as the transform declares it."""
        return int(self.reduction.transform.dim)

    @property
    def row_bytes(self) -> int:
        """One sample's reduced row, as the adapters keep it (float32)."""
        return self.dimension * FEATURE_BYTES

    def rows(self, limit_bytes: float, per_row: int, copies: int = 1) -> int:
        """Samples whose ``copies`` buffers of ``per_row`` bytes fit in ``limit_bytes``; at least 1."""
        return max(1, int(limit_bytes // max(1, per_row * copies)))

    def gradient_rows(self, limit_bytes: float, model: nn.Module, tokens: int) -> int:
        """Samples per gradient step under ``limit_bytes``: per sample, two gradients' worth (the
        gradients and the backward's temporaries), the reduced row and the activations of ``tokens``."""
        return self.rows(limit_bytes, 2 * self.grad_bytes + self.row_bytes + activation_bytes(model, tokens))

    def fingerprint(self) -> str:
        """Stable JSON-safe id of reducer, options, selection and transform (TRAK's ``proj_type``)."""
        reducer = self.reducer
        fields = {f.name: getattr(reducer, f.name) for f in dataclasses.fields(reducer) if f.init}
        blob = json.dumps({"options": fields, "key": self.reduction.transform.key}, sort_keys=True, default=str)
        return f"selproj:{reducer.name or type(reducer).__name__}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def plan(model: nn.Module, reducer: Reducer, scope: str = "paper") -> Plan:
    """Run the reducer's select and transform once on ``model``'s catalogue (component set ``scope``)."""
    try:
        red = reduction(reducer, catalogue(model, scope))
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    wanted = {p for c in red.selected for p in c.param_names}
    params = [(n, p) for n, p in model.named_parameters() if n in wanted]
    return Plan(red, tuple(n for n, _ in params), sum(p.numel() * p.element_size() for _, p in params))


def activation_bytes(model: nn.Module, tokens: int) -> int:
    """Rough bytes one sample's forward and backward keep alive, from the model config; errs high.

    Per layer and token: a dozen hidden-size tensors, four intermediate-size ones and three
    attention rows (eager attention); per token: four vocabulary-size rows (logits, log-softmax
    and their gradients).  Unknown configs get a large transformer's sizes.
    """
    config = getattr(model, "config", None)

    def get(*names: str, default: int) -> int:
        return next((int(getattr(config, n)) for n in names if getattr(config, n, None)), default)

    hidden = get("hidden_size", "n_embd", "d_model", default=2048)
    layers = get("num_hidden_layers", "n_layer", default=24)
    inter = get("intermediate_size", "n_inner", default=4 * hidden)
    heads = get("num_attention_heads", "n_head", default=16)
    vocab = get("vocab_size", default=50_000)
    per_token = layers * (12 * hidden + 4 * inter + 3 * heads * tokens) + 4 * vocab
    return 4 * tokens * per_token


def features_from_params(plan_: Plan, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter per-sample gradients ``{param: [N, ...]}`` -> ``{selected name: [N, d]}``.

    A one-tensor component is a view of its gradient, not a copy: on a real model the
    gradients are the largest thing in memory.
    """
    missing = [p for p in plan_.param_names if p not in grads]
    if missing:
        raise AdapterError(f"gradients lack selected parameter {missing[0]} ({len(missing)} missing)")

    def flat(comp: Component) -> torch.Tensor:
        parts = [grads[p].flatten(1) for p in comp.param_names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    return {comp.name: flat(comp) for comp in plan_.chosen}


def split_flat(flat: torch.Tensor, layouts: Sequence[Sequence[tuple[str, int]]]) -> dict[str, torch.Tensor]:
    """Cut a flat ``[N, P]`` gradient into per-parameter blocks by the first layout (name, numel) of width P."""
    if flat.dim() != 2:
        raise AdapterError(f"a flat gradient must be [batch, params], got shape {tuple(flat.shape)}")
    widths = [sum(n for _, n in layout) for layout in layouts]
    if flat.shape[1] not in widths:
        raise AdapterError(f"flat gradient has {flat.shape[1]} entries per sample, expected one of {widths}")
    layout = layouts[widths.index(flat.shape[1])]
    out, start = {}, 0
    for name, n in layout:
        out[name] = flat[:, start : start + n]
        start += n
    return out


def reduce_gradients(plan_: Plan, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply the plan's transform (built once per model) to per-parameter per-sample gradients: ``[N, D]``."""
    features = features_from_params(plan_, grads)
    n = next(iter(features.values())).shape[0]
    out = torch.as_tensor(plan_.reduction.transform(features))
    del features
    dim = plan_.dimension
    if out.dim() != 2 or out.shape[0] != n:
        raise AdapterError(f"strategy {plan_.reducer.name!r} returned shape {tuple(out.shape)} for {n} samples; expected [{n}, D]")
    if out.shape[1] != dim:
        raise AdapterError(f"strategy {plan_.reducer.name!r} returned {out.shape[1]} dimensions but declares {dim}")
    return out


@contextlib.contextmanager
def evaluating(model: nn.Module, params: Iterable[nn.Parameter] = (), eager: bool = False) -> Iterator[None]:
    """``model`` in eval mode with ``params`` requiring grad (and eager attention if ``eager``), the
    user's state put back afterwards.

    Eval mode as in the engine (:mod:`selproj_plugin.capture`): dropout would make every
    gradient a different random draw, so no two paths (or calls) would agree.
    """
    state = ModelState.of(model)
    try:
        model.eval()
        if eager and state.attention not in (None, "eager"):
            check_eager_possible(model)
            model.set_attn_implementation("eager")
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        state.restore(model)


def check_eager_possible(model: nn.Module) -> None:
    """Per-sample gradients under ``torch.func.vmap`` need eager attention (sdpa and flash kernels have no
    batching rule); a model that can be neither is a one-line error."""
    impl = attention(model)
    if impl not in (None, "eager") and not hasattr(model, "set_attn_implementation"):
        raise AdapterError(f"model uses {impl!r} attention, which vmap cannot batch; load it with attn_implementation='eager'")


def device_name(device: str | torch.device | None, model: nn.Module) -> str:
    """Device as a plain string (TRAK compares it with ``"cpu"``); default: the model's device."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdapterError(f"not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdapterError(f"device {dev} requested but CUDA is not available")
    return str(dev)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over response tokens + EOS (labels -100 elsewhere): ``[B]``.

    Same loss as :func:`selproj_plugin.loss.forward_losses`, without data-dependent
    indexing, so it runs under ``torch.func.vmap``.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_loss = -picked * valid
    return token_loss.sum(-1) / valid.sum(-1).clamp(min=1).to(token_loss.dtype)


def check_labels(labels: torch.Tensor) -> None:
    """Every row has a response token to take the loss of; a fully masked row would be a silent zero gradient."""
    empty = (labels[:, 1:] == IGNORE).all(dim=1).nonzero()
    if len(empty):
        raise AdapterError(
            f"row {int(empty[0])} of the batch has no response token (every label is {IGNORE}): "
            f"its loss and gradient would be zero; drop it or give it a response"
        )


def encode(
    tokenizer: Any, samples: Sequence[Sample], *, max_length: int = EngineConfig.max_length, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` for samples: the engine's tokenisation, right-padded."""
    if not samples:
        raise AdapterError("no samples to encode")
    encoded, _ = encode_samples(tokenizer, list(samples), max_length)
    batch = collate(encoded, pad_token_id(tokenizer), device)
    return batch.input_ids, batch.attention_mask, batch.labels


def row_slices(n: int, size: int) -> list[slice]:
    """``[0, n)`` in consecutive slices of at most ``size`` rows."""
    return [slice(start, min(n, start + size)) for start in range(0, n, max(1, size))]


def rows_in_parts(n: int, size: int, part_of: Callable[[slice], torch.Tensor]) -> torch.Tensor | None:
    """``[n, D]`` assembled from ``part_of(rows)`` (one slice's reduced gradients) over slices of at most
    ``size`` rows, so only one slice's gradients exist at a time; one slice covering all rows is returned
    without a copy (None for no rows)."""
    out: torch.Tensor | None = None
    for rows in row_slices(n, size):
        part = part_of(rows)
        if rows.stop - rows.start == n:
            return part
        if out is None:
            out = torch.empty(n, part.shape[1], dtype=part.dtype, device=part.device)
        out[rows] = part
    return out


def take_rows(batch: Sequence[torch.Tensor], rows: slice, mask: int = 1) -> tuple[torch.Tensor, ...]:
    """The same rows of every ``[B, T]`` tensor of a batch, without trailing columns that are padding in all of
    them (``batch[mask]`` is the attention mask): a part of a right-padded batch needs only its own length."""
    part = tuple(t[rows] for t in batch)
    used = part[mask].ne(0).any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else part[mask].shape[1]
    return tuple(t[:, :length] for t in part)


def check_batch(batch: Sequence[torch.Tensor]) -> None:
    """A batch is ``(input_ids, attention_mask, labels)`` of equal ``[B, T]`` shape."""
    if len(batch) != 3:
        raise AdapterError(f"a batch is (input_ids, attention_mask, labels); got {len(batch)} tensors")
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise AdapterError(f"input_ids, attention_mask and labels must share one [batch, length] shape, got {sorted(shapes)}")
    check_labels(batch[2])
