"""Sharding over torch.distributed ranks, as launched by ``torchrun``.

A run with ``WORLD_SIZE > 1`` in its environment joins the process group (gloo on CPU,
nccl on CUDA); callers deal work out by rank, and results are gathered with
``all_gather_object`` so every rank ends with the same result.  With one process
every function here is the identity, so library code calls them unconditionally.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar


T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank_world()


def local_device(device: str) -> str:
    """``cuda`` means this rank's own GPU under torchrun; other devices pass through."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


def local_world() -> int:
    """Processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``): they share its memory."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if rank_world()[1] > 1 else 1


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def finish() -> None:
    """Wait for every rank, then leave the process group (no-op outside one).

    Without the barrier a rank that is done early tears down its gloo connections while
    rank 0 still works, and the peer can abort.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return rank_world()[0] == 0


def prefix(label: str) -> str:
    """``label`` tagged with this rank when there are several, for progress lines."""
    rank, world = rank_world()
    return label if world == 1 else f"rank {rank}/{world} {label}"
