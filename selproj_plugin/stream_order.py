"""The stream order: pair dots sample by sample.  The kept side's factors are stored (device, RAM, then spill
files); each streamed sample, captured alone or in its query-centred group, takes its dots with its kept
partners a chunk at a time and with the partners recomputed in its group."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import numpy as np

from selproj_plugin.batching import batches
from selproj_plugin.budget import PAIR_CHUNK_BYTES
from selproj_plugin.capture import SampleFactors
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.factor_store import FactorStore
from selproj_plugin.gram import factor_dots
from selproj_plugin.planner import TablePlan
from selproj_plugin.prepared import Prepared, capture
from selproj_plugin.projector import ProjectionStore, Projector
from selproj_plugin.shards import TableShard, Timings, pair_key


class _StreamShard:
    """One rank's share in the stream order: the table shard it fills, the kept factors it reads, its timings."""

    def __init__(self, prep: Prepared, plan: TablePlan, config: EngineConfig, projector: Projector | None, store: FactorStore) -> None:
        self.prep, self.plan, self.config, self.projector, self.store = prep, plan, config, projector, store
        self.ids = [s.id for s in plan.samples]
        self.shard = TableShard(components=[s.name for s in prep.specs], rp_keys=projector.keys if projector else [])
        # every sample's transform outputs wait on disk for their pairs
        self.projected = ProjectionStore(projector.keys, config.spill_dir) if projector else None
        self.first = plan.first_unit
        self.timings = Timings()

    def project(self, i: int, f: SampleFactors) -> None:
        """``i``'s transform outputs to the store (once: a recomputed sample's first capture gives them)."""
        if self.projected is None or i in self.projected:
            return
        t = time.perf_counter()
        self.projected.put(i, self.projector(f))
        self.timings.project_s += time.perf_counter() - t

    def put(self, key: tuple[str, str], row: np.ndarray, a: int, b: int) -> None:
        self.shard.cross[key] = row
        if self.projected is not None:
            self.shard.rp[key] = self.projected.cosines(a, b)

    def record_self(self, i: int, row: np.ndarray) -> None:
        self.shard.self_dots[self.ids[i]] = row
        if i in self.plan.self_pairs:
            self.put(pair_key(self.ids[i], self.ids[i]), row, i, i)

    def self_dot(self, i: int, f: SampleFactors) -> None:
        self.record_self(i, factor_dots(f, [f], self.prep.specs)[0])

    def pairs(self, i: int, f: SampleFactors, with_self: bool = False) -> None:
        """``i``'s dots with its kept partners, a few at a time (spilled ones are read back), and with itself
        in the first call when ``with_self`` (its Grams and sums then go with the partners')."""
        chunks = list(self.store.chunks(self.plan.partners.get(i, []), PAIR_CHUNK_BYTES)) or [[]]
        for n, chunk in enumerate(chunks):
            own = [f] if with_self and n == 0 else []
            rows = factor_dots(f, own + [self.store.get(j).to(self.config.device) for j in chunk], self.prep.specs)
            if own:
                self.record_self(i, rows[0])
            for j, row in zip(chunk, rows[len(own) :]):
                self.put(pair_key(self.ids[i], self.ids[j]), row, i, j)

    def group(self, u: int, members: list[int], got: dict[int, SampleFactors]) -> None:
        """A unit's group complete: the hub's dots with its kept partners and its recomputed ones."""
        hub, rest = members[0], members[1:]
        for i in members:
            self.project(i, got[i])
        for i in rest:
            if self.first[i] == u:
                self.self_dot(i, got[i])
        self.pairs(hub, got[hub], with_self=self.first[hub] == u)
        if rest:  # recomputed partners: dots from the group's own factors
            for j, row in zip(rest, factor_dots(got[hub], [got[j] for j in rest], self.prep.specs)):
                self.put(pair_key(self.ids[hub], self.ids[j]), row, hub, j)


def _settle(i: int, f: SampleFactors, waiting: dict[tuple[int, int], dict[int, SampleFactors]]) -> None:
    """``i`` left waiting for a later capture keeps a copy of its own, not its batch's tensors."""
    left = [got for got in waiting.values() if got.get(i) is f]
    if left:
        own = f.compact()
        for got in left:
            got[i] = own


def stream_shard(prep: Prepared, plan: TablePlan, rank: int, world: int, config: EngineConfig, projector: Projector | None) -> TableShard:
    """This rank's share: every kept sample (all ranks need their factors), its dealt streamed units."""
    store = FactorStore.for_config(plan.store_budget, plan.device_budget, config)
    run = _StreamShard(prep, plan, config, projector, store)
    timings = run.timings
    in_ram = set(plan.kept[: plan.ram_kept])
    my_units, kept_pairs = plan.share(rank, world)
    kept_label, streamed_label = (
        ("capture queries", "capture candidates") if plan.kept_queries else ("capture candidates", "capture queries")
    )
    captured = 0
    try:
        t1 = time.perf_counter()
        for i, f in capture(prep, plan.encoded, plan.kept_batches, config, plan.materialise, kept_label):
            t2 = time.perf_counter()
            timings.capture_s += t2 - t1
            captured += 1
            run.project(i, f)
            run.self_dot(i, f)
            t3 = time.perf_counter()
            store.put(i, f, spill=i not in in_ram)
            del f
            t1 = time.perf_counter()
            timings.store_s += t1 - t3
            timings.dots_s += t1 - t2
        for i in kept_pairs:  # pairs whose members are both kept
            run.pairs(i, store.get(i).to(config.device))
        t2 = time.perf_counter()
        timings.dots_s += t2 - t1
        t1 = t2
        # every unit's batches in one capture (one progress count); each capture is known by its unit
        taken, unit_of = [], []
        for u in my_units:
            for b in batches(plan.encoded, sorted({i for g in plan.units[u] for i in g}), config):
                taken.append(b)
                unit_of += [u] * len(b)
        waiting: dict[tuple[int, int], dict[int, SampleFactors]] = {}  # (unit, group) -> factors arrived
        captures = capture(prep, plan.encoded, taken, config, plan.materialise, streamed_label)
        n = 0  # not enumerate(): its reused result tuple would hold the last sample through the next capture
        for i, f in captures:  # to the end: the generator reports progress after each batch
            u = unit_of[n]
            n += 1
            t2 = time.perf_counter()
            timings.capture_s += t2 - t1
            captured += 1
            f = f.to(config.device)
            for g, members in enumerate(plan.units[u]):
                if i in members:
                    waiting.setdefault((u, g), {})[i] = f
                    if len(waiting[u, g]) == len(members):
                        run.group(u, members, waiting.pop((u, g)))
            _settle(i, f, waiting)
            del f
            t1 = time.perf_counter()
            timings.dots_s += t1 - t2
        spilled = store.spilled
    finally:
        store.close()
        if run.projected is not None:
            run.projected.close()
    timings.dots_s -= timings.project_s
    run.shard.meta = {"rank": rank, "world": world, "spilled_bytes": int(spilled), "captures": captured, "timings": asdict(timings)}
    return run.shard


def kept_dots(
    prep: Prepared, store: FactorStore, members: Sequence[int], col: dict[int, int], f: SampleFactors, row: np.ndarray, device: str
) -> None:
    """``f``'s dots with the stored ``members``, read back a chunk at a time, into ``row[col[member]]``."""
    for chunk in store.chunks(members, PAIR_CHUNK_BYTES):
        row[[col[a] for a in chunk]] = factor_dots(f, [store.get(a).to(device) for a in chunk], prep.specs)
