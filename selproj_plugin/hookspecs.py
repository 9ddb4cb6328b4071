"""Hook specifications for selproj plugins.

A plugin is a module (or object) with functions marked ``@selproj_plugin.hookimpl``
whose names match the specifications below.  Third-party plugins are found through the
``selproj`` entry-point group::

    [project.entry-points.selproj]
    my_reducers = "my_package.plugin"

The built-in strategies are registered through these same hooks
(``selproj_plugin.strategies.builtin``), so a plugin's reducers are first-class: the
benchmark CLI, ``get_strategy`` and the TRAK/Captum adapters all see them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from selproj_plugin.strategies.base import Reducer

PROJECT = "selproj"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def selproj_strategies() -> "list[type[Reducer]]":
    """Return the reducer classes this plugin provides.

    Each class subclasses :class:`selproj_plugin.Reducer` and is decorated with ``@dataclass``
    itself (a subclass of another reducer too, or its options are not fields), with:

    - ``name`` (ClassVar str): unique; what users pass to ``--strategy``, ``get_strategy``
      and the adapters;
    - ``summary`` (ClassVar str): one line for ``--list-strategies``;
    - options: dataclass fields, each with a default (the CLI converts ``--option
      name.field=text`` to the field's annotated type);
    - ``select(components) -> list[str]``: called once per model with the model's real
      catalogue (:class:`selproj_plugin.components.Component`: ``name``, ``kind``, ``layer``,
      ``param_names``, ``num_params``, ``label``) or a table's components; returns the
      names kept, in order;
    - ``transform(selected) -> Transform``: called once per model with the selected
      components; the returned :class:`selproj_plugin.Transform` maps each sample's
      gradients ``{name: [N, num_params]}`` to ``[N, dim]``, declares ``dim`` and ``key``,
      and says through ``on_table`` whether a component table can score it (default:
      :class:`selproj_plugin.Concatenate`);
    - optionally ``fit(table)`` with ``fitted = True`` to learn the selection from a table.

    Every consumer calls the two steps through :func:`selproj_plugin.reduction`;
    :func:`selproj_plugin.testing.check_reducer` checks a class against this contract.
    Called once when the registry is built.  An exception raised here, or a class that
    breaks the contract, disables this whole plugin (none of its classes register): every
    problem is reported under its name, and every other plugin keeps working.
    """
