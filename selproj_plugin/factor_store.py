"""Where kept sample factors live: on the accelerator up to its share, in RAM up to the memory budget, and in
spill files (:mod:`selproj_plugin.spill`) beyond it, memory-mapped when read back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from selproj_plugin.capture import SampleFactors
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.spill import SpillDir, remove_stale


@dataclass(frozen=True)
class _Spilled:
    """Where one spilled tensor lies in its sample's file."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    vector: bool  # a materialised vector rather than a factor tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class FactorStore:
    """Sample factors by key: on ``device`` up to ``device_bytes``, in RAM up to ``limit_bytes`` in all (device
    included), and as one file per sample beyond it.

    Spilled factors are memory-mapped on each ``get`` and dropped after use, so the process
    holds at most the limit plus the factors in use, however many are spilled.
    The spill directory goes on close, at exit, or at the next run if this one is killed.
    """

    def __init__(
        self, limit_bytes: float, spill_dir: str | None = None, *, device: str | torch.device | None = None, device_bytes: float = 0.0
    ) -> None:
        self.limit = limit_bytes
        self.device = torch.device(device) if device is not None else None
        self.device_limit = device_bytes if self.device is not None else 0.0
        self.on_device = 0
        self.in_ram = 0
        self.spilled = 0
        self._items: dict[Any, SampleFactors] = {}
        self._files: dict[Any, tuple[SampleFactors, Path, dict[str, _Spilled]]] = {}
        self._sizes: dict[Any, int] = {}
        self._parent = spill_dir
        self._dir: SpillDir | None = None
        remove_stale(spill_dir)  # killed runs' directories go at the next start

    @classmethod
    def for_config(cls, budget: float, device_budget: float, config: EngineConfig) -> "FactorStore":
        """A store of ``budget`` bytes, ``device_budget`` of them on ``config``'s device, spilling where it says."""
        return cls(budget, config.spill_dir, device=config.device, device_bytes=device_budget)

    def put(self, key: Any, f: SampleFactors, spill: bool | None = None) -> None:
        """Store ``f`` on the device while its share lasts, else in RAM, or on disk when ``spill`` (None: when
        the limit is reached)."""
        if not spill and self.on_device + f.nbytes <= self.device_limit:
            self.on_device += f.nbytes
            self._items[key] = f.to(self.device).compact()
            return
        f = f.to("cpu")
        if not spill and (spill is False or self.on_device + self.in_ram + f.nbytes <= self.limit):
            self.in_ram += f.nbytes
            self._items[key] = f.compact()  # kept in memory: its batch's tensors must not stay alive with it
            return
        if self._dir is None:
            self._dir = SpillDir(self._parent)
        arrays = {k: t.numpy() for k, t in (*f.tensors.items(), *f.vectors.items())}
        path, offsets = self._dir.save(f"s{len(self._files)}", list(arrays.values()))
        where = {k: _Spilled(off, a.dtype, a.shape, k in f.vectors) for (k, a), off in zip(arrays.items(), offsets)}
        self.spilled += f.nbytes
        self._sizes[key] = f.nbytes
        self._files[key] = (SampleFactors(f.sample_id, {}, f.uses, {}), path, where)

    def get(self, key: Any, names: set[str] | None = None) -> SampleFactors:
        """The factors stored under ``key`` (spilled ones memory-mapped, read from the page cache without a
        copy); ``names``: only these tensor and vector keys, so a caller moving them to a device touches no more
        (the component order asks for one component's few of a sample's ~300 tensors, block after block)."""
        if key in self._items:
            f = self._items[key]
            if names is None:
                return f
            return SampleFactors(
                f.sample_id, {k: f.tensors[k] for k in names if k in f.tensors}, f.uses, {k: f.vectors[k] for k in names if k in f.vectors}
            )
        shell, path, where = self._files[key]
        wanted = {k: w for k, w in where.items() if names is None or k in names}
        mapped = np.memmap(path, dtype=np.uint8, mode="c") if any(w.nbytes for w in wanted.values()) else None
        out = SampleFactors(shell.sample_id, {}, shell.uses, {})
        for k, w in wanted.items():
            array = mapped[w.offset : w.offset + w.nbytes].view(w.dtype) if w.nbytes else np.empty(0, w.dtype)
            (out.vectors if w.vector else out.tensors)[k] = torch.from_numpy(array.reshape(w.shape))
        return out

    def nbytes(self, key: Any) -> int:
        """Size of the factors stored under ``key``."""
        return self._items[key].nbytes if key in self._items else self._sizes[key]

    def chunks(self, keys: Sequence[Any], limit: int) -> Iterator[list[Any]]:
        """``keys`` in consecutive runs whose stored factors total at most ``limit`` bytes (at least one each)."""
        chunk: list[Any] = []
        size = 0
        for k in keys:
            n = self.nbytes(k)
            if chunk and size + n > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append(k)
            size += n
        if chunk:
            yield chunk

    def __contains__(self, key: Any) -> bool:
        return key in self._items or key in self._files

    def close(self) -> None:
        """Drop everything and delete spilled files."""
        self._items.clear()
        self._files.clear()
        self._sizes.clear()
        if self._dir is not None:
            self._dir.close()
            self._dir = None
