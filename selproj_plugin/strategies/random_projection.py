"""``random_projection``: a Johnson-Lindenstrauss sketch of the whole gradient.

On a component table it scores the stored projected similarities (``rp_similarity``,
written by the gradient engine or shipped with the paper's reference files); on
gradients it projects the concatenated per-sample vectors with a seeded sketch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from selproj_plugin.components import Component
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.table import PAPER_PROJECTION
from selproj_plugin.transforms import Transform, selection_digest


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


class SketchTransform(Transform):
    """Seeded count sketch of the selected gradients to ``dim`` (interim: blocks per component)."""

    kind = PAPER_PROJECTION

    def __init__(self, components: Sequence[Component], dim: int, seed: int) -> None:
        self.components, self.dim, self.seed = tuple(components), int(dim), int(seed)
        self.key = f"{self.kind}@{self.dim}:{selection_digest(self.components)}:seed{self.seed}"

    def __call__(self, features: Mapping[str, Any]) -> Any:
        from selproj_plugin.projection import project_features

        self.check(features)
        return project_features(features, self.dim, seed=self.seed)


@dataclass
class RandomProjection(Reducer):
    """Seeded random projection of the full gradient to ``dim`` dimensions (count or percent)."""

    name = "random_projection"
    summary = "Johnson-Lindenstrauss random projection of the full gradient"

    dim: int | str = "1%"
    seed: int = 0

    def __post_init__(self) -> None:
        parse_dim(self.dim, 100)  # a malformed dimension fails when the option is given

    def transform(self, selected: Sequence[Component]) -> Transform:
        return SketchTransform(selected, parse_dim(self.dim, sum(c.num_params for c in selected)), self.seed)
