"""Capture per-sample gradient factors from one batched forward/backward pass.

A linear layer's per-sample weight gradient is ``D^T X`` (output grads x inputs), so
storing the two thin factors is enough to form any dot product or projection later.
Hooks record ``X`` and ``D`` for ``nn.Linear``, transformers' ``Conv1D`` and
``nn.Embedding`` (token ids stand for one-hot rows); every other parameterised module
(norms, ...) gets exact per-sample gradients from ``torch.func`` (vmap of a vjp of that
one module).  Parameters stay frozen during capture, so no weight gradient is ever
computed, and the batch loss is the sum of per-sample mean losses, so each sample's
``D`` is its own gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from selproj_plugin.components import Component
from selproj_plugin.loss import Batch, SampleError, forward_losses, require_trainable
from selproj_plugin.model_state import ModelState
from selproj_plugin.models import model_name

try:  # GPT-2 style transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

FACTOR_DTYPE = torch.float32


class CaptureError(ValueError):
    """A model structure the capture cannot split into per-sample factors."""


@dataclass(frozen=True)
class FactorUse:
    """One use of a component's weight: its gradient contribution is ``L^T R`` (matrix form).

    ``left``/``right`` are tensor keys in :attr:`SampleFactors.tensors` (``right`` None means
    a bias-only use whose right factor is a single ones column).  ``left_at``/``right_at``: the
    factor's position in a stacked tensor ``[layers, rows, width]`` (None: the tensor is the factor).
    ``left_index``: the left factor is token ids standing for one-hot rows.  ``aug``: side
    ('left'/'right') that gets an extra ones column carrying the bias gradient.
    """

    left: str
    right: str | None
    left_index: bool = False
    aug: str | None = None
    left_at: int | None = None
    right_at: int | None = None


@dataclass
class ComponentSpec:
    """How one component's per-sample gradient is obtained and laid out.

    ``kind`` 'factor': matrix form ``[rows, cols]`` = sum over uses of ``L^T R``;
    ``kind`` 'func': a flat vector from torch.func.  ``layout`` converts the matrix form
    to the parameter layout (concatenated flattened tensors in ``param_names`` order).
    """

    component: Component
    kind: str
    rows: int
    cols: int
    layout: str  # 'plain' | 'bias_col' | 'bias_row' | 'bias_only' | 'flat'

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def widths(self) -> tuple[int, int]:
        return self.rows, self.cols


@dataclass
class SampleFactors:
    """Everything needed to form one sample's component gradients, on CPU or device."""

    sample_id: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    uses: dict[str, list[FactorUse]] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # matrix form, flattened

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.vectors.values()))

    def rows(self, key: str) -> int:
        t = self.tensors[key]
        return int(t.shape[-2] if t.dim() > 1 else t.shape[0])

    def factor(self, key: str, at: int | None) -> torch.Tensor:
        """One factor: the tensor under ``key``, or its layer ``at`` when it is a stack."""
        t = self.tensors[key]
        return t if at is None else t[at]

    def to(self, device: str | torch.device) -> "SampleFactors":
        return SampleFactors(
            self.sample_id,
            {k: t.to(device) for k, t in self.tensors.items()},
            self.uses,
            {k: v.to(device) for k, v in self.vectors.items()},
        )

    def compact(self) -> "SampleFactors":
        """These factors in memory of their own.  The capture hands out views of its batch's tensors (no copy for
        a sample used and dropped, or written to disk); one kept past its batch would keep the whole batch alive.
        Views that share a storage only this sample's tensors fill (a stack's materialised layers) stay as they are."""
        tensors = [*self.tensors.values(), *self.vectors.values()]
        held: dict[int, int] = {}
        for t in tensors:
            held[t.untyped_storage().data_ptr()] = held.get(t.untyped_storage().data_ptr(), 0) + t.nbytes

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if t.untyped_storage().nbytes() > held[t.untyped_storage().data_ptr()] else t

        return SampleFactors(
            self.sample_id, {k: own(t) for k, t in self.tensors.items()}, self.uses, {k: own(v) for k, v in self.vectors.items()}
        )


def matrix_form(spec: ComponentSpec, factors: SampleFactors) -> torch.Tensor:
    """The component gradient ``[rows, cols]`` = sum over uses of ``L^T R`` (bias columns included)."""
    return matrix_rows(spec, factors, 0, spec.rows).view(spec.rows, spec.cols)


def matrix_rows(spec: ComponentSpec, factors: SampleFactors, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`matrix_form`, flattened: a big component's gradient a block at a time.

    ``out``: a contiguous buffer of ``(stop - start) * cols`` numbers to write the rows into, so a caller
    filling a block of samples' rows pays no temporary and no copy.
    """
    return stacked_rows([spec], factors, start, stop, None if out is None else out.view(1, -1)).view(-1)


def stacked_rows(
    specs: Sequence[ComponentSpec], factors: SampleFactors, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`matrix_rows` of several components at once, ``[len(specs), (stop - start) * cols]``: components of
    one shape whose factors lie at the same places of the same stacks (:func:`stack_key`), one batched product
    for all of them."""
    spec, n = specs[0], len(specs)
    if out is None:
        device = next(iter(factors.tensors.values())).device if factors.tensors else None
        out = torch.empty(n, (stop - start) * spec.cols, dtype=FACTOR_DTYPE, device=device)
    block = out.view(n, stop - start, spec.cols)
    if spec.name in factors.vectors:
        for s, rows in zip(specs, block):
            rows.copy_(factors.vectors[s.name].view(s.rows, s.cols)[start:stop])
        return out
    uses = [factors.uses[s.name] for s in specs]
    written = False
    # products first, so the first writes the block in place; token ids (a tied embedding's input side) then add
    # their rows to it, and the block is zeroed only when no product wrote it
    for k in sorted(range(len(uses[0])), key=lambda k: uses[0][k].left_index):
        use = uses[0][k]
        if use.left_index:  # token ids stand for one-hot rows (an embedding: one component, no stack)
            if not written:
                block.zero_()
                written = True
            ids = factors.factor(use.left, use.left_at)
            inside = (ids >= start) & (ids < stop)
            right = _pad_cols(factors.factor(use.right, use.right_at), spec.cols, use.aug == "right")
            block[0].index_add_(0, ids[inside] - start, right[inside])
            continue
        left = _pad_cols(layers(factors.tensors[use.left], tuple(u[k].left_at for u in uses)), spec.rows, use.aug == "left")
        if not left.shape[1]:
            continue
        if use.right is not None:
            right = layers(factors.tensors[use.right], tuple(u[k].right_at for u in uses))
        else:
            right = torch.zeros(*left.shape[:2], 0, dtype=left.dtype, device=left.device)
        right = _pad_cols(right, spec.cols, use.aug == "right")
        if written:
            block.baddbmm_(left[:, :, start:stop].transpose(1, 2), right)
        else:  # the first product is written in place: no zeroed buffer to add it to
            torch.bmm(left[:, :, start:stop].transpose(1, 2), right, out=block)
            written = True
    if not written:
        block.zero_()
    return out


def stack_key(spec: ComponentSpec, factors: SampleFactors) -> tuple:
    """What components share when :func:`stacked_rows` and the pair dots take them together: shape, factors' stacks
    and kinds, any layer (a materialised or torch.func component, an embedding: its name, alone)."""
    uses = factors.uses.get(spec.name)
    if spec.name in factors.vectors or not uses or any(u.left_index or u.left_at is None for u in uses):
        return (spec.name,)
    return (spec.rows, spec.cols) + tuple((u.left, u.right, u.aug) for u in uses)


def layers(t: torch.Tensor, ats: tuple[int | None, ...]) -> torch.Tensor:
    """A stack's layers ``ats`` (``[len(ats), rows, width]``; a tensor that is not a stack: ``[1, ...]``)."""
    if ats[0] is None:
        return t.unsqueeze(0)
    if ats == tuple(range(ats[0], ats[0] + len(ats))):
        return t if len(ats) == t.shape[0] else t[ats[0] : ats[0] + len(ats)]
    return t[torch.tensor(ats, device=t.device)]


def factor_keys(spec: ComponentSpec, factors: SampleFactors) -> set[str]:
    """The tensor and vector keys ``spec``'s gradient is formed from."""
    if spec.name in factors.vectors or spec.kind == "func":
        return {spec.name}
    return {k for use in factors.uses.get(spec.name, ()) for k in (use.left, use.right) if k is not None}


def _pad_cols(t: torch.Tensor, width: int, ones_last: bool) -> torch.Tensor:
    """``t`` widened to ``width`` columns with zeros, the last one ones when it carries a bias."""
    if t.shape[-1] == width:
        return t
    pad = torch.zeros(*t.shape[:-1], width - t.shape[-1], dtype=t.dtype, device=t.device)
    if ones_last:
        pad[..., -1] = 1.0
    return torch.cat([t, pad], dim=-1)


def to_param_layout(spec: ComponentSpec, matrix: torch.Tensor) -> torch.Tensor:
    """Flatten a matrix-form gradient into parameter order (weight then bias), as ``p.grad`` would be."""
    if spec.layout == "bias_col":  # Linear: [out, in + 1]
        return torch.cat([matrix[:, :-1].reshape(-1), matrix[:, -1]])
    if spec.layout == "bias_row":  # Conv1D: [in + 1, out]
        return torch.cat([matrix[:-1].reshape(-1), matrix[-1]])
    return matrix.reshape(-1)


# ---- hooks ------------------------------------------------------------------------
@dataclass
class _Handler:
    """One module whose own parameters belong to selected components."""

    name: str
    module: nn.Module
    kind: str  # 'linear' | 'conv1d' | 'embedding' | 'func'
    params: dict[str, Component]  # local param name -> component
    layout: str = "tokens"  # of its input and output: 'tokens' ([B, T, ...]) or 'targets' (the LM head's [N, ...])
    calls: list[dict[str, Any]] = field(default_factory=list)


class _Geometry:
    """Batch shape, to split captured tensors into per-sample row blocks by their known layout."""

    def __init__(self, batch: Batch) -> None:
        self.batch_size, self.width = batch.input_ids.shape
        self.lengths = batch.lengths
        counts = batch.target_mask.sum(dim=1).tolist()
        self.n_targets = sum(counts)
        self.target_slices = []
        start = 0
        for c in counts:
            self.target_slices.append(slice(start, start + c))
            start += c

    def split(self, t: torch.Tensor, layout: str, where: str) -> list[torch.Tensor]:
        """Per-sample rows of a 'tokens' tensor ([B, T, ...] or [B*T, ...]) or a 'targets' one ([N, ...]).

        The layout comes from the module, not from the shape: shapes alone are ambiguous
        when dimensions coincide (N = B with features = T).
        """
        b, w = self.batch_size, self.width
        if layout == "targets" and t.dim() >= 1 and t.shape[0] == self.n_targets:
            return [t[s].reshape(s.stop - s.start, -1) if t.dim() > 1 else t[s] for s in self.target_slices]
        if layout == "tokens" and t.dim() >= 2 and tuple(t.shape[:2]) == (b, w):
            return [t[i, : self.lengths[i]].reshape(self.lengths[i], -1) if t.dim() > 2 else t[i, : self.lengths[i]] for i in range(b)]
        if layout == "tokens" and t.dim() >= 1 and t.shape[0] == b * w:
            return self.split(t.reshape(b, w, *t.shape[1:]), layout, where)
        raise CaptureError(f"{where}: cannot split a tensor of shape {tuple(t.shape)} into the batch's samples")


class GradientCapture:
    """Per-sample gradient factors of selected components for batches of encoded samples."""

    def __init__(self, model: nn.Module, components: Sequence[Component]) -> None:
        require_trainable(model)
        self.model = model
        self.components = list(components)
        wanted = {p: c for c in self.components for p in c.param_names}
        named = dict(model.named_parameters(remove_duplicate=True))
        by_id = {id(named[p]): c for p, c in wanted.items()}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.handlers: list[_Handler] = []
        # each module once, even when registered under two names: a second hook would count its gradient twice
        for mod_name, module in model.named_modules():
            own = {n: by_id[id(p)] for n, p in module._parameters.items() if p is not None and id(p) in by_id}
            if own:
                # forward_losses hands the LM head only the trained positions (loss.logits_at)
                layout = "targets" if module is head else "tokens"
                self.handlers.append(_Handler(mod_name, module, _module_kind(module, own), own, layout))
        self.specs: dict[str, ComponentSpec] = {c.name: self._spec(c) for c in self.components}

    def _spec(self, comp: Component) -> ComponentSpec:
        hs = [(h, n) for h in self.handlers for n, c in h.params.items() if c is comp]
        kinds = {h.kind for h, _ in hs}
        if kinds == {"func"} or not kinds <= {"linear", "conv1d", "embedding"}:
            for h, _ in hs:
                h.kind = "func"
            return ComponentSpec(comp, "func", 1, comp.num_params, "flat")
        h0, _ = next((h, n) for h, n in hs if n == "weight") if any(n == "weight" for _, n in hs) else hs[0]
        has_w = any(n == "weight" for _, n in hs)
        has_b = any(n == "bias" for _, n in hs)
        w = h0.module.weight
        if not has_w:  # bias only
            return ComponentSpec(comp, "factor", h0.module.bias.shape[0], 1, "bias_only")
        rows, cols = w.shape
        if has_b and h0.kind == "linear":
            return ComponentSpec(comp, "factor", rows, cols + 1, "bias_col")
        if has_b and h0.kind == "conv1d":
            return ComponentSpec(comp, "factor", rows + 1, cols, "bias_row")
        return ComponentSpec(comp, "factor", rows, cols, "plain")

    # ---- one batch ----------------------------------------------------------------
    def run(self, batch: Batch) -> tuple[list[SampleFactors], torch.Tensor]:
        """Forward/backward one batch; returns per-sample factors and per-sample losses.  The factors are
        views of the batch's tensors where no conversion copies them (:meth:`SampleFactors.compact` to keep one)."""
        geometry = _Geometry(batch)
        for h in self.handlers:
            h.calls = []
        with self._frozen(), self._hooks(geometry), _sdpa(self.model):
            losses = forward_losses(self.model, batch)
            losses.sum().backward()
        try:
            with torch.no_grad():
                out = self._assemble(geometry, batch)
            for f in out:  # a component the loss never reached has a zero gradient
                for spec in self.specs.values():
                    if spec.kind == "factor":
                        f.uses.setdefault(spec.name, [])
                    elif spec.name not in f.vectors:
                        f.vectors[spec.name] = torch.zeros(spec.cols, dtype=FACTOR_DTYPE)
        finally:
            for h in self.handlers:
                h.calls = []
        return out, losses.detach()

    def materialise(self, f: SampleFactors, names: Sequence[str]) -> SampleFactors:
        """``f`` with the factor components ``names`` held as whole gradients and the factors only they used
        dropped. One sample at a time: a batch of short samples materialised together held several whole
        gradients at once (8 x 538 MB on SmolLM2-135M)."""
        groups: dict[tuple, list[ComponentSpec]] = {}
        for name in names:
            spec = self.specs[name]
            if spec.kind == "factor" and name in f.uses:
                groups.setdefault(stack_key(spec, f), []).append(spec)
        for specs in groups.values():  # a stack's layers in one batched product, each a view of the result
            for spec, rows in zip(specs, stacked_rows(specs, f, 0, specs[0].rows)):
                f.vectors[spec.name] = rows
                del f.uses[spec.name]
        f.tensors, f.uses = _prune(f.tensors, f.uses)
        return f

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        state = ModelState.of(self.model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            state.restore(self.model)

    @contextlib.contextmanager
    def _hooks(self, geometry: _Geometry) -> Iterator[None]:
        handles = []
        for h in self.handlers:
            handles.append(h.module.register_forward_hook(self._make_hook(h, geometry), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_hook(self, h: _Handler, geometry: _Geometry):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            x = args[0] if args else next(iter(kwargs.values()))
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                raise CaptureError(f"module {h.name}: output is not a tensor, cannot capture its gradient")
            if h.kind == "embedding" and x.dim() == 2 and x.shape[0] == 1 and geometry.batch_size > 1:
                x = x.expand(geometry.batch_size, -1)  # broadcast position ids (GPT-2 wpe)
                out = out.expand(geometry.batch_size, *out.shape[1:])
            new_out = out if out.requires_grad else out.detach().clone().requires_grad_(True)
            call: dict[str, Any] = {"x": x, "grad": None}  # detached when stacked, under no_grad
            if h.kind == "func":
                call["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
                call["kwargs"] = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            h.calls.append(call)

            def grab(grad: torch.Tensor) -> None:
                call["grad"] = grad

            new_out.register_hook(grab)
            if new_out is out and out is (output[0] if isinstance(output, (tuple, list)) else output):
                return None
            if isinstance(output, tuple):
                return (new_out,) + tuple(output[1:])
            if isinstance(output, list):
                return [new_out] + list(output[1:])
            return new_out

        return hook

    # ---- assembly ----------------------------------------------------------------
    def _assemble(self, geometry: _Geometry, batch: Batch) -> list[SampleFactors]:
        """The batch's factors: every matrix factor stacked with its like across layers (one tensor for the 30
        layers' q inputs), each sample a view of its rows of each stack; embeddings and torch.func modules per sample.

        Stacks make later work a handful of batched operations, however many layers; an input shared by several
        modules (q/k/v, gate/up) is one factor of the stack of its users' kinds."""
        out = [SampleFactors(sid) for sid in batch.sample_ids]
        shared: dict[str, list[FactorUse]] = {s.name: [] for s in self.specs.values() if s.kind == "factor"}
        own: list[dict[str, list[FactorUse]]] = [{} for _ in out]  # per-sample uses (embeddings)
        stacks = _Stacks(geometry)
        matrix_calls = []
        for h in self.handlers:
            for call_no, call in enumerate(h.calls):
                if call["grad"] is None:
                    continue  # output did not reach the loss: zero gradient contribution
                if h.kind in ("func", "embedding"):
                    _check_finite(call["grad"], geometry, batch, h)
                    if h.kind == "func":
                        self._collect_func(h, call, geometry, out)
                    else:
                        self._collect_embedding(h, call_no, call, geometry, out, own)
                else:
                    matrix_calls.append((h, call))
        users: dict[tuple, set[str]] = {}
        for h, call in matrix_calls:
            users.setdefault(_ident(call["x"]), set()).update(c.kind for c in h.params.values())
        for h, call in matrix_calls:
            kinds = "+".join(sorted({c.kind for c in h.params.values()}))
            xkey, xat = stacks.add(call["x"], h, "in", "+".join(sorted(users[_ident(call["x"])])))
            dkey, dat = stacks.add(call["grad"], h, "out", kinds)
            names_of: dict[str, set[str]] = {}
            for n, c in h.params.items():
                names_of.setdefault(c.name, set()).add(n)
            for comp, names in names_of.items():
                shared[comp].append(_matrix_use(h.kind, names, xkey, xat, dkey, dat))
        for _, call in matrix_calls:  # the stacks hold them now: each stack's parts go once it is built
            call["x"] = call["grad"] = None
        del matrix_calls
        tensors = stacks.per_sample(batch, out)
        for f, mine, rows in zip(out, own, tensors):
            f.tensors.update(rows)
            for comp, uses in shared.items():
                f.uses[comp] = uses + mine.get(comp, [])
        return out

    def _collect_embedding(
        self,
        h: _Handler,
        call_no: int,
        call: dict[str, Any],
        geometry: _Geometry,
        out: list[SampleFactors],
        own: list[dict[str, list[FactorUse]]],
    ) -> None:
        pad = getattr(h.module, "padding_idx", None)
        if getattr(h.module, "scale_grad_by_freq", False):
            raise CaptureError(f"module {h.name}: embeddings with scale_grad_by_freq are not supported")
        tag = f"{h.name}#{call_no}"
        xs = geometry.split(call["x"], h.layout, h.name)
        ds = geometry.split(call["grad"], h.layout, h.name)
        for f, mine, x, d in zip(out, own, xs, ds):
            if pad is not None:
                keep = x != pad  # PyTorch never updates the padding row
                x, d = x[keep], d[keep]
            f.tensors[f"{tag}:ids"] = x.to(torch.long).contiguous()
            f.tensors[f"{tag}:out"] = _rows(d)
            for comp in set(h.params.values()):
                mine.setdefault(comp.name, []).append(FactorUse(f"{tag}:ids", f"{tag}:out", left_index=True))

    def _collect_func(self, h: _Handler, call: dict[str, Any], geometry: _Geometry, out: list[SampleFactors]) -> None:
        x, grad = call["x"], call["grad"]
        b, w = geometry.batch_size, geometry.width
        if not (x.dim() >= 2 and tuple(x.shape[:2]) == (b, w) and tuple(grad.shape[:2]) == (b, w)):
            raise CaptureError(f"module {h.name}: per-sample gradients need [batch, tokens, ...] input and output")
        mask = torch.zeros(b, w, dtype=grad.dtype, device=grad.device)
        for i, n in enumerate(geometry.lengths):
            mask[i, :n] = 1
        grad = grad * mask.view(b, w, *([1] * (grad.dim() - 2)))
        module, args, kwargs = h.module, call["args"], call["kwargs"]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in h.params}

        def one(xi: torch.Tensor, gi: torch.Tensor) -> dict[str, torch.Tensor]:
            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                o = torch.func.functional_call(module, p, (xi.unsqueeze(0),) + args, kwargs)
                return o[0] if isinstance(o, (tuple, list)) else o

            _, pull = torch.func.vjp(f, params)
            return pull(gi.unsqueeze(0))[0]

        grads = torch.func.vmap(one)(x, grad)
        for comp in set(h.params.values()):
            names = [n for n, c in h.params.items() if c is comp]
            flat = torch.cat([grads[n].reshape(b, -1) for n in names], dim=1).to(FACTOR_DTYPE)
            for i, f in enumerate(out):
                prev = f.vectors.get(comp.name)
                f.vectors[comp.name] = flat[i] if prev is None else prev + flat[i]


def _ident(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def _matrix_use(kind: str, names: set[str], xkey: str, xat: int, dkey: str, dat: int) -> FactorUse:
    """A linear (grad W = D^T X) or Conv1D (grad W = X^T D, bias an extra row) module's use of its factors."""
    has_w, has_b = "weight" in names, "bias" in names
    if not has_w:
        return FactorUse(dkey, None, aug="right", left_at=dat)
    if kind == "linear":
        return FactorUse(dkey, xkey, aug="right" if has_b else None, left_at=dat, right_at=xat)
    return FactorUse(xkey, dkey, aug="left" if has_b else None, left_at=xat, right_at=dat)


class _Stacks:
    """A batch's matrix factors by kind: tensors of one layout, role, width and users' kinds stacked across layers."""

    def __init__(self, geometry: _Geometry) -> None:
        self.geometry = geometry
        self.parts: dict[str, list[tuple[torch.Tensor, _Handler]]] = {}
        self.at: dict[tuple, tuple[str, int]] = {}

    def add(self, t: torch.Tensor, h: _Handler, role: str, kinds: str) -> tuple[str, int]:
        """Key and position of ``t`` in its stack (a tensor added twice, a shared input, is stacked once)."""
        ident = (role, _ident(t))
        if ident not in self.at:
            t = self._shaped(t, h)
            key = f"{h.layout}:{role}:{kinds}:{t.shape[-1]}"
            parts = self.parts.setdefault(key, [])
            self.at[ident] = key, len(parts)
            parts.append((t, h))
        return self.at[ident]

    def _shaped(self, t: torch.Tensor, h: _Handler) -> torch.Tensor:
        g = self.geometry
        b, w = g.batch_size, g.width
        if h.layout == "targets" and t.dim() == 2 and t.shape[0] == g.n_targets:
            return t
        if h.layout == "tokens" and t.dim() == 3 and tuple(t.shape[:2]) == (b, w):
            return t
        if h.layout == "tokens" and t.dim() == 2 and t.shape[0] == b * w:
            return t.view(b, w, -1)
        raise CaptureError(f"{h.name}: cannot split a tensor of shape {tuple(t.shape)} into the batch's samples")

    def per_sample(self, batch: Batch, out: list[SampleFactors]) -> list[dict[str, torch.Tensor]]:
        """Each sample's rows of every stack: views, ``[layers, rows, width]``; a stack's parts are let go once
        it is built, so the batch's activations and the stacks are not all held at once."""
        g = self.geometry
        rows: list[dict[str, torch.Tensor]] = [{} for _ in out]
        counts = batch.target_mask.sum(dim=1).tolist()
        for key, parts in self.parts.items():
            stack = torch.stack([t for t, _ in parts])
            if stack.dtype != FACTOR_DTYPE:
                stack = stack.to(FACTOR_DTYPE)
            if ":out:" in key and not bool(torch.isfinite(stack.sum())):
                for t, h in parts:  # find the sample and module to name
                    _check_finite(t, g, batch, h)
            handlers = parts[0][1]
            parts.clear()
            if handlers.layout == "targets":
                for r, piece in zip(rows, stack.split(counts, dim=1)):
                    r[key] = piece
            else:
                for r, n, piece in zip(rows, g.lengths, stack.unbind(1)):
                    r[key] = piece if n == g.width else piece[:, :n]
        self.at.clear()
        return rows


def _prune(
    tensors: dict[str, torch.Tensor], uses: dict[str, list[FactorUse]]
) -> tuple[dict[str, torch.Tensor], dict[str, list[FactorUse]]]:
    """Only the factors ``uses`` still read: a stack keeps the layers some use reads (renumbered)."""
    live: dict[str, set[int | None]] = {}
    for us in uses.values():
        for u in us:
            live.setdefault(u.left, set()).add(u.left_at)
            if u.right is not None:
                live.setdefault(u.right, set()).add(u.right_at)
    kept, moved = {}, {}
    for k, t in tensors.items():
        if k not in live:
            continue
        ats = live[k]
        if None in ats or len(ats) == t.shape[0]:
            kept[k] = t
            continue
        order = sorted(ats)
        kept[k] = t[torch.tensor(order, device=t.device)]
        moved[k] = {a: n for n, a in enumerate(order)}

    def renumbered(u: FactorUse) -> FactorUse:
        return dataclasses.replace(
            u,
            left_at=moved[u.left][u.left_at] if u.left in moved else u.left_at,
            right_at=moved[u.right][u.right_at] if u.right in moved else u.right_at,
        )

    return kept, ({c: [renumbered(u) for u in us] for c, us in uses.items()} if moved else uses)


@contextlib.contextmanager
def _sdpa(model: nn.Module) -> Iterator[None]:
    """sdpa attention for the capture's forward/backward where the model supports it: eager keeps every
    layer's [heads, T, T] attention weights for backward (several GB a batch); the hooks do not need them."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = current == "eager" and getattr(model, "_supports_sdpa", False) and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A sample's rows in float32, contiguous: a view of the batch's tensor where it already is (copying every
    sample's ~190 MB of SmolLM2 factors took 1.9 of a 32-sample full set's 35 s of capture)."""
    return t.to(FACTOR_DTYPE).contiguous()


def _module_kind(module: nn.Module, own: dict[str, Component]) -> str:
    if set(own) <= {"weight", "bias"}:
        if isinstance(module, nn.Linear):
            return "linear"
        if Conv1D and isinstance(module, Conv1D):
            return "conv1d"
        if isinstance(module, nn.Embedding) and set(own) == {"weight"}:
            return "embedding"
    return "func"


def _check_finite(grad: torch.Tensor, geometry: _Geometry, batch: Batch, h: _Handler) -> None:
    if bool(torch.isfinite(grad.sum())):  # one reduction; NaN/inf anywhere makes the sum non-finite
        return
    for i, rows in enumerate(geometry.split(grad, h.layout, h.name)):
        if not bool(torch.isfinite(rows).all()):
            raise SampleError(f"sample {batch.sample_ids[i]}: gradient is NaN or inf (at {h.name})")
    if not bool(torch.isfinite(grad).all()):
        raise SampleError(f"batch {batch.sample_ids}: gradient is NaN or inf (at {h.name})")


def describe(model: nn.Module) -> str:
    """Model name used in capture errors."""
    return model_name(model)
