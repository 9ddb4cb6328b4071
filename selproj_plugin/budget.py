"""Memory budgets: what the process holds, the bytes of kept factors RAM and the accelerator may take, the
disk the factor store may fill, and the buffers the executors read pairs and blocks through."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from selproj_plugin import distributed
from selproj_plugin.engine_config import CPU_BATCH_SIZE, EngineConfig  # noqa: F401 (CPU_BATCH_SIZE: re-exported)

if TYPE_CHECKING:
    from selproj_plugin.prepared import Prepared

PAIR_CHUNK_BYTES = 256 * 2**20  # stored partners' factors read back per Gram call
CPU_BATCH_TOKENS = 512  # padded tokens per capture batch off CUDA: about 3 samples, arithmetic-bound on a CPU
GiB = 2**30
GRAM_BLOCK_BYTES = 256 * 2**20  # component-major order: one block of every sample's materialised gradient rows


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        return None


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Gradients, optimiser states and backward temporaries are hundreds of mid-size tensors that glibc keeps
    resident once freed (1.2 GB after one full gradient of the 135M model), so RSS overstates what is live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_bytes(model: torch.nn.Module) -> int:
    """What the process holds now (Linux: its RSS, interpreter and libraries included), else the model's weights.

    Freed heap pages go back to the OS first: a budget taken from RSS would otherwise count them as held."""
    release_freed_memory()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return sum(p.numel() * p.element_size() for p in model.parameters())


def store_budget(prep: "Prepared", config: EngineConfig, dense_bytes: int = 0) -> float:
    """Bytes of factors kept in RAM: ``memory_limit_gb`` less what the process holds already (the model),
    one capture batch, one sample's materialised gradients (``dense_bytes``) and the pair buffers, so the
    limit bounds the whole process.

    A batch of ``batch_tokens`` holds about two fp32 copies of its factors' widths per token (layer
    inputs and output gradients, then the factors taken from them; measured 2.1 MB a token on SmolLM2-135M)."""
    if config.memory_limit_gb < 0:
        raise ValueError(f"memory_limit_gb must be at least 0, got {config.memory_limit_gb}")
    per_token = 2 * 4 * sum(s.rows + s.cols for s in prep.specs if s.kind == "factor")
    held = resident_bytes(prep.capture.model)
    batch = config.batch_tokens * per_token if torch.device(config.device).type == "cpu" else 0  # else on the device
    return max(0.0, config.memory_limit_gb * 2**30 - held - batch - dense_bytes - 2 * PAIR_CHUNK_BYTES)


def device_budget(config: EngineConfig) -> float:
    """Bytes of kept factors that stay on the accelerator (none on the CPU)."""
    device = torch.device(config.device)
    if config.device_memory_gb is not None and config.device_memory_gb < 0:
        raise ValueError(f"device_memory_gb must be at least 0, got {config.device_memory_gb}")
    if device.type == "cpu":
        return 0.0
    if config.device_memory_gb is not None:
        return config.device_memory_gb * 2**30
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2  # the other half: capture batches, Grams, other processes
    return 0.0


def device_batch_tokens(free_bytes: float, kept_bytes: float, per_token: int) -> int:
    """Padded tokens of a capture batch in accelerator memory: half of what the kept factors (``kept_bytes``) leave
    of ``free_bytes``, at ``per_token`` bytes a token; the other half for Grams, pair buffers and the allocator."""
    return max(1, int(max(0.0, free_bytes - kept_bytes) / 2 // max(1, per_token)))


def batch_tokens(config: EngineConfig, per_token: Callable[[], int]) -> tuple[int, str]:
    """A capture batch's padded tokens and why: ``config.batch_tokens`` when given, else
    :data:`CPU_BATCH_TOKENS` off CUDA, else :func:`device_batch_tokens` of the device's free memory now, less the
    kept factors' share of it (:func:`device_budget`), at ``per_token()`` bytes (what the planner charges a batch)."""
    if config.batch_tokens is not None:
        if config.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {config.batch_tokens}")
        return config.batch_tokens, "EngineConfig.batch_tokens"
    device = torch.device(config.device)
    if device.type != "cuda":
        return CPU_BATCH_TOKENS, f"the default off CUDA ({device.type})"
    free, kept, width = torch.cuda.mem_get_info(device)[0], device_budget(config), per_token()
    return device_batch_tokens(free, kept, width), (
        f"half of the {free / GiB:.1f} GiB free on {device} less {kept / GiB:.1f} GiB for kept factors, at {width / 2**20:.2f} MiB a token"
    )


def sized(prep: "Prepared", config: EngineConfig, world: int = 1) -> tuple[EngineConfig, str]:
    """``config`` with its capture batch's padded tokens decided (:func:`batch_tokens`), and
    why; under torch.distributed (``world`` > 1) the smallest rank's, so every rank forms the same batches."""
    tokens, why = batch_tokens(config, lambda: prep.widths().batch_bytes_per_token)
    if world > 1 and config.batch_tokens is None and torch.device(config.device).type == "cuda":  # each rank's memory
        every = distributed.gather(tokens)
        if min(every) != tokens:
            tokens, why = min(every), f"the smallest of the ranks' {sorted(set(every))}"
    return dataclasses.replace(config, batch_tokens=tokens, batch_size=batch_size(config, tokens)), why


def batch_size(config: EngineConfig, tokens: int) -> int:
    """Samples a capture batch may hold: ``config.batch_size`` when given, else :data:`CPU_BATCH_SIZE` off CUDA and
    on CUDA as many as its ``tokens`` padded tokens allow (each sample takes at least one)."""
    if config.batch_size is not None:
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
        return config.batch_size
    return tokens if torch.device(config.device).type == "cuda" else CPU_BATCH_SIZE


def spill_allowance(config: EngineConfig) -> float:
    """Bytes the store may write to disk: ``max_spill_gb`` if given, else half the free space where it spills."""
    if config.max_spill_gb is not None:
        if config.max_spill_gb < 0:
            raise ValueError(f"max_spill_gb must be at least 0, got {config.max_spill_gb}")
        return config.max_spill_gb * 2**30
    # the store creates a missing spill directory: its disk is the nearest existing parent's
    where = Path(config.spill_dir or tempfile.gettempdir()).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free / 2
    except OSError:
        return 0.0
