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


def dim_share(dim: int | str) -> float | None:
    """The fraction of the parameters a percentage ``dim`` asks for, or None for a count; checks the syntax only.

    A percentage must be above 0 and at most 100, a count a positive whole number; whether a
    percentage gives at least one dimension depends on the model (:func:`parse_dim`).
    """
    text = str(dim).strip()
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        raise ValueError(f"projection dimension must be a count or a percentage like 1%, got {dim!r}") from None
    if percent:
        if not 0 < value <= 100:  # also refuses nan
            raise ValueError(f"projection dimension {dim!r}: a percentage must be above 0 and at most 100")
        return value / 100
    if not (value >= 1 and value.is_integer()):
        raise ValueError(f"projection dimension {dim!r}: a count must be a positive whole number")
    return None


def parse_dim(dim: int | str, total_params: int) -> int:
    """An absolute dimension, or a percentage of ``total_params`` (``"0.5%"``), at least 1."""
    share = dim_share(dim)
    if share is None:
        return int(float(str(dim).strip()))
    out = int(round(share * total_params))
    if out < 1:
        raise ValueError(f"projection dimension must be at least 1: {str(dim).strip()} of {total_params:,} parameters gives {out}")
    return out


@dataclass
class RandomProjection(Reducer):
    """Seeded count sketch of the whole selected gradient to ``dim`` dimensions (count or percent)."""

    name = "random_projection"
    summary = "Johnson-Lindenstrauss random projection (count sketch) of the full gradient"

    dim: int | str = "1%"
    seed: int = 0

    def __post_init__(self) -> None:
        dim_share(self.dim)  # a malformed dimension fails when the option is given; its size once the model is known

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
        share = dim_share(self.dim)
        dims = split_dims(sizes, total) if share is None else [max(1, round(share * n)) for n in sizes]
        return PerComponentSketch(selected, dims, self.seed)
