"""The strategy registry: a pluggy manager over built-in and entry-point plugins.

``list_strategies()`` and ``get_strategy(name, **options)`` are the public entry points.
Each plugin is registered with pluggy, validated (``check_pending``: a hook no specification
names, such as a misspelled ``selproj_strategies``, is an error) and its hook called on its
own.  A plugin that fails to import, that pluggy refuses, whose hook raises or that returns
a class breaking the contract is refused whole: none of its classes register, every problem
is recorded in ``plugin_errors()`` under its name and reported once through :mod:`warnings`;
the rest keep working.
``SELPROJ_DISABLE_PLUGINS=a,b`` blocks plugins by name (entry-point name, or ``builtin``);
a name that is no plugin is warned about.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib.metadata
import json
import numbers
import os
import threading
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pluggy

from selproj_plugin import hookspecs
from selproj_plugin.errors import one_line
from selproj_plugin.strategies import builtin
from selproj_plugin.strategies.base import Reducer

ENTRY_POINT_GROUP = "selproj"
DISABLE_ENV = "SELPROJ_DISABLE_PLUGINS"
BUILTIN = "builtin"


class StrategyError(ValueError):
    """An unknown strategy, a bad option, or a broken plugin."""


class PluginWarning(UserWarning):
    """A plugin that failed to load or register, or a disabled name that is no plugin."""


# Methods of the 0.1 reducer interface that selproj no longer calls: a subclass defining one
# would be scored as if it did not, so it is refused with a pointer to the contract.
LEGACY_METHODS = ("reduce", "dimension", "similarity")


@dataclass
class Registry:
    """Registered strategies by name, and the plugins that failed with their errors."""

    manager: pluggy.PluginManager
    strategies: dict[str, type[Reducer]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # strategy name -> plugin name
    errors: dict[str, list[str]] = field(default_factory=dict)  # refused plugin -> every problem, one line each
    known_plugins: list[str] = field(default_factory=list)  # builtin, entry points, extra plugins
    unknown_disabled: list[str] = field(default_factory=list)  # names in SELPROJ_DISABLE_PLUGINS that are no plugin
    disabled: list[str] = field(default_factory=list)  # plugins SELPROJ_DISABLE_PLUGINS blocked


_lock = threading.Lock()
_registry: Registry | None = None


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def build_registry(plugins: Sequence[tuple[str, object]] = ()) -> Registry:
    """Build a fresh registry: built-ins, every ``selproj`` entry point not disabled, then ``plugins``.

    ``plugins`` are ``(name, module or object)`` pairs registered like entry points (the
    conformance kit uses this to register a reducer class without installing it).
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    disabled = _disabled()
    for name in disabled:
        manager.set_blocked(name)
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    known = {BUILTIN} | {ep.name for ep in entry_points} | {name for name, _ in plugins}
    registry.known_plugins = sorted(known)
    registry.unknown_disabled = sorted(disabled - known)
    registry.disabled = sorted(disabled & known)
    loaders: list[tuple[str, Callable[[], object]]] = [(BUILTIN, lambda: builtin)]
    loaders += [(ep.name, ep.load) for ep in entry_points]
    loaders += [(name, lambda plugin=plugin: plugin) for name, plugin in plugins]
    for name, load in loaders:
        if not (manager.is_blocked(name) or manager.has_plugin(name)):
            _add_plugin(registry, name, load)
    return registry


def _add_plugin(registry: Registry, name: str, load: Callable[[], object]) -> None:
    """Load, register and validate one plugin, then call its hook alone, so every failure is its own.

    A plugin is taken whole or not at all: on any problem none of its classes register, it is
    unregistered, and every problem found is kept.
    """
    manager = registry.manager
    try:
        plugin = load()
        hash(plugin)  # subset_hook_caller keeps the other plugins in a set
    except Exception as exc:  # a broken plugin must not take the others down
        registry.errors[name] = [f"failed to load: {one_line(exc, with_type=True)}"]
        return
    try:
        manager.register(plugin, name=name)
        manager.check_pending()  # the plugins before this one passed, so an unknown hook is this one's
    except pluggy.PluginValidationError as exc:
        registry.errors[name] = [_validation_error(manager, plugin, exc)]
        manager.unregister(name=name)
        return
    others = [p for n, p in manager.list_name_plugin() if n != name and p is not None]
    try:
        results = manager.subset_hook_caller("selproj_strategies", others)()
    except Exception as exc:
        results, problems = [], [f"selproj_strategies raised {one_line(exc, with_type=True)}"]
    else:
        problems = [
            f"selproj_strategies returned {r!r:.80}, not a list of Reducer classes" for r in results if not isinstance(r, (list, tuple))
        ]
    classes = [cls for result in results if isinstance(result, (list, tuple)) for cls in result]
    taken = dict(registry.owners)
    for cls in classes:
        problem = _check_strategy(cls, taken)
        if problem:
            problems.append(problem)
        else:
            taken[cls.name] = name
    if problems:
        registry.errors[name] = problems
        manager.unregister(name=name)
        return
    for cls in classes:
        registry.strategies[cls.name] = cls
        registry.owners[cls.name] = name


def _validation_error(manager: pluggy.PluginManager, plugin: object, exc: pluggy.PluginValidationError) -> str:
    """One line for a plugin pluggy refused: its hooks that match no specification, else pluggy's reason."""
    callers = manager.get_hookcallers(plugin) or []  # None when register itself refused the plugin
    unknown = [c.name for c in callers if not c.has_spec() and any(i.plugin is plugin and not i.optionalhook for i in c.get_hookimpls())]
    if not unknown:  # pluggy's reason spans lines: the hook, its definition, what does not match
        return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    specs = [n for n, c in vars(manager.hook).items() if not n.startswith("_") and c.has_spec()]
    return f"unknown hook {', '.join(map(repr, unknown))}; selproj's hooks are: {', '.join(specs)}"


def own_dataclass(cls: type) -> bool:
    """Whether ``cls`` itself is decorated with @dataclass (``is_dataclass`` is also true for undecorated subclasses)."""
    return "__dataclass_params__" in vars(cls)


def _check_strategy(cls: Any, taken: dict[str, str]) -> str | None:
    """The one-line reason ``cls`` cannot register, or None; ``taken`` maps names in use to their plugin."""
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        return f"provided {cls!r}, which is not a Reducer dataclass"
    if not own_dataclass(cls):
        return f"reducer {cls.__name__} is not itself a dataclass, so its options are not fields: add @dataclass above class {cls.__name__}"
    if not cls.name or not isinstance(cls.name, str):
        return f"reducer {cls.__name__} has no name"
    legacy = [m for m in LEGACY_METHODS if any(m in vars(k) for k in cls.__mro__ if k is not object)]
    if legacy:
        return (
            f"reducer {cls.__name__} defines {legacy[0]}(), which selproj no longer calls: "
            "put per-sample work in transform() (see CONTRIBUTING.md)"
        )
    if cls.name in taken:
        return f"strategy name {cls.name!r} is already registered by {taken[cls.name]}"
    return None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, built on first use (``reload=True`` rebuilds it).

    Broken plugins and disabled names that are no plugin are reported once per build
    through :mod:`warnings` (:class:`PluginWarning`).
    """
    global _registry
    with _lock:
        if _registry is None or reload:
            _registry = build_registry()
            for plugin, errors in _registry.errors.items():
                warnings.warn(f"selproj plugin {plugin} disabled: {'; '.join(errors)}", PluginWarning, stacklevel=3)
            for name in _registry.unknown_disabled:
                warnings.warn(
                    f"{DISABLE_ENV} names {name!r}, which is no selproj plugin; plugins: {', '.join(_registry.known_plugins)}",
                    PluginWarning,
                    stacklevel=3,
                )
        return _registry


def plugin_names() -> dict[str, str]:
    """Each registered strategy's plugin name (what ``SELPROJ_DISABLE_PLUGINS`` takes)."""
    return dict(registry().owners)


def list_strategies() -> dict[str, str]:
    """Registered strategy names with their one-line summaries, in registration order."""
    return {name: cls.summary for name, cls in registry().strategies.items()}


def plugin_errors() -> dict[str, list[str]]:
    """Plugins refused whole (failed to load, validate or register), by name, with every problem, one line each."""
    return {plugin: list(errors) for plugin, errors in registry().errors.items()}


def get_strategy_class(name: str) -> type[Reducer]:
    """The registered reducer class by name; unknown names raise :class:`StrategyError`."""
    return _strategy_class(name)


def get_strategy(name: str, **options: Any) -> Reducer:
    """A configured reducer by name; unknown names and options raise :class:`StrategyError`."""
    cls = _strategy_class(name)
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise StrategyError(f"strategy {name!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(valid)) or 'none'}")
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise StrategyError(f"option {name}.{key} expects {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r}: {exc}") from None


def convert_options(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """Option values given as text (the CLI's ``--option name.key=value``) converted to each field's type.

    Follows the dataclass annotations: ``int``, ``float``, ``bool``, ``str``, ``None``
    (``none``/``null``), lists and tuples (comma-separated or a JSON list) and unions
    (first type that fits).  A value that fits no type is a one-line :class:`StrategyError`.
    """
    cls = _strategy_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            raise StrategyError(f"strategy {name!r} has no option {key}; options: {', '.join(sorted(fields)) or 'none'}")
        try:
            out[key] = _convert(str(text), hints.get(key, str))
        except ValueError:
            raise StrategyError(f"option {name}.{key} expects {_type_name(hints.get(key, str))}, got {text!r}") from None
    return out


def _strategy_class(name: str) -> type[Reducer]:
    reg = registry()
    if name not in reg.strategies:
        known = ", ".join(reg.strategies) or "none"
        failed = ", ".join(f"{p} ({'; '.join(e)})" for p, e in reg.errors.items())
        broken = f"; plugins that failed: {failed}" if reg.errors else ""
        blocked_text = f"; {DISABLE_ENV} blocks plugin(s) {', '.join(reg.disabled)}" if reg.disabled else ""
        raise StrategyError(f"unknown strategy {name!r}; registered: {known}{broken}{blocked_text}")
    return reg.strategies[name]


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) in (list, tuple, collections.abc.Sequence):
        return f"a comma-separated list of {_type_name(args[0]) if args else 'values'}"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether a Python value matches annotation ``tp`` (ints fit float; types we cannot check fit)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return not isinstance(tp, type) or tp is Any or isinstance(value, tp)


def _convert(text: str, tp: Any) -> Any:
    """``text`` as a value of annotation ``tp``; ValueError when it is none."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # exact scalars first; then str (a strategy may parse its own text form); lists last,
        # unless the text is a JSON list
        listed = text.strip().startswith("[")
        for arg in sorted(args, key=lambda a: (-1 if listed else 2) if typing.get_origin(a) is not None else int(a is str)):
            try:
                return _convert(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if tp is type(None):
        if text.strip().lower() in ("none", "null", ""):
            return None
        raise ValueError(text)
    if origin in (list, tuple, collections.abc.Sequence):
        stripped = text.strip()
        items = json.loads(stripped) if stripped.startswith("[") else [t.strip() for t in stripped.split(",") if t.strip()]
        item_type = args[0] if args else str
        values = [_convert(str(i), item_type) for i in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if tp is int:
        return int(text.strip())
    if tp is float:
        value = float(text.strip())
        return value
    if tp is str or tp is Any:
        return text
    raise ValueError(text)
