"""The conformance kit: every built-in passes it, and deliberately broken reducers fail it by name."""

from __future__ import annotations

import importlib
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


@pytest.mark.parametrize(
    "cls, check, message",
    [
        (UnknownName, "check_select", "selects 'model.layers.99.mlp.down_proj', which is not a component"),
        (WrongDim, "check_transform", "declared dim"),
        (BatchMixing, "check_transform", "transform mixes samples"),
        (Unseeded, "check_transform", "built again"),
        (TableDisagrees, "check_table", "table scoring and the transform on per-sample gradients disagree"),
        (Legacy, "check_class", "defines reduce(), which selproj never calls"),
        (Undecorated, "check_class", "Undecorated is not itself a dataclass"),
        (Undecorated, "check_registers", "registry refused Undecorated: reducer Undecorated is not itself a dataclass"),
    ],
)
def test_broken_reducers_fail_by_name(cls, check, message):
    with pytest.raises(ReducerCheckError) as err:
        check_reducer(cls)
    text = str(err.value)
    assert f"{check}: " in text and message in text
    assert "\n" not in text


def test_legacy_reducer_is_also_refused_by_the_registry():
    with pytest.raises(ReducerCheckError, match=r"check_registers: registry refused Legacy: reducer Legacy defines reduce\(\)"):
        check_reducer(Legacy)


# ---- checks from other packages, found through the selproj.checks entry point ------------------
def test_the_adapters_add_the_trak_and_captum_checks_to_any_reducer():
    names = [str(c).split(":", 1)[1] for c in reducer_checks(UnknownName)]
    assert names == ["check_class", "check_registers", "check_select", "check_transform", "check_table", "check_trak", "check_captum"]
    trak = next(c for c in reducer_checks(UnknownName) if str(c).endswith("check_trak"))
    assert trak.run.func.__module__ == "selproj_plugin.adapters.conformance"


def _checks_package(site, entry: str) -> None:
    """A distribution on sys.path whose ``selproj.checks`` entry point is ``entry``."""
    info = site / "selproj_extra_checks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: selproj-extra-checks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[selproj.checks]\n{entry}\n")
    importlib.invalidate_caches()


def test_a_package_adds_its_own_check(tmp_path, monkeypatch):
    (tmp_path / "selproj_extra_checks.py").write_text(
        "def check_no_embedding(cls, options):\n"
        "    assert cls.name != 'broken_unknown', 'no embedding here'\n"
        "CHECKS = (check_no_embedding,)\n"
    )
    _checks_package(tmp_path, "extra = selproj_extra_checks:CHECKS")
    monkeypatch.syspath_prepend(str(tmp_path))
    checks = {str(c): c for c in reducer_checks(UnknownName)}
    assert list(checks)[-1] == "UnknownName:check_no_embedding"  # after the kit's and the adapters' checks
    with pytest.raises(AssertionError, match="no embedding here"):
        checks["UnknownName:check_no_embedding"]()


def test_a_checks_entry_point_that_does_not_load_is_a_failing_check(tmp_path, monkeypatch):
    _checks_package(tmp_path, "broken = selproj_no_such_checks:CHECKS")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = next(c for c in reducer_checks(UnknownName) if "broken" in str(c))
    assert str(check) == "UnknownName:check_broken_loads"
    with pytest.raises(
        AssertionError,
        match="the selproj.checks entry point 'broken' does not load: ModuleNotFoundError: No module named 'selproj_no_such_checks'",
    ):
        check()
