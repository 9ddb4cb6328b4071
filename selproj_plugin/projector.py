"""Random projections inside a table: transforms applied to each sample's gradient a component at a time, inside
the engine's memory budget, and the cosines of two samples' outputs.

:class:`Projector` forms one component's gradient at a time
from the sample's factors and feeds it to every transform that selects it: an additive
transform (a count sketch) adds it to its sums at once; any other gathers its own components,
which is what its :meth:`~selproj_plugin.transforms.Transform.held_bytes` says.  The outputs
go to a :class:`ProjectionStore` on disk, read back a pair at a time, so the process never
holds every sample's projection.  :func:`share_codes` sizes the sketches' code caches from what
the budget leaves.  The engine's plan counts :meth:`Projector.held_bytes`.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from selproj_plugin.capture import ComponentSpec, SampleFactors, matrix_form, to_param_layout
from selproj_plugin.factor_store import FactorStore
from selproj_plugin.transforms import Transform

# the codes cache's share of what the budget leaves for kept factors: a code drawn again costs about what adding
# its parameter does, a factor spilled costs a disk write and a read per partner
CODES_SHARE = 0.5


def _codes_bytes(t: Transform) -> int:
    return 4 * sum(c.num_params for c in t.components) if hasattr(t, "cache_bytes") else 0


def share_codes(transforms: Sequence[Transform], room: float) -> int:
    """Give the transforms' code caches (count sketches) at most ``CODES_SHARE`` of ``room`` bytes, in order;
    the bytes given."""
    left = max(0.0, CODES_SHARE * room)
    given = 0
    for t in transforms:
        want = _codes_bytes(t)
        if not want:
            continue
        t.cache_bytes = int(min(want, left))
        left -= t.cache_bytes
        given += t.cache_bytes
    return given


class Projector:
    """Each transform's output for one sample, its gradient formed a component at a time from its factors."""

    def __init__(self, specs: Sequence[ComponentSpec], transforms: Sequence[Transform]) -> None:
        by_name = {s.name: s for s in specs}
        for t in transforms:
            for c in t.components:
                if c.name not in by_name or by_name[c.name].component.num_params != c.num_params:
                    raise ValueError(
                        f"transform {t.key} projects {c.name} ({c.num_params} parameters), which is not a component of this table"
                    )
        wanted = {c.name for t in transforms for c in t.components}
        self.specs = [s for s in specs if s.name in wanted]
        self.transforms = list(transforms)
        self.keys = [t.key for t in transforms]
        self._users = {s.name: [k for k, t in enumerate(transforms) if s.name in {c.name for c in t.components}] for s in self.specs}
        self.form_s = 0.0  # seconds forming components' gradients from factors
        self.transform_s = [0.0] * len(self.transforms)  # seconds in each transform

    def share_codes(self, room: float) -> int:
        """Give the transforms' code caches their share of ``room`` bytes (:func:`share_codes`); the bytes given."""
        return share_codes(self.transforms, room)

    def held_bytes(self) -> int:
        """What projecting one sample holds besides its factors: one component's gradient (matrix form and
        parameter layout), every transform's working memory, its fp32 output and a float64 copy (a norm, or a
        pair's dot from two outputs read back)."""
        # a component with a bias column or row is copied into parameter layout; others are a view of it
        copied = ("bias_col", "bias_row")
        largest = max((4 * s.rows * s.cols * (2 if s.layout in copied else 1) for s in self.specs), default=0)
        draws = [getattr(t, "draw_bytes", lambda: 0)() for t in self.transforms]  # one code draw at a time
        return largest + sum(t.held_bytes(1) - d + 20 * t.dim for t, d in zip(self.transforms, draws)) + max(draws)

    def release(self) -> None:
        """Drop the transforms' cached codes: the samples are projected (a later use draws them again)."""
        for t in self.transforms:
            if hasattr(t, "clear_codes"):
                t.clear_codes()

    def __call__(self, f: SampleFactors) -> list[torch.Tensor]:
        """``[dim]`` per transform: fp32 for a count sketch (its sums' own precision), else the transform's dtype."""
        sums = [t.begin(1) for t in self.transforms]
        clock = time.perf_counter()
        for s in self.specs:
            grad = to_param_layout(s, matrix_form(s, f))[None]
            now = time.perf_counter()
            self.form_s += now - clock
            for k in self._users[s.name]:
                sums[k].add(s.name, grad)
                clock, now = now, time.perf_counter()
                self.transform_s[k] += now - clock
            del grad
            clock = time.perf_counter()
        out = []
        for k, acc in enumerate(sums):
            clock = time.perf_counter()
            out.append(acc.finish()[0].cpu())
            self.transform_s[k] += time.perf_counter() - clock
        return out


class ProjectionStore:
    """Projections by sample, on disk (one file each), read back a sample at a time: memory holds one pair."""

    def __init__(self, keys: Sequence[str], spill_dir: str | None = None) -> None:
        self.keys = list(keys)
        self._store = FactorStore(0, spill_dir)
        self._norms: dict[Any, np.ndarray] = {}
        self.written = 0

    def put(self, sample: Any, outputs: Sequence[torch.Tensor]) -> None:
        vectors = {k: o.contiguous() for k, o in zip(self.keys, outputs)}
        self._norms[sample] = np.array([float(o.double().norm()) for o in outputs])
        self._store.put(sample, SampleFactors(str(sample), {}, {}, vectors), spill=True)
        self.written += sum(o.nbytes for o in outputs)

    def __contains__(self, sample: Any) -> bool:
        return sample in self._norms

    def get(self, sample: Any) -> list[torch.Tensor]:
        got = self._store.get(sample)
        return [got.vectors[k] for k in self.keys]

    def norms(self, sample: Any) -> np.ndarray:
        """Each transform's output norm for ``sample`` (float64, taken when it was stored)."""
        return self._norms[sample]

    def dots(self, a: Any, b: Any, got_a: list[torch.Tensor] | None = None) -> np.ndarray:
        """Each transform's dot product of samples ``a`` and ``b`` in float64 (``got_a``: ``a``'s, already read)."""
        pa = self.get(a) if got_a is None else got_a
        pb = pa if b == a else self.get(b)
        return np.array([float(x.double() @ y.double()) for x, y in zip(pa, pb)])

    def cosines(self, a: Any, b: Any, got_a: list[torch.Tensor] | None = None) -> np.ndarray:
        """Each transform's cosine of samples ``a`` and ``b`` (``got_a``: ``a``'s projections, already read)."""
        out = []
        for dot, na, nb in zip(self.dots(a, b, got_a), self._norms[a], self._norms[b]):
            denom = float(na * nb)
            out.append(float(dot) / denom if denom > 0 else 0.0)
        return np.array(out)

    def close(self) -> None:
        self._store.close()
