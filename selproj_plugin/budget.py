"""Memory budgets: what the process holds, the bytes of kept factors RAM and the accelerator may take, the
disk the factor store may fill, and the buffers the executors read pairs and blocks through."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from selproj_plugin.engine_config import EngineConfig

if TYPE_CHECKING:
    from selproj_plugin.prepared import Prepared

PAIR_CHUNK_BYTES = 256 * 2**20  # stored partners' factors read back per Gram call
GRAM_BLOCK_BYTES = 256 * 2**20  # component-major order: one block of every sample's materialised gradient rows


def resident_bytes(model: torch.nn.Module) -> int:
    """What the process holds now (Linux: its RSS, interpreter and libraries included), else the model's weights."""
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
    return max(0.0, config.memory_limit_gb * 2**30 - held - config.batch_tokens * per_token - dense_bytes
               - 2 * PAIR_CHUNK_BYTES)


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
