"""Random projections of per-sample gradients: seeded count sketches in parameter layout.

:class:`CountSketch` is a Johnson-Lindenstrauss map of the whole selected gradient: every
parameter of every component gets its own seeded bucket in one shared set of ``dim`` and a
random sign, and a sample's sketch is the signed sum per bucket.  ``E<Pa, Pb> = <a, b>`` and
``Var<Pa, Pb> = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / dim``, never above a dense
Gaussian projection's ``(|a|^2 |b|^2 + <a, b>^2) / dim``.  No projection matrix is formed:
the map is one int32 per parameter, drawn on first use and cached in the transform up to
:attr:`CountSketch.cache_bytes` (beyond it, drawn again at each use: the engine sets it from
its memory budget).  A sketch is additive: the engine feeds it a sample's gradient a
component at a time, and ``__call__`` is the same sums in the same order.

:class:`PerComponentSketch` is the paper's variant, kept to reproduce it: each component is
sketched into a block of its own (the paper used TRAK's dense projector per component, at a
share of the component's size), so a component's dimensions follow its parameter count,
not its share of the gradient.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np
import torch

from selproj_plugin.components import Component
from selproj_plugin.table import PAPER_PROJECTION
from selproj_plugin.transforms import Accumulator, Transform, TransformError, selection_digest

MAX_DIM = 2**30 - 1  # bucket and sign share one int32 code in [0, 2 * dim)


def split_dims(num_params: Sequence[int], dim: int) -> list[int]:
    """Split ``dim`` over components in proportion to ``num_params`` (largest remainder, >= 1 each)."""
    n = len(num_params)
    if dim < n:
        raise ValueError(f"cannot split {dim} dimensions over {n} components (need at least one each)")
    weights = np.asarray(num_params, dtype=np.float64)
    share = (dim - n) * weights / weights.sum()
    dims = np.floor(share).astype(np.int64) + 1
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    dims[order[: dim - int(dims.sum())]] += 1
    return [int(d) for d in dims]


class CountSketch(Transform):
    """Count sketch of the concatenated selected gradients into one shared set of ``dim`` buckets.

    Reproducible from ``seed`` and the component names (each component draws its buckets and
    signs from its own stream), so the engine, TRAK and Captum give the same vectors.
    """

    kind = "count_sketch"
    additive = True

    def __init__(self, components: Sequence[Component], dim: int, seed: int = 0) -> None:
        self.components = tuple(components)
        if not self.components:
            raise TransformError("nothing to project: the selection is empty")
        self.dim, self.seed = int(dim), int(seed)
        if not 1 <= self.dim <= MAX_DIM:
            raise TransformError(f"projection dimension must be between 1 and {MAX_DIM}, got {dim}")
        self.key = f"{self.kind}@{self.dim}:{selection_digest(self.components)}:seed{self.seed}"
        self._codes: dict[str, torch.Tensor] = {}
        self.cache_bytes: float | None = None  # codes kept for reuse, first components first; None: all of them

    def blocks(self) -> list[tuple[int, int]]:
        """(first bucket, number of buckets) of each component: all share the whole output here."""
        return [(0, self.dim)] * len(self.components)

    def codes(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 code per parameter of component ``index``: its bucket, plus ``dim`` where its sign is negative."""
        comp = self.components[index]
        codes = self._codes.get(comp.name)
        if codes is None:
            start, width = self.blocks()[index]
            name = int.from_bytes(hashlib.sha256(comp.name.encode()).digest()[:16], "little")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, name])))
            draw = rng.integers(0, 2 * width, size=comp.num_params, dtype=np.int32)  # bucket, then sign
            if width != self.dim:  # a block: [0, width) -> start + bucket, [width, 2 width) -> dim + start + bucket
                draw += np.int32(start) + np.int32(self.dim - width) * (draw >= width)
            codes = torch.from_numpy(draw)
        if codes.device != torch.device(device):
            codes = codes.to(device)
        if comp.name in self._codes or self.cache_bytes is None or self.cached_bytes + codes.nbytes <= self.cache_bytes:
            self._codes[comp.name] = codes
        return codes

    def clear_codes(self) -> None:
        """Forget the cached codes (drawn again, the same, when next needed)."""
        self._codes.clear()

    @property
    def cached_bytes(self) -> int:
        return sum(c.nbytes for c in self._codes.values())

    draw_per_param = 4  # bytes a draw of codes holds per parameter (int32 codes)

    def draw_bytes(self) -> int:
        """What drawing an uncached component's codes holds: none when every code is cached."""
        codes = 4 * sum(c.num_params for c in self.components)
        if self.cache_bytes is None or self.cache_bytes >= codes:
            return 0
        return self.draw_per_param * max(c.num_params for c in self.components)

    def held_bytes(self, n: int = 1) -> int:
        """The fp32 sums of ``n`` samples (a bucket for each sign), the cached codes (all of them when
        :attr:`cache_bytes` is None) and one component's codes drawn afresh, with their temporaries."""
        codes = 4 * sum(c.num_params for c in self.components)
        cached = codes if self.cache_bytes is None else min(codes, int(self.cache_bytes))
        return n * 2 * 4 * self.dim + cached + self.draw_bytes()

    def begin(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Accumulator:
        return _SketchSums(self, n, dtype, device)

    def __call__(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = self.check(features)
        first = features[self.components[0].name]
        sums = self.begin(n, first.dtype, first.device)
        for comp in self.components:
            sums.add(comp.name, features[comp.name])
        return sums.finish().double()


class _SketchSums(Accumulator):
    """A count sketch's signed bucket sums, fp32 (float64 for float64 blocks); ``finish`` gives them in that dtype."""

    def __init__(self, sketch: CountSketch, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(sketch, n)
        self.sketch = sketch
        self.index = {c.name: i for i, c in enumerate(sketch.components)}
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.acc = torch.zeros(n, 2 * sketch.dim, dtype=dtype, device=device)

    def add(self, name: str, block: torch.Tensor) -> None:
        i = self.index.get(name)
        if i is None:
            raise TransformError(
                f"{type(self.sketch).__name__} does not project {name}: not one of its {len(self.index)} selected components"
            )
        comp = self.sketch.components[i]
        if block.dim() != 2 or tuple(block.shape) != (self.n, comp.num_params):
            raise TransformError(f"features of {name} must be [{self.n}, {comp.num_params}], got {tuple(block.shape)}")
        codes = self.sketch.codes(i, self.acc.device)
        values = block.to(self.acc.dtype)
        for row in range(self.n):  # 1-D index_add_ is a fast serial kernel; the 2-D one is not
            self.acc[row].index_add_(0, codes, values[row])

    def finish(self) -> torch.Tensor:
        dim = self.sketch.dim
        out = self.acc[:, :dim] - self.acc[:, dim:]
        self.acc = self.acc[:0]
        return out


class PerComponentSketch(CountSketch):
    """The paper's variant: component ``i`` is count-sketched into its own block of ``dims[i]`` buckets.

    The blocks are concatenated, so ``dim = sum(dims)``; keyed under the paper's projection
    kind, so it finds the projections stored in the paper's reference tables.
    """

    kind = PAPER_PROJECTION
    draw_per_param = 9  # int32 codes, a bool mask and an int32 offset moving them into the component's block

    def __init__(self, components: Sequence[Component], dims: Sequence[int], seed: int = 0) -> None:
        dims = [int(d) for d in dims]
        if len(dims) != len(components) or min(dims, default=0) < 1:
            raise TransformError(f"need one positive block size per component ({len(components)}), got {dims[:5]}")
        self.dims = dims
        super().__init__(components, sum(dims), seed)

    def blocks(self) -> list[tuple[int, int]]:
        starts = np.concatenate([[0], np.cumsum(self.dims)[:-1]])
        return [(int(s), d) for s, d in zip(starts, self.dims)]
