"""A selection in the forms other attribution tools take: module names, parameter names, globs.

- module names: Kronfluence's ``Task.get_influence_tracked_modules``, Bergson's ``modules``,
  Captum's ``TracInCP(layers=...)``;
- parameter names (``model.named_parameters()`` keys): TRAK's ``grad_wrt``, dattri's
  ``layer_name``;
- globs (``fnmatch``): the shortest list of patterns, layer index wildcarded where every
  layer of a kind is selected, that matches exactly the selected modules of the catalogue.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence

from selproj_plugin.components import Component

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def module_name(c: Component) -> str:
    """The module owning a component: its name, or its name less ``.weight``/``.bias`` where a table
    (the paper's reference files) names components by parameter."""
    if c.param_names == (c.name,) and c.name.endswith((".weight", ".bias")):
        return c.name.rsplit(".", 1)[0]
    return c.name


def module_globs(selected: Sequence[Component], catalogue: Sequence[Component]) -> list[str]:
    """Patterns matching exactly the selected component names among ``catalogue``'s, in selection order."""
    chosen = {c.name for c in selected}
    names = [c.name for c in catalogue]
    out: list[str] = []
    for c in selected:
        pattern = _LAYER_INDEX.sub("*", c.name, count=1) if c.layer is not None else c.name
        matched = set(fnmatch.filter(names, pattern))
        glob = pattern if matched <= chosen else c.name
        if glob not in out:
            out.append(glob)
    return out


def selection_export(selected: Sequence[Component], catalogue: Sequence[Component]) -> dict[str, Any]:
    """The selection as module names, parameter names and globs (see the module docstring for who takes which)."""
    return {
        "modules": [module_name(c) for c in selected],
        "parameters": [p for c in selected for p in c.param_names],
        "module_globs": module_globs(selected, catalogue),
        "labels": [c.label for c in selected],
    }
