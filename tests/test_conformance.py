"""The conformance kit: every built-in passes it, and deliberately broken reducers fail it by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from selproj_plugin import Concatenate, Reducer, Transform
from selproj_plugin.registry import get_strategy_class, list_strategies
from selproj_plugin.testing import ReducerCheckError, check_reducer, reducer_checks

BUILTIN_OPTIONS = {"random_projection": {"dim": 64}}


@pytest.mark.parametrize(
    "check",
    [c for name in list_strategies() for c in reducer_checks(get_strategy_class(name), BUILTIN_OPTIONS.get(name))],
    ids=str,
)
def test_builtins_conform(check):
    check()


@dataclass
class UnknownName(Reducer):
    name = "broken_unknown"
    summary = "selects a component the model does not have"

    def select(self, components):
        return ["model.layers.99.mlp.down_proj"]


class _Shifted(Concatenate):
    """Declares one dimension more than it returns."""

    def __init__(self, components):
        super().__init__(components)
        self.dim += 1


@dataclass
class WrongDim(Reducer):
    name = "broken_dim"
    summary = "transform declares a dimension it does not return"

    def transform(self, selected):
        return _Shifted(selected)


class _Centred(Concatenate):
    """Subtracts the batch mean: each sample's vector depends on the others in its batch."""

    def __call__(self, features):
        out = super().__call__(features)
        return out - out.mean(dim=0, keepdim=True)


@dataclass
class BatchMixing(Reducer):
    name = "broken_batch"
    summary = "transform centres each batch"

    def transform(self, selected):
        return _Centred(selected)


class _Unseeded(Transform):
    """A random projection drawn afresh each time it is built."""

    def __init__(self, components):
        self.components = tuple(components)
        self.dim = 8
        self.key = "unseeded@8"
        self.matrix = torch.randn(sum(c.num_params for c in self.components), 8)

    def __call__(self, features):
        return torch.cat([features[c.name] for c in self.components], dim=1) @ self.matrix


@dataclass
class Unseeded(Reducer):
    name = "broken_unseeded"
    summary = "an unseeded random projection"

    def transform(self, selected):
        return _Unseeded(selected)


class _TableDisagrees(Concatenate):
    """Doubles the first component on gradients but tells tables it is a plain concatenation."""

    def __call__(self, features):
        out = super().__call__(features)
        width = self.components[0].num_params
        return torch.cat([2 * out[:, :width], out[:, width:]], dim=1)


@dataclass
class TableDisagrees(Reducer):
    name = "broken_table"
    summary = "on_table and the per-sample transform disagree"

    def select(self, components):  # the embedding first: the largest gradient, so doubling it shows
        return [c.name for c in components if c.kind == "embed"] + [c.name for c in components if c.layer == 0]

    def transform(self, selected):
        return _TableDisagrees(selected)


@dataclass
class Legacy(Reducer):
    name = "broken_legacy"
    summary = "weights components in reduce(), which selproj no longer calls"

    def reduce(self, features):
        return features


class Undecorated(Reducer):  # no @dataclass of its own: ``layers`` is a class attribute, not an option
    name = "broken_undecorated"
    summary = "forgot @dataclass"
    layers: int = 2


@pytest.mark.parametrize("cls, check, message", [
    (UnknownName, "check_select", "selects 'model.layers.99.mlp.down_proj', which is not a component"),
    (WrongDim, "check_transform", "declared dim"),
    (BatchMixing, "check_transform", "transform mixes samples"),
    (Unseeded, "check_transform", "built again"),
    (TableDisagrees, "check_table", "table scoring and the transform on per-sample gradients disagree"),
    (Legacy, "check_class", "defines reduce(), which selproj never calls"),
    (Undecorated, "check_class", "Undecorated is not itself a dataclass"),
    (Undecorated, "check_registers", "registry refused Undecorated: reducer Undecorated is not itself a dataclass"),
])
def test_broken_reducers_fail_by_name(cls, check, message):
    with pytest.raises(ReducerCheckError) as err:
        check_reducer(cls)
    text = str(err.value)
    assert f"{check}: " in text and message in text
    assert "\n" not in text


def test_legacy_reducer_is_also_refused_by_the_registry():
    with pytest.raises(ReducerCheckError, match=r"check_registers: registry refused Legacy: reducer Legacy defines reduce\(\)"):
        check_reducer(Legacy)
