"""Random projections inside a table: each transform's output for one sample, and the cosine of two outputs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from selproj_plugin.capture import ComponentSpec, SampleFactors, matrix_form, to_param_layout
from selproj_plugin.transforms import Transform


class Projector:
    """Each transform's output for one sample: its gradient materialised in parameter layout, then transformed.

    Holds one sample's gradient (the union of the transforms' components) at a time.
    """

    def __init__(self, specs: Sequence[ComponentSpec], transforms: Sequence[Transform]) -> None:
        by_name = {s.name: s for s in specs}
        for t in transforms:
            for c in t.components:
                if c.name not in by_name or by_name[c.name].component.num_params != c.num_params:
                    raise ValueError(f"transform {t.key} projects {c.name} ({c.num_params} parameters), "
                                     "which is not a component of this table")
        wanted = {c.name for t in transforms for c in t.components}
        self.specs = [s for s in specs if s.name in wanted]
        self.transforms = list(transforms)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.transforms]

    def __call__(self, f: SampleFactors) -> list[torch.Tensor]:
        grads = {s.name: to_param_layout(s, matrix_form(s, f))[None] for s in self.specs}
        return [t({c.name: grads[c.name] for c in t.components})[0].double().cpu() for t in self.transforms]


def cosines(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> np.ndarray:
    """The cosine of each pair of outputs (0 where either is zero)."""
    out = []
    for x, y in zip(a, b):
        denom = float(x.norm() * y.norm())
        out.append(float(x @ y) / denom if denom > 0 else 0.0)
    return np.array(out)
