"""One-line error messages: every error selproj reports or re-raises names its cause in one line."""

from __future__ import annotations


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when it has none); ``with_type`` puts
    the type name in front, for errors whose type is the only clue (a plugin that fails to import)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    first = lines[0].strip()
    return f"{type(exc).__name__}: {first}" if with_type else first
