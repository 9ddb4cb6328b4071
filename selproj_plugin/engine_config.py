"""The engine's settings (:class:`EngineConfig`) and the warning a plan over its memory limit gives."""

from __future__ import annotations

from dataclasses import dataclass, field


class MemoryLimitWarning(UserWarning):
    """The plan's predicted peak is over ``memory_limit_gb``: what the process already holds and one capture batch
    need more, with nothing kept."""


CPU_BATCH_SIZE = 8  # samples per capture batch off CUDA
DOT_ORDERS = ("auto", "stream", "gram")


@dataclass
class EngineConfig:
    """Knobs of the engine; defaults suit a 135M model on a laptop CPU.  The ``help`` of a field is its
    command-line help too (benchmark.settings_cli)."""

    batch_size: int | None = field(
        default=None,
        metadata={
            "help": (
                f"samples per capture batch (default: {CPU_BATCH_SIZE} off CUDA; on CUDA no cap of its own, so the batch "
                "tokens fill the device)"
            )
        },
    )
    # padded tokens per capture batch (at least one sample): bounds activations.  None: 512 off CUDA; on CUDA half
    # of the device memory the kept factors leave free, at the model's captured bytes a token (budget.batch_tokens)
    batch_tokens: int | None = None
    max_length: int = field(default=512, metadata={"help": "truncate longer samples (counted in the report)"})
    memory_limit_gb: float = field(
        default=3.5,
        metadata={
            "help": (
                "memory budget of the whole process: the model, one capture batch and kept gradient factors; factors "
                "beyond it spill to disk"
            )
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (or cuda:N)"})
    # on an accelerator, kept factors stay in its memory up to this (None: half what is free when the run is
    # planned), so pairs need no copies from host RAM; the rest go to RAM and then disk as on the CPU
    device_memory_gb: float | None = None
    spill_dir: str | None = None
    max_spill_gb: float | None = field(
        default=None,
        metadata={
            "help": (
                "disk the engine may fill with kept factors beyond its memory budget (default: half the free space where "
                "it spills); samples that fit neither are recomputed with each partner"
            )
        },
    )
    progress: bool = True
    mode: str = "auto"  # per-component dot method: 'auto' (cheaper flops), 'factored' or 'materialised'
    dot_order: str = field(
        default="auto",
        metadata={
            "choices": DOT_ORDERS,
            "help": (
                "how the engine takes dot products: 'stream' (sample by sample, as torchrun's ranks do), 'gram' "
                "(component by component, one process only) or 'auto' (fewer estimated FLOPs). One process and torchrun "
                "give equal bits in the same order"
            ),
        },
    )
