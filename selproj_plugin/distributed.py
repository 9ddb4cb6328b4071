"""Sharding over torch.distributed ranks, as launched by ``torchrun``.

A run with ``WORLD_SIZE > 1`` in its environment joins the process group (gloo on CPU,
nccl on CUDA, with a timeout); callers deal work out by rank, and results are gathered
with ``all_gather_object`` so every rank ends with the same result.  That is the only
collective used, so a rank that fails can hand its error to the others through the very
call they wait in (:func:`session`): every rank then stops with the failing rank's
message instead of waiting for it.  With one process every function here is the
identity, so library code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from selproj_plugin.errors import one_line

T = TypeVar("T")

TIMEOUT_ENV = "SELPROJ_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # the longest one rank may wait for another at a collective
GRACE_S = 10.0  # how long a leaving rank waits for the others at its last collective (a failure, the barrier)


class RankError(ValueError):
    """Another rank failed; the message names it and carries its one-line error."""


class CollectiveError(ValueError):
    """A collective itself failed: a peer is gone, the timeout expired, or the ranks are out of step."""


@dataclass(frozen=True)
class _Failed:
    """What a failing rank contributes to the collective the others wait in."""

    rank: int
    message: str


@dataclass(frozen=True)
class _Done:
    """What a rank contributes to the last collective, when it leaves the group."""

    rank: int


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def timeout_s() -> float:
    """Process-group timeout: ``$SELPROJ_TIMEOUT_S`` seconds, else 30 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {text}")
    return value


# torch modules whose functions take ``group=group.WORLD`` as a default, evaluated at import.
# Imported after the group exists, they keep it alive past ``destroy_process_group`` (transformers
# imports them with its model classes), and so its gloo worker threads: one that drops a
# collective's last tensor while the interpreter exits aborts the process (about 1 run in 100).
BINDS_WORLD_AT_IMPORT = ("torch.distributed.nn.functional", "torch.distributed.fsdp.sharded_grad_scaler")


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    A collective that waits longer than :func:`timeout_s` fails instead of waiting forever.
    """
    import importlib

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        for name in BINDS_WORLD_AT_IMPORT:  # before the group exists, so their defaults stay None
            importlib.import_module(name)
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    return rank_world()


def local_device(device: str) -> str:
    """``cuda`` means this rank's own GPU under torchrun; other devices pass through."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


def local_world() -> int:
    """Processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``): they share its memory."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if rank_world()[1] > 1 else 1


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    rank, world = rank_world()
    out: list[Any] = [None] * world
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:  # a peer died, the timeout expired, or the backend broke
        raise CollectiveError(f"rank {rank} lost contact with the other ranks: {one_line(exc)}") from None
    return out


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank.

    Raises :class:`RankError` on every rank when another rank sent its failure instead (see
    :func:`session`), and :class:`CollectiveError` when a peer is gone or the ranks are out of step.
    """
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = _all_gather(obj)
    failed = [o for o in out if isinstance(o, _Failed)]
    if failed and not isinstance(obj, _Failed):
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankError(f"rank {failed[0].rank} failed{more}: {failed[0].message}")
    done = [o.rank for o in out if isinstance(o, _Done)]
    if done and len(done) != world and not isinstance(obj, _Failed):
        raise CollectiveError(f"ranks out of step: rank(s) {done} finished while rank {rank} still had work to share")
    return out


def ranks(across_ranks: bool) -> tuple[int, int]:
    """(rank, world size) under torch.distributed when work is shared ``across_ranks``, else (0, 1)."""
    return rank_world() if across_ranks else (0, 1)


def deal(items: list[T], across_ranks: bool) -> list[T]:
    """The items (batches) this rank computes: all of them, or its round-robin deal under torch.distributed."""
    rank, world = ranks(across_ranks)
    return items[rank::world]


def gathered(rows: dict[int, Any], across_ranks: bool) -> dict[int, Any]:
    """Every rank's rows, on every rank (the rows themselves outside a process group)."""
    if not across_ranks:
        return rows
    merged: dict[int, Any] = {}
    for part in gather(rows):
        merged.update(part)
    return merged


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks: rank 0 fills a shared cache that they only read.

    If rank 0 fails, every rank raises its error (within :func:`session`).
    """
    if rank_world()[1] == 1:
        return fn()
    result = fn() if is_main() else None
    gather(None)
    return result if is_main() else fn()


def _bounded(fn: Callable[[], Any]) -> bool:
    """Run ``fn`` (a collective) in a daemon thread for at most GRACE_S; True if it completed."""
    completed: list[bool] = []

    def call() -> None:
        with contextlib.suppress(Exception):
            fn()
            completed.append(True)

    thread = threading.Thread(target=call, name="selproj-collective", daemon=True)
    thread.start()
    thread.join(GRACE_S)
    return bool(completed)


def _leave() -> None:
    """Meet the others at a barrier, then leave the group.

    The barrier holds no Python tensors, unlike ``all_gather_object``: a gloo worker that frees
    those after the interpreter began to exit aborts the process, and the barrier gives it time.
    """
    import torch.distributed as dist

    if _bounded(dist.barrier):
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[tuple[int, int]]:
    """Work in the process group (if any), then leave it with the ranks agreeing on how it ended.

    On success every rank waits for the others, then leaves (a rank that tears its connections
    down early can abort a peer).  On an error, the failing rank sends its one-line message
    through the collective the others wait in, so each of them raises :class:`RankError` with
    it within seconds; a rank whose peers do not reach a collective within GRACE_S leaves
    anyway (under torchrun the launcher then stops them).  Interrupts and lost peers skip the
    goodbye: the launcher is stopping every rank, or there is no one left to tell.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield rank_world()
        return
    try:
        yield rank_world()
    except Exception as exc:
        # bound now: _bounded may give up on its thread, which would then outlive the except block and ``exc``
        failed = _Failed(rank_world()[0], one_line(exc))
        if isinstance(exc, RankError) or (not isinstance(exc, CollectiveError) and _bounded(lambda: _all_gather(failed))):
            _leave()
        raise
    try:
        gather(_Done(rank_world()[0]))
    except RankError:  # a rank failed after its last share of work
        _leave()
        raise
    _leave()


def is_main() -> bool:
    return rank_world()[0] == 0


def prefix(label: str) -> str:
    """``label`` tagged with this rank when there are several, for progress lines."""
    rank, world = rank_world()
    return label if world == 1 else f"rank {rank}/{world} {label}"
