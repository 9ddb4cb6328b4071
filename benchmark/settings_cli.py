"""Command-line options from a settings dataclass, so a setting's default and help are written once, in its field.

Each field becomes one option: ``--<prefix><name>`` (``_`` as ``-``) unless its metadata names a ``flag``; its
type comes from the annotation (``X | None`` gives ``X``), its help from ``metadata["help"]``, its choices from
``metadata["choices"]``, and its default, shown in the help, from the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def _type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _fields(cls: type, names: Iterable[str] | None) -> list[dataclasses.Field]:
    chosen = list(dataclasses.fields(cls))
    if names is None:
        return chosen
    names = list(names)
    by_name = {f.name: f for f in chosen}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return [by_name[n] for n in names]


def flag(f: dataclasses.Field, prefix: str = "") -> str:
    """The option of a field: its metadata's ``flag``, else ``--<prefix><name>``."""
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")


def add_arguments(
    parser: Any,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    prefix: str = "",
    unset_default: bool = False,
    notes: dict[str, str] | None = None,
) -> None:
    """One option per field of ``cls`` (those in ``names``, in that order), destination ``<prefix><name>``.

    ``unset_default``: an option left out parses to None (for settings whose default depends on other options;
    :func:`from_args` then keeps the dataclass's); ``notes``: extra help per field name, after the default.
    """
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in _fields(cls, names):
        default = getattr(defaults, f.name)
        shown = [] if default is None else [f"default {default}"]
        if notes and f.name in notes:
            shown.append(notes[f.name])
        text = f.metadata["help"] + (f" ({'; '.join(shown)})" if shown else "")
        parser.add_argument(
            flag(f, prefix),
            dest=f"{prefix.replace('-', '_')}{f.name}",
            type=_type(hints[f.name]),
            default=None if unset_default else default,
            choices=f.metadata.get("choices"),
            help=text.replace("%", "%%"),
        )


def values(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields' values the options gave, by field name: those parsed and not None."""
    dest = prefix.replace("-", "_")
    out = {f.name: getattr(args, dest + f.name, None) for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if v is not None}


def from_args(args: argparse.Namespace, cls: type[T], base: T | None = None, *, prefix: str = "", **overrides: Any) -> T:
    """``base`` (default: the dataclass's defaults) with the options' values and then ``overrides``."""
    return dataclasses.replace(base if base is not None else cls(), **{**values(args, cls, prefix=prefix), **overrides})
