"""The strategy registry: a pluggy manager over built-in and entry-point plugins.

``list_strategies()`` and ``get_strategy(name, **options)`` are the public entry points.
A plugin that fails to import or whose hook raises is recorded in ``plugin_errors()``
by name and skipped; the rest keep working.  ``SELPROJ_DISABLE_PLUGINS=a,b`` blocks
plugins by name (entry-point name, or ``builtin``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from selproj_plugin import hookspecs
from selproj_plugin.strategies import builtin
from selproj_plugin.strategies.base import Reducer

ENTRY_POINT_GROUP = "selproj"
DISABLE_ENV = "SELPROJ_DISABLE_PLUGINS"
BUILTIN = "builtin"


class StrategyError(ValueError):
    """An unknown strategy, a bad option, or a broken plugin."""


@dataclass
class Registry:
    """Registered strategies by name, and the plugins that failed with their errors."""

    manager: pluggy.PluginManager
    strategies: dict[str, type[Reducer]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


_lock = threading.Lock()
_registry: Registry | None = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def build_registry() -> Registry:
    """Build a fresh registry: built-ins, then every ``selproj`` entry point not disabled."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    for name in _disabled():
        manager.set_blocked(name)
    if not manager.is_blocked(BUILTIN):
        manager.register(builtin, name=BUILTIN)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.is_blocked(ep.name) or manager.has_plugin(ep.name):
            continue
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.errors[ep.name] = f"failed to load: {_one_line(exc)}"
    for impl in manager.hook.selproj_strategies.get_hookimpls():
        try:
            provided = list(impl.function() or [])
        except Exception as exc:
            registry.errors[impl.plugin_name] = f"selproj_strategies raised {_one_line(exc)}"
            continue
        for cls in provided:
            problem = _check_strategy(cls, registry)
            if problem:
                registry.errors[impl.plugin_name] = problem
                continue
            registry.strategies[cls.name] = cls
            registry.owners[cls.name] = impl.plugin_name
    return registry


def _check_strategy(cls: Any, registry: Registry) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Reducer) and dataclasses.is_dataclass(cls)):
        return f"provided {cls!r}, which is not a Reducer dataclass"
    if not cls.name:
        return f"reducer {cls.__name__} has no name"
    if cls.name in registry.strategies:
        return f"strategy name {cls.name!r} is already registered by {registry.owners[cls.name]}"
    return None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, built on first use (``reload=True`` rebuilds it)."""
    global _registry
    with _lock:
        if _registry is None or reload:
            _registry = build_registry()
        return _registry


def list_strategies() -> dict[str, str]:
    """Registered strategy names with their one-line summaries, in registration order."""
    return {name: cls.summary for name, cls in registry().strategies.items()}


def plugin_errors() -> dict[str, str]:
    """Plugins that failed to load or register, by name, with their one-line error."""
    return dict(registry().errors)


def get_strategy(name: str, **options: Any) -> Reducer:
    """A configured reducer by name; unknown names and options raise :class:`StrategyError`."""
    reg = registry()
    if name not in reg.strategies:
        known = ", ".join(reg.strategies) or "none"
        broken = f"; plugins that failed: {', '.join(f'{p} ({e})' for p, e in reg.errors.items())}" if reg.errors else ""
        raise StrategyError(f"unknown strategy {name!r}; registered: {known}{broken}")
    cls = reg.strategies[name]
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise StrategyError(f"strategy {name!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(valid)) or 'none'}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r}: {exc}") from None
