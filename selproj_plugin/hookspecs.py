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

    Each class subclasses :class:`selproj_plugin.Reducer`, sets a unique ``name`` (the
    string users pass to ``--strategy`` and ``get_strategy``) and a one-line ``summary``,
    and declares its options as dataclass fields with defaults.

    Called once when the registry is built.  An exception raised here disables only this
    plugin: it is reported by name, and every other strategy keeps working.
    """
