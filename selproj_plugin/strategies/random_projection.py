"""Random projection of the gradient: a JL count sketch, and the paper's per-component variant.

``random_projection`` sketches the whole selected gradient into one shared set of ``dim``
buckets (:class:`~selproj_plugin.projection.CountSketch`): its error matches a dense
Gaussian projection at the same dimension.  ``random_projection_per_component`` is the
paper's construction, kept to reproduce its figures: each component projected on its own to
a share of its size, blocks concatenated.  On a component table both score the projected
similarities the engine stored under their key (the paper's reference files hold the
per-component ones); on gradients they apply the sketch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from selproj_plugin.components import Component
from selproj_plugin.projection import CountSketch, PerComponentSketch, split_dims
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.transforms import Transform


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
    """Seeded count sketch of the whole selected gradient to ``dim`` dimensions (count or percent)."""

    name = "random_projection"
    summary = "Johnson-Lindenstrauss random projection (count sketch) of the full gradient"

    dim: int | str = "1%"
    seed: int = 0

    def __post_init__(self) -> None:
        parse_dim(self.dim, 100)  # a malformed dimension fails when the option is given

    def transform(self, selected: Sequence[Component]) -> Transform:
        return CountSketch(selected, parse_dim(self.dim, sum(c.num_params for c in selected)), self.seed)


@dataclass
class RandomProjectionPerComponent(RandomProjection):
    """The paper's random projection: each component to ``dim`` (a percentage of its own size, or a share of a count).

    The authors projected each component separately with TRAK's dense projector; here each
    block is a count sketch of the same size.  A component's dimensions follow its parameter
    count, not its share of the gradient, so at equal total dimension this is noisier than
    ``random_projection``; it is kept to reproduce the paper.
    """

    name = "random_projection_per_component"
    summary = "the paper's random projection: each component projected to a share of its size"

    def transform(self, selected: Sequence[Component]) -> Transform:
        sizes = [c.num_params for c in selected]
        total = parse_dim(self.dim, sum(sizes))
        text = str(self.dim).strip()
        dims = [max(1, round(float(text[:-1]) / 100 * n)) for n in sizes] if text.endswith("%") \
            else split_dims(sizes, total)
        return PerComponentSketch(selected, dims, self.seed)
