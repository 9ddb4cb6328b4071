"""``full``: the whole gradient, every component (the reference all others are scored against)."""

from __future__ import annotations

from dataclasses import dataclass

from selproj_plugin.strategies.base import Reducer


@dataclass
class Full(Reducer):
    """All components, concatenated."""

    name = "full"
    summary = "the full gradient: every component"
