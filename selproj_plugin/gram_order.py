"""The gram order: pair dots component by component.  Every sample's factors are stored once (RAM, then spill
files); then each component's gradients of all samples are materialised a block of rows at a time and one
batched matrix product gives every query-candidate pair of the block."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from selproj_plugin.batching import batches
from selproj_plugin.budget import GRAM_BLOCK_BYTES
from selproj_plugin.capture import ComponentSpec, SampleFactors, factor_keys, stack_key, stacked_rows
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.factor_store import FactorStore
from selproj_plugin.planner import TablePlan
from selproj_plugin.prepared import Prepared, capture
from selproj_plugin.projector import ProjectionStore, Projector
from selproj_plugin.shards import TableShard, Timings, pair_key


def squared_norms(block: torch.Tensor, cols: int) -> np.ndarray:
    """Each sample's and layer's squared norm (``block``: [samples, layers, numbers]): fp32 norms of ``cols``-long
    pieces, summed in float64.  One fp32 reduction over a component's million coordinates erred by 3.2e-4
    (SmolLM2's layer 11 down_proj, measured); a float64 reduction of the whole block took 17x as long."""
    pieces = torch.linalg.vector_norm(block.view(*block.shape[:2], -1, cols), dim=3)
    return pieces.double().square().sum(dim=2).cpu().numpy()


def gram_blocks(specs: Sequence[ComponentSpec], shell: SampleFactors, n: int) -> list[tuple[list[int], int, int]]:
    """The component order's blocks, each at most GRAM_BLOCK_BYTES for ``n`` samples: (components, first row,
    row after last), components of one stack several layers at once where whole ones fit, else rows of one."""
    groups: dict[tuple, list[int]] = {}
    for c, spec in enumerate(specs):
        groups.setdefault(stack_key(spec, shell), []).append(c)
    out = []
    for members in groups.values():
        spec = specs[members[0]]
        per_layer = 4 * spec.rows * spec.cols * n
        if per_layer <= GRAM_BLOCK_BYTES:
            step = GRAM_BLOCK_BYTES // per_layer
            out += [(members[k : k + step], 0, spec.rows) for k in range(0, len(members), step)]
            continue
        rows = max(1, GRAM_BLOCK_BYTES // (4 * spec.cols * n))
        out += [([c], start, min(spec.rows, start + rows)) for c in members for start in range(0, spec.rows, rows)]
    return out


def gram_shard(prep: Prepared, plan: TablePlan, config: EngineConfig, projector: Projector | None) -> TableShard:
    """Component by component: every sample's factors stored once (RAM, then spill), then each component's
    gradients of all samples materialised a block of rows at a time and their Gram taken in one product.

    Cheaper than sample by sample when samples have many partners (every original a candidate):
    each gradient is materialised once and a pair costs one multiply-add per parameter.
    """
    ids = [s.id for s in plan.samples]
    shard = TableShard(components=[s.name for s in prep.specs], rp_keys=projector.keys if projector else [])
    side_a = sorted(set(plan.q_of))
    side_b = sorted(set(plan.c_of.ravel().tolist()))
    used = side_a + sorted(set(side_b) - set(side_a))  # queries first: each side a slice of a block, not a copy
    row = {i: k for k, i in enumerate(used)}
    n_a = len(side_a)
    b_rows = None if not set(side_a) & set(side_b) else torch.tensor([row[i] for i in side_b], device=config.device)
    cross = np.zeros((len(side_a), len(side_b), len(prep.specs)))
    norms = np.zeros((len(used), len(prep.specs)))
    store = FactorStore.for_config(plan.store_budget, plan.device_budget, config)
    # every sample's transform outputs wait on disk until the pairs are read
    projected = ProjectionStore(projector.keys, config.spill_dir) if projector else None
    in_ram = set(plan.kept[: plan.ram_kept])
    timings = Timings()
    try:
        t1 = time.perf_counter()
        for i, f in capture(prep, plan.encoded, list(batches(plan.encoded, used, config)), config, plan.materialise, "capture"):
            t2 = time.perf_counter()
            timings.capture_s += t2 - t1
            if projected is not None:
                projected.put(i, projector(f))
                timings.project_s += time.perf_counter() - t2
            t3 = time.perf_counter()
            # the plan's RAM share by its predicted sizes, the rest spilled: within the allowance it was chosen for
            store.put(i, f, spill=i not in in_ram)  # storing (spilling) counts as dot time, as in the stream order
            del f
            t1 = time.perf_counter()
            timings.store_s += t1 - t3
            timings.dots_s += t1 - t2
        timings.dots_s -= timings.project_s
        if projector is not None:  # every sample projected: the blocks below take the codes' room
            projector.release()
        shells = {i: store.get(i, set()) for i in used}  # each sample's uses, no tensor or vector read
        blocks = gram_blocks(prep.specs, shells[used[0]], len(used))
        # one block's storage for every block: allocated afresh, each of ~240 blocks was page-faulted in again
        storage = torch.empty(
            len(used) * max(len(m) * (stop - start) * prep.specs[m[0]].cols for m, start, stop in blocks), device=config.device
        )
        for members, start, stop in blocks:  # components of one stack a few layers at a time, or rows of one
            specs = [prep.specs[c] for c in members]
            block = storage[: len(used) * len(members) * (stop - start) * specs[0].cols].view(len(used), len(members), -1)
            keys = set().union(*(factor_keys(spec, shells[used[0]]) for spec in specs))
            for k, i in enumerate(used):  # the store holds factors on the CPU: materialise on the device
                stacked_rows(specs, store.get(i, keys).to(config.device), start, stop, out=block[k])
            b = block[n_a:] if b_rows is None else block[b_rows]
            products = torch.bmm(block[:n_a].transpose(0, 1), b.permute(1, 2, 0))  # [layers, A, B]
            cross[:, :, members] += products.double().cpu().numpy().transpose(1, 2, 0)
            norms[:, members] += squared_norms(block, specs[0].cols)
        timings.dots_s += time.perf_counter() - t1
        spilled = store.spilled
        a_pos = {i: k for k, i in enumerate(side_a)}
        b_pos = {i: k for k, i in enumerate(side_b)}
        for k, i in enumerate(used):
            shard.self_dots[ids[i]] = norms[k]
        for q, cands in zip(plan.q_of, plan.c_of):
            got_q = projected.get(q) if projected is not None else None  # read once for all its candidates
            for c in map(int, cands):
                key = pair_key(ids[q], ids[c])
                shard.cross[key] = norms[row[q]] if q == c else cross[a_pos[q], b_pos[c]]
                if projected is not None:
                    shard.rp[key] = projected.cosines(q, c, got_q)
            del got_q
    finally:
        store.close()
        if projected is not None:
            projected.close()
    shard.meta = {"rank": 0, "world": 1, "spilled_bytes": int(spilled), "captures": len(used), "timings": asdict(timings)}
    return shard
