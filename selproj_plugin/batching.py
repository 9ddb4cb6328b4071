"""Which samples are captured together: length-sorted batches bounded in samples and padded tokens, the
streamed units ranks deal out, and the passes a stored side is taken in."""

from __future__ import annotations

from typing import Iterator, Sequence

from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.loss import Encoded


def batches(encoded: Sequence[Encoded], order: Sequence[int], config: EngineConfig) -> Iterator[list[int]]:
    """Indices in length-sorted batches (longest first, so memory peaks early) of at most
    ``batch_size`` samples and ``batch_tokens`` padded tokens."""
    ranked = sorted(order, key=lambda i: -len(encoded[i].input_ids))
    batch: list[int] = []
    for i in ranked:
        width = len(encoded[batch[0]].input_ids) if batch else len(encoded[i].input_ids)
        if batch and (len(batch) >= config.batch_size or (len(batch) + 1) * width > config.batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def units(encoded: Sequence[Encoded], groups: Sequence[list[int]], config: EngineConfig) -> list[list[list[int]]]:
    """Singleton groups batched together by length (as every streamed sample was before recomputing
    existed); each larger group a unit of its own."""
    singles = {g[0] for g in groups if len(g) == 1}
    out = [[[i] for i in b] for b in batches(encoded, sorted(singles), config)]
    return out + [[g] for g in groups if len(g) > 1]


def passes(
    taken_batches: list[list[int]], size: dict[int, int], budget: float, allowance: float
) -> Iterator[tuple[list[list[int]], set[int]]]:
    """Whole batches in passes whose predicted factors fit ``budget`` in RAM and ``allowance`` on disk, each
    with the samples it keeps in RAM (at least one batch a pass: one that fits neither is held in RAM)."""

    def fit(batch: list[int], room: float) -> tuple[set[int], float, float]:
        held, ram = set(), 0.0
        for i in batch:
            if ram + size[i] <= room:
                held.add(i)
                ram += size[i]
        return held, ram, sum(size[i] for i in batch) - ram

    taken: list[list[int]] = []
    ram: set[int] = set()
    used = spilled = 0.0
    for batch in taken_batches:
        held, held_bytes, disk = fit(batch, budget - used)
        if taken and spilled + disk > allowance:
            yield taken, ram
            taken, ram, used, spilled = [], set(), 0.0, 0.0
            held, held_bytes, disk = fit(batch, budget)
        if spilled + disk > allowance:  # alone in its pass and still too large for the disk: held in RAM
            held, held_bytes, disk = set(batch), float(sum(size[i] for i in batch)), 0.0
        taken.append(batch)
        ram |= held
        used, spilled = used + held_bytes, spilled + disk
    if taken:
        yield taken, ram
