"""The built-in strategies, registered through the same hook a third-party plugin implements."""

from __future__ import annotations

from selproj_plugin.hookspecs import hookimpl
from selproj_plugin.strategies.full import Full
from selproj_plugin.strategies.greedy import Greedy, GreedyFidelity
from selproj_plugin.strategies.random_projection import RandomProjection, RandomProjectionPerComponent
from selproj_plugin.strategies.single import SingleComponent


@hookimpl
def selproj_strategies():
    return [Full, Greedy, GreedyFidelity, RandomProjection, RandomProjectionPerComponent, SingleComponent]
