"""Progress of a long phase: a tqdm bar on stderr, or with bars off a line as it starts and one as it ends.

The lines go to the ``selproj`` logger at INFO, so a library user sees them only after configuring logging;
the benchmark's ``--no-progress`` shows them (:func:`log_to_stderr`), which keeps a long run's log readable
without a bar's carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from selproj_plugin import distributed

LOG = logging.getLogger("selproj")


def bar(total: int, desc: str, enabled: bool = True, *, unit: str = "sample", initial: int = 0) -> Any:
    """A tqdm bar for ``total`` ``unit``s (``initial`` done already), tagged with this rank; with ``enabled`` false a
    :class:`Lines` that logs the phase's start and end instead.  Both have ``update``, ``set_postfix`` and ``close``."""
    desc = distributed.prefix(desc)
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
    return Lines(total, desc, unit, initial)


class Lines:
    """A bar's interface as two log lines: what the phase will do, then what it did and how long it took."""

    def __init__(self, total: int, desc: str, unit: str = "sample", initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""
        self.started = time.perf_counter()
        self.closed = not total  # nothing to do (all cached): no lines
        if total:
            done = f" ({initial} done)" if initial else ""
            LOG.info("%s: %d %s%s%s", desc, total, unit, "" if total == 1 else "s", done)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = f", {self.postfix}" if self.postfix else ""
        LOG.info(
            "%s: %d/%d %s%s in %.0f s%s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            "" if self.total == 1 else "s",
            time.perf_counter() - self.started,
            extra,
        )


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (pytest and others swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_to_stderr() -> None:
    """Show the ``selproj`` logger's INFO lines on stderr as ``[selproj] 14:03:07 ...``, once per process."""
    if not any(isinstance(h, _Stderr) for h in LOG.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[selproj] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
