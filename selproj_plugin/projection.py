"""Random projection of per-sample gradients that preserves dot products in expectation.

Each component's gradient is a matrix ``M`` (``[rows, cols]``, usually a sum of thin
products ``L^T R``).  It is count-sketched with a *tensor sketch*: entry ``(r, c)`` goes
to bucket ``(h1[r] + h2[c]) mod d`` with sign ``s1[r] s2[c]``, so ``E<Pa, Pb> = <a, b>``
with no scaling and the sketch of ``L^T R`` is a circular convolution of the count
sketches of ``L`` and ``R`` rows (one FFT per row) -- no dense ``dim x 10^8`` matrix and
no materialised gradient.  Dimensions are split across components in proportion to
parameter count.  On CUDA with TRAK's ``fast_jl`` installed, :class:`TrakCudaJL` gives
TRAK's dense Rademacher projection instead.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch


DENSE_HASH_LIMIT = 4_000_000  # widths x buckets up to this use a cached dense hash matrix ...
DENSE_HASH_MAX_BUCKETS = 256  # ... when buckets are few: the matmul costs rows x width x buckets, a scatter rows x width


def split_dims(num_params: Sequence[int], dim: int) -> list[int]:
    """Split ``dim`` over components in proportion to ``num_params`` (largest remainder, >= 1 each).

    Requires ``dim >= len(num_params)``; callers share buckets instead when it is smaller.
    """
    n = len(num_params)
    if dim < n:
        raise ValueError(f"cannot split {dim} dimensions over {n} components (need at least one each)")
    weights = np.asarray(num_params, dtype=np.float64)
    share = (dim - n) * weights / weights.sum()
    dims = np.floor(share).astype(np.int64) + 1
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    dims[order[: dim - int(dims.sum())]] += 1
    return [int(d) for d in dims]


@dataclass
class _Hashes:
    offset: int
    dim: int
    h1: torch.Tensor
    s1: torch.Tensor
    h2: torch.Tensor
    s2: torch.Tensor


class TensorSketch:
    """Seeded, reproducible count sketch of component gradients into ``dim`` dimensions.

    ``shapes``: matrix-form ``(rows, cols)`` of each component, keyed by name.  With
    ``dim >= len(shapes)`` components get disjoint blocks (sizes by parameter count);
    otherwise all components share the ``dim`` buckets (a count sketch of the whole vector).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], dim: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.dim, self.seed, self.device = dim, seed, torch.device(device)
        names = list(shapes)
        sizes = [shapes[n][0] * shapes[n][1] for n in names]
        dims = split_dims(sizes, dim) if dim >= len(names) else [dim] * len(names)
        offsets = np.concatenate([[0], np.cumsum(dims)[:-1]]) if dim >= len(names) else [0] * len(names)
        self.hashes: dict[str, _Hashes] = {}
        self._dense_cache: dict[tuple[int, int], torch.Tensor] = {}
        for name, (rows, cols), d, off in zip(names, shapes.values(), dims, offsets):
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            h1 = torch.randint(0, d, (rows,), generator=gen)
            s1 = torch.randint(0, 2, (rows,), generator=gen) * 2 - 1
            h2 = torch.randint(0, d, (cols,), generator=gen)
            s2 = torch.randint(0, 2, (cols,), generator=gen) * 2 - 1
            self.hashes[name] = _Hashes(int(off), int(d), h1.to(self.device), s1.double().to(self.device),
                                        h2.to(self.device), s2.double().to(self.device))

    def block(self, name: str) -> slice:
        """Where component ``name`` lands in the output vector."""
        h = self.hashes[name]
        return slice(h.offset, h.offset + h.dim)

    def _rows(self, t: torch.Tensor | None, index: bool, h: torch.Tensor, s: torch.Tensor, d: int,
              n: int, ones_last: bool) -> torch.Tensor:
        """Count sketch of each row of ``t`` ([n, width] dense or [n] ids) -> [n, d] float64."""
        out = torch.zeros(n, d, dtype=torch.float64, device=self.device)
        if t is not None and n:
            t = t.to(self.device)
            if index:
                out[torch.arange(n, device=self.device), h[t]] = s[t]
            elif d <= DENSE_HASH_MAX_BUCKETS and t.shape[1] * d <= DENSE_HASH_LIMIT:  # one matmul, dense signed hash
                out += t.float() @ self._dense(h, s, d, t.shape[1])
            else:  # wide: scatter columns into buckets
                width = t.shape[1]
                out += torch.zeros(d, n, dtype=torch.float32, device=self.device).index_add_(
                    0, h[:width], (t.float() * s[:width].float()).T.contiguous()).T
        if ones_last:
            out[:, h[-1]] += s[-1]
        return out

    def _dense(self, h: torch.Tensor, s: torch.Tensor, d: int, width: int) -> torch.Tensor:
        key = (h.data_ptr(), width)
        if key not in self._dense_cache:
            m = torch.zeros(width, d, dtype=torch.float32, device=self.device)
            m[torch.arange(width, device=self.device), h[:width]] = s[:width].float()
            self._dense_cache[key] = m
        return self._dense_cache[key]

    def sketch_factors(self, name: str, uses: Sequence[tuple[torch.Tensor, bool, torch.Tensor | None, str | None]]
                       ) -> torch.Tensor:
        """Sketch of ``sum_u L_u^T R_u`` for uses ``(L, L_is_ids, R or None, aug side)`` -> [block dim]."""
        h = self.hashes[name]
        freq = None
        for left, left_index, right, aug in uses:
            n = left.shape[0]
            if n == 0:
                continue
            cl = self._rows(left, left_index, h.h1, h.s1, h.dim, n, aug == "left")
            cr = self._rows(right, False, h.h2, h.s2, h.dim, n, aug == "right")
            part = (torch.fft.rfft(cl, dim=1) * torch.fft.rfft(cr, dim=1)).sum(dim=0)
            freq = part if freq is None else freq + part
        if freq is None:
            return torch.zeros(h.dim, dtype=torch.float64, device=self.device)
        return torch.fft.irfft(freq, n=h.dim)

    def sketch_matrix(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """Sketch of a dense matrix-form gradient (reference and materialised components) -> [block dim]."""
        h = self.hashes[name]
        matrix = matrix.to(self.device).double()
        idx = (h.h1[:, None] + h.h2[None, :]) % h.dim
        return torch.zeros(h.dim, dtype=torch.float64, device=self.device).index_add_(
            0, idx.reshape(-1), (matrix * h.s1[:, None] * h.s2[None, :]).reshape(-1))


def trak_cuda_available(device: str | torch.device) -> bool:
    """Whether TRAK's CUDA projector can run: a CUDA device and ``fast_jl`` importable."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() \
        and importlib.util.find_spec("fast_jl") is not None


class TrakCudaJL:
    """TRAK's ``CudaProjector`` (dense Rademacher JL), scaled so ``E<Pa, Pb> = <a, b>``."""

    def __init__(self, grad_dim: int, dim: int, seed: int, device: str | torch.device) -> None:
        from trak.projectors import CudaProjector, ProjectionType

        self.dim = dim
        self.projector = CudaProjector(grad_dim, dim, seed, ProjectionType.rademacher, device, max_batch_size=8)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project ``[B, grad_dim]`` -> ``[B, dim]``."""
        return self.projector.project(grads.float().contiguous(), model_id=0).double() / math.sqrt(self.dim)


def project_features(features: Mapping[str, Any], dim: int, seed: int = 0) -> torch.Tensor:
    """Count-sketch materialised per-sample gradients ``{component: [N, d_c]}`` to ``[N, dim]`` float64.

    Each component is treated as a flat vector (a ``[1, d_c]`` matrix for :class:`TensorSketch`),
    so ``E<Pa, Pb> = <a, b>`` over the concatenated gradients; seeded and reproducible.
    """
    mats = {name: torch.as_tensor(v) for name, v in features.items()}
    if not mats:
        raise ValueError("no features to project")
    n = {m.shape[0] for m in mats.values()}
    if len(n) != 1:
        raise ValueError(f"features disagree on the number of samples: {sorted(n)}")
    sketch = TensorSketch({k: (1, int(m[0].numel())) for k, m in mats.items()}, dim, seed)
    out = torch.zeros(n.pop(), dim, dtype=torch.float64)
    for name, m in mats.items():
        h = sketch.hashes[name]
        buckets = (h.h1[0] + h.h2) % h.dim
        signs = h.s1[0] * h.s2
        part = torch.zeros(h.dim, m.shape[0], dtype=torch.float64).index_add_(
            0, buckets, (m.reshape(m.shape[0], -1).double() * signs).T.contiguous())
        out[:, sketch.block(name)] += part.T
    return out
