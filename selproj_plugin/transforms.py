"""Per-sample transforms: the second step of the reducer contract.

A reducer first *selects* components of a model's catalogue, then *transforms* each
sample's selected gradients ``{component name: [N, d_c]}`` (parameter layout, in selection
order) into one ``[N, dim]`` vector.  A :class:`Transform` is built once per model (seeded
state such as a projection's hashes lives in it) and applied to every batch.

A transform whose output is a sum of one term per component (``additive``, like a count
sketch) takes a sample's gradient a component at a time (:meth:`Transform.begin`, then
``add`` each component, then ``finish``), so the engine never holds a whole gradient for it;
any other transform gets its components gathered and then ``__call__``.  :meth:`Transform.held_bytes`
says what a transform holds while it works, which the engine's memory plan counts.

Whether a component table can score a transform is the transform's own answer
(:meth:`Transform.on_table`): a per-component scaling can (from the stored dot products),
a projection can when the table stores its similarities (the engine computes them under
``Transform.key``), anything else needs per-sample gradients.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from selproj_plugin.components import Component

if TYPE_CHECKING:
    from selproj_plugin.table import ComponentTable


class TransformError(ValueError):
    """Features that do not fit a transform, or a transform a table cannot score; one line."""


def selection_digest(components: Sequence[Component]) -> str:
    """Short stable hash of a selection (names and sizes, in order) for transform keys."""
    blob = "\n".join(f"{c.name}:{c.num_params}" for c in components)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class Accumulator:
    """One run of a transform over ``n`` samples fed a component at a time: ``add`` each selected component's
    ``[n, d_c]`` block (each once, any order the transform accepts), then ``finish`` for ``[n, dim]``.

    This base gathers the blocks and calls the transform on them: what a transform that is not additive needs.
    """

    def __init__(self, transform: "Transform", n: int) -> None:
        self.transform, self.n = transform, n
        self.features: dict[str, torch.Tensor] = {}

    def add(self, name: str, block: torch.Tensor) -> None:
        self.features[name] = block

    def finish(self) -> torch.Tensor:
        names = [c.name for c in self.transform.components]
        features = {n: self.features[n] for n in names if n in self.features}
        features.update((n, f) for n, f in self.features.items() if n not in features)  # check() names strays
        self.features = {}
        return self.transform(features)


class Transform(ABC):
    """Maps selected per-sample gradients ``{name: [N, d_c]}`` to ``[N, dim]``.

    Subclasses set ``dim`` (the declared output length) and ``key`` (a stable string naming
    the map: kind, options, seed, selection; tables store similarities under it) and
    implement ``__call__``.  ``components`` are the selected components, in selection order:
    the feature dict passed to ``__call__`` has exactly these names with ``[N, num_params]``.
    """

    components: tuple[Component, ...]
    dim: int
    key: str
    additive = False  # the output is a sum of one term per component: fed a component at a time, never gathered

    def begin(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Accumulator:
        """An :class:`Accumulator` for ``n`` samples whose component blocks come in ``dtype`` on ``device``."""
        return Accumulator(self, n)

    def held_bytes(self, n: int = 1) -> int:
        """Bytes this transform holds while it maps ``n`` samples fed through :meth:`begin`, besides the block
        being added: here every selected gradient (gathered) and the float64 output."""
        return n * (4 * sum(c.num_params for c in self.components) + 8 * self.dim)

    @abstractmethod
    def __call__(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [N, d_c]}`` -> ``[N, dim]``."""

    def on_table(self, table: "ComponentTable") -> np.ndarray | None:
        """[Q, K] cosine under this transform from a component table, or None if a table cannot give it.

        The default looks for similarities the engine stored under :attr:`key`.
        """
        return table.projection(self.key)

    def check(self, features: Mapping[str, torch.Tensor]) -> int:
        """Number of samples; raises :class:`TransformError` if ``features`` do not match ``components``."""
        names = [c.name for c in self.components]
        if list(features) != names:
            missing = [n for n in names if n not in features]
            extra = [n for n in features if n not in names]
            raise TransformError(
                f"{type(self).__name__} expects features for {len(names)} selected components in "
                f"selection order; missing {missing[:3]}, unexpected {extra[:3]}"
            )
        rows = set()
        for c in self.components:
            f = features[c.name]
            if f.dim() != 2 or f.shape[1] != c.num_params:
                raise TransformError(f"features of {c.name} must be [N, {c.num_params}], got {tuple(f.shape)}")
            rows.add(int(f.shape[0]))
        if len(rows) != 1:
            raise TransformError(f"features disagree on the number of samples: {sorted(rows)}")
        return rows.pop()


class Concatenate(Transform):
    """The selected gradients side by side, each optionally scaled by a constant weight.

    A table can score it exactly: cosine from ``sum_c w_c^2 <g_c(a), g_c(b)>``.
    """

    def __init__(self, components: Sequence[Component], weights: Sequence[float] | None = None) -> None:
        self.components = tuple(components)
        if not self.components:
            raise TransformError("nothing to concatenate: the selection is empty")
        w = np.ones(len(self.components)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.components),) or not np.all(np.isfinite(w)):
            raise TransformError(f"weights must be {len(self.components)} finite numbers, got shape {w.shape}")
        self.weights = w
        self.dim = int(sum(c.num_params for c in self.components))
        scaled = "" if weights is None else ":w" + hashlib.sha256(w.tobytes()).hexdigest()[:8]
        self.key = f"concatenate@{self.dim}:{selection_digest(self.components)}{scaled}"

    def __call__(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check(features)
        parts = [features[c.name] if w == 1 else features[c.name] * float(w) for c, w in zip(self.components, self.weights)]
        return torch.cat(parts, dim=1)

    def on_table(self, table: "ComponentTable") -> np.ndarray:
        from selproj_plugin import scoring

        return scoring.subset_similarity(table, table.indices([c.name for c in self.components]), weights=self.weights**2)
