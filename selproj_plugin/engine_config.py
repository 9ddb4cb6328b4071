"""The engine's settings (:class:`EngineConfig`) and the warning a plan over its memory limit gives."""

from __future__ import annotations

from dataclasses import dataclass


class MemoryLimitWarning(UserWarning):
    """The plan's predicted peak is over ``memory_limit_gb``: what the process already holds and one capture batch
    need more, with nothing kept."""


@dataclass
class EngineConfig:
    """Knobs of the engine; defaults suit a 135M model on a laptop CPU."""

    # samples per capture batch.  None: 8 off CUDA; on CUDA no cap of its own, so batch_tokens fills the device
    batch_size: int | None = None
    # padded tokens per capture batch (at least one sample): bounds activations.  None: 512 off CUDA; on CUDA half
    # of the device memory the kept factors leave free, at the model's captured bytes a token (budget.batch_tokens)
    batch_tokens: int | None = None
    max_length: int = 512
    memory_limit_gb: float = 3.5  # the process's budget: factors beyond what the model and one batch leave are spilled
    device: str = "cpu"
    # on an accelerator, kept factors stay in its memory up to this (None: half what is free when the run is
    # planned), so pairs need no copies from host RAM; the rest go to RAM and then disk as on the CPU
    device_memory_gb: float | None = None
    spill_dir: str | None = None
    max_spill_gb: float | None = None  # disk the factor store may fill; None: half the free space where it spills
    progress: bool = True
    mode: str = "auto"  # per-component dot method: 'auto' (cheaper flops), 'factored' or 'materialised'
    dot_order: str = "auto"  # 'stream' (sample by sample), 'gram' (component by component) or 'auto' (fewer flops)
