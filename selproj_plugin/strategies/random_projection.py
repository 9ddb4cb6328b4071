"""``random_projection``: a Johnson-Lindenstrauss sketch of the whole gradient.

On a component table it scores the stored projected similarities (``rp_similarity``,
written by the gradient engine or shipped with the paper's reference files); on
gradients it projects the concatenated per-sample vectors with a seeded sketch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from selproj_plugin.components import Component
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.table import ComponentTable


def parse_dim(dim: int | str, total_params: int) -> int:
    """An absolute dimension, or a percentage of the parameters (``"1%"``)."""
    text = str(dim).strip()
    try:
        value = float(text[:-1]) / 100 * total_params if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"projection dimension must be a count or a percentage like 1%, got {dim!r}") from None
    if value < 1 or value != value:
        raise ValueError(f"projection dimension must be at least 1, got {dim!r}")
    return int(round(value))


@dataclass
class RandomProjection(Reducer):
    """Seeded random projection of the full gradient to ``dim`` dimensions (count or percent)."""

    name = "random_projection"
    summary = "Johnson-Lindenstrauss random projection of the full gradient"

    dim: int | str = "1%"
    seed: int = 0

    def _stored_index(self, table: ComponentTable) -> int:
        if table.rp_similarity is None or table.rp_dims is None or len(table.rp_dims) == 0:
            raise ValueError("this table holds no random projections: build it with --proj-dim to score random_projection")
        want = parse_dim(self.dim, table.total_params)
        dims = np.asarray(table.rp_dims)
        index = int(np.argmin(np.abs(dims - want)))
        if abs(int(dims[index]) - want) > 0.01 * want:
            raise ValueError(f"this table holds random projections at {', '.join(map(str, dims))} dims, not {want}")
        return index

    def similarity(self, table: ComponentTable) -> np.ndarray:
        return np.asarray(table.rp_similarity[self._stored_index(table)], dtype=np.float64)

    def dimension(self, components: Sequence[Component]) -> int:
        return parse_dim(self.dim, sum(c.num_params for c in components))

    def evaluate(self, table: ComponentTable, **kwargs: Any):
        result = super().evaluate(table, **kwargs)
        result.dim = int(table.rp_dims[self._stored_index(table)])
        result.param_fraction = result.dim / table.total_params
        return result

    def reduce(self, features: Mapping[str, Any]) -> Any:
        """Project the concatenated per-sample gradients ``{name: [N, d]}`` to ``[N, dim]``."""
        from selproj_plugin.projection import project_features

        total = sum(int(v[0].numel()) for v in features.values())
        return project_features(features, parse_dim(self.dim, total), seed=self.seed)
