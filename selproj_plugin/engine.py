"""Gradient engine: per-component gradient dot products for queries x candidates, the public API.

Every distinct sample (by id) goes through a batched forward/backward (:mod:`~selproj_plugin.prepared`).  What
is kept follows the plan of :mod:`selproj_plugin.planner`: one side's factors, most reused first, in RAM up to a
memory limit and then on disk up to a spill allowance (:mod:`~selproj_plugin.factor_store`,
:mod:`~selproj_plugin.budget`), while the other side streams past (:mod:`~selproj_plugin.stream_order`); a
sample that fits neither is recomputed with each streamed partner; dense pair graphs take their dots component
by component instead (:mod:`~selproj_plugin.gram_order`).  Under torch.distributed the streamed units are dealt
out to the ranks (``across_ranks=True``).  Transforms a table cannot express (random projections) are applied
to each sample's gradient, formed a component at a time (:mod:`~selproj_plugin.projector`), and the table
stores the cosines of their outputs, which wait on disk for their pairs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from selproj_plugin import distributed, progress
from selproj_plugin.batching import batches, passes
from selproj_plugin.budget import device_budget, sized, spill_allowance, store_budget
from selproj_plugin.capture import SampleFactors, matrix_form, to_param_layout
from selproj_plugin.engine_config import EngineConfig, MemoryLimitWarning
from selproj_plugin.factor_store import FactorStore
from selproj_plugin.gram import factor_dots
from selproj_plugin.gram_order import gram_shard
from selproj_plugin.loss import encode_samples
from selproj_plugin.models import model_name
from selproj_plugin.planner import TablePlan, plan_samples
from selproj_plugin.prepared import Prepared, capture, capture_batches, iter_factors, prepare
from selproj_plugin.projector import Projector
from selproj_plugin.samples import Sample, dedupe
from selproj_plugin.shards import TableShard, pair_key
from selproj_plugin.stream_order import kept_dots, stream_shard
from selproj_plugin.table import ComponentTable
from selproj_plugin.transforms import Transform

# Prepared and capture_batches are public for the benchmarks, which time capture on the same batches
__all__ = [
    "EngineConfig",
    "FactorStore",
    "MemoryLimitWarning",
    "build_table",
    "plan_table",
    "sample_features",
    "projected_features",
    "pairwise_dots",
    "iter_factors",
    "factor_dots",
    "prepare",
    "Prepared",
    "capture_batches",
]


def build_table(
    model: torch.nn.Module,
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    original: np.ndarray,
    *,
    components: Sequence[str] | None = None,
    scope: str = "paper",
    transforms: Sequence[Transform] = (),
    config: EngineConfig | None = None,
    across_ranks: bool = False,
    shard_path: Callable[[int, int], Path] | None = None,
) -> ComponentTable:
    """Component table for ``queries`` x their candidates ``candidates[candidate_index[q, k]]``.

    ``original``: [Q] column of each query's original, or [Q, K] bool.  ``components`` names
    columns from the component set ``scope`` (``"paper"``: embedding and weight matrices;
    ``"all"``: norms and biases too); None keeps the whole set.  Each distinct sample
    is forward/backward'ed once; the smaller side's factors are kept, the other streams past.
    ``transforms`` (built on this model's catalogue, their components columns of the table, e.g. a
    random projection's :class:`~selproj_plugin.projection.CountSketch`): ``rp_similarity[r]`` holds
    the cosine of ``transforms[r]``'s outputs for every pair, stored under ``rp_keys[r] = key``.

    ``across_ranks``: the torch.distributed ranks deal out the single-process batches of the
    streamed side (each also captures the kept side, whose factors its pairs need) and every
    rank returns the whole table, equal to one process's bit for bit at equal threads per
    process in the same order: ranks stream, while one process left to choose (``dot_order``
    'auto') may go component by component, the same dots summed in another order.  A rank
    then saves its share to ``shard_path(rank, world)`` when given, and reuses a shard file
    already there.
    """
    rank, world = distributed.ranks(across_ranks)
    shard_file = Path(shard_path(rank, world)) if shard_path is not None and world > 1 else None
    config = config or EngineConfig()
    t0 = time.perf_counter()
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    n_q, n_k = candidate_index.shape if candidate_index.ndim == 2 else (len(queries), -1)
    if candidate_index.ndim != 2 or n_q != len(queries):
        raise ValueError(f"candidate_index must be [queries={len(queries)}, K], got shape {candidate_index.shape}")
    if candidate_index.size and (candidate_index.min() < 0 or candidate_index.max() >= len(candidates)):
        raise ValueError(f"candidate_index holds indices outside 0..{len(candidates) - 1}")
    original = np.asarray(original)
    is_original = original.astype(bool) if original.shape == (n_q, n_k) else (np.arange(n_k)[None, :] == original.astype(np.int64)[:, None])

    prep = prepare(model, tokenizer, components, scope)
    projector = Projector(prep.specs, transforms) if transforms else None
    plan, n_truncated = plan_samples(prep, tokenizer, queries, candidates, candidate_index, config, world, projector)
    # the plan's batches, whatever was asked
    config = dataclasses.replace(config, batch_tokens=plan.batch_tokens, batch_size=plan.batch_size)
    encode_s = time.perf_counter() - t0
    progress.LOG.info("table: %d queries x %d candidates, %d components, %s order", n_q, n_k, len(prep.specs), plan.dot_order)
    names = [s.name for s in prep.specs]
    if shard_file is not None and shard_file.is_file():
        shard = TableShard.load(shard_file)
        shard.check(shard_file, names, *plan.expected(rank, world), [t.key for t in transforms])
    elif plan.dot_order == "gram":
        shard = gram_shard(prep, plan, config, projector)
    else:
        shard = stream_shard(prep, plan, rank, world, config, projector)
        if shard_file is not None:
            shard.save(shard_file)
    if projector is not None:
        projector.release()
    merged = TableShard.merge(distributed.gather(shard))

    ids = [s.id for s in plan.samples]
    keys = [[pair_key(ids[q], ids[int(c)]) for c in row] for q, row in zip(plan.q_of, plan.c_of)]

    def self_dots(rows: np.ndarray) -> np.ndarray:
        return np.array([merged.self_dots[ids[i]] for i in rows.ravel()]).reshape(*rows.shape, len(names))

    rp_dims = rp_sim = rp_keys = None
    if transforms:
        rp_dims = np.array([t.dim for t in transforms], dtype=np.int64)
        rp_keys = np.array([t.key for t in transforms])
        rp_sim = np.array([[merged.rp[k] for k in row] for row in keys]).reshape(n_q, n_k, len(transforms))
        rp_sim = np.ascontiguousarray(rp_sim.transpose(2, 0, 1))
    timings = {"encode_s": encode_s, **shard.meta["timings"], "total_s": time.perf_counter() - t0}
    progress.LOG.info("table: built in %.0f s", timings["total_s"])
    comps = [s.component for s in prep.specs]
    meta = {
        "model": model_name(model),
        "truncated": n_truncated,
        "truncated_ids": sorted(e.sample_id for e in plan.encoded if e.truncated),
        "max_length": config.max_length,
        "distinct_samples": int(np.count_nonzero(plan.passes)),
        "batch_size": config.batch_size,
        "captures": int(shard.meta.get("captures", 0))
        if world == 1
        else len(plan.kept) + sum(m.get("captures", len(plan.kept)) - len(plan.kept) for m in merged.meta["shards"]),
        "plan": plan.summary(),
        "materialised_components": plan.materialised,
        "mode": config.mode,
        "spilled_bytes": shard.meta["spilled_bytes"],
        "timings": timings,
        "engine": "selproj factor engine",
        "world_size": world,
        "component_set": scope,
        "param_names": {c.name: list(c.param_names) for c in comps},
    }
    if world > 1:
        meta["ranks"] = merged.meta["shards"]
    return ComponentTable(
        cross=np.array([[merged.cross[k] for k in row] for row in keys]).reshape(n_q, n_k, len(names)),
        query_self=self_dots(np.asarray(plan.q_of, dtype=np.int64)),
        candidate_self=self_dots(plan.c_of),
        is_original=is_original,
        components=np.array([c.name for c in comps]),
        num_params=np.array([c.num_params for c in comps], dtype=np.int64),
        query_ids=np.array([s.id for s in queries]),
        candidate_ids=np.array([[candidates[j].id for j in row] for row in candidate_index]).reshape(n_q, n_k),
        rp_dims=rp_dims,
        rp_similarity=rp_sim,
        rp_keys=rp_keys,
        meta=meta,
    )


def plan_table(
    model: torch.nn.Module,
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    *,
    components: Sequence[str] | None = None,
    scope: str = "paper",
    transforms: Sequence[Transform] = (),
    config: EngineConfig | None = None,
    across_ranks: bool = False,
) -> TablePlan:
    """What :func:`build_table` will do with these arguments (kept, spilled and recomputed samples, passes,
    predicted peak memory, the transforms' share of it, FLOPs), decided without computing a gradient."""
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    projector = Projector(prep.specs, transforms) if transforms else None
    candidate_index = np.asarray(candidate_index, dtype=np.int64).reshape(len(queries), -1)
    world = distributed.ranks(across_ranks)[1]
    return plan_samples(prep, tokenizer, queries, candidates, candidate_index, config, world, projector)[0]


def sample_features(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    components: Sequence[str] | None = None,
    config: EngineConfig | None = None,
    *,
    scope: str = "paper",
    across_ranks: bool = False,
) -> dict[str, torch.Tensor]:
    """Materialised per-sample gradients ``{component: [N, num_params]}`` in parameter layout.

    Layout matches concatenating ``p.grad.flatten()`` over the component's ``param_names``.
    Memory is N x (selected parameters): select components for large models.  With
    ``across_ranks`` the torch.distributed ranks share the batches and all return every row.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    config = sized(prep, config, distributed.ranks(across_ranks)[1])[0]
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    dealt = distributed.deal(list(batches(encoded, range(len(samples)), config)), across_ranks)
    out = {s.name: torch.zeros(len(samples), s.component.num_params) for s in prep.specs}
    done = []
    for i, f in capture(prep, encoded, dealt, config, label="features"):
        for s in prep.specs:
            out[s.name][i] = to_param_layout(s, matrix_form(s, f)).cpu()
        done.append(i)
        del f
    if across_ranks:
        for i, row in distributed.gathered({i: {name: t[i] for name, t in out.items()} for i in done}, True).items():
            for name, t in out.items():
                t[i] = row[name]
    return out


def projected_features(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    transform: Transform,
    config: EngineConfig | None = None,
    *,
    scope: str = "paper",
    across_ranks: bool = False,
) -> torch.Tensor:
    """``transform``'s output for each sample, ``[N, transform.dim]`` float64: what ``build_table`` takes cosines of.

    ``transform`` is built on this model's catalogue (component set ``scope``), e.g. a
    :class:`~selproj_plugin.projection.CountSketch`.  A sample's gradient is fed to it a component
    at a time.  ``across_ranks``: as in :func:`sample_features`.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, [c.name for c in transform.components], scope)
    projector = Projector(prep.specs, [transform])
    config = sized(prep, config, distributed.ranks(across_ranks)[1])[0]
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    dealt = distributed.deal(list(batches(encoded, range(len(samples)), config)), across_ranks)
    mine = {}
    for i, f in capture(prep, encoded, dealt, config, label="projection"):
        mine[i] = projector(f)[0].double()
        del f
    rows = distributed.gathered(mine, across_ranks)
    out = torch.zeros(len(samples), transform.dim, dtype=torch.float64)
    for i, row in rows.items():
        out[i] = row
    return out


def pairwise_dots(
    model: torch.nn.Module,
    tokenizer: Any,
    samples_a: Sequence[Sample],
    samples_b: Sequence[Sample],
    components: Sequence[str] | None = None,
    config: EngineConfig | None = None,
    *,
    scope: str = "paper",
    across_ranks: bool = False,
) -> np.ndarray:
    """Every ``<g_c(a), g_c(b)>``: [A, B, C] float64 (``samples_a`` factors stored, ``samples_b`` streamed).

    A's factors are kept in RAM up to the memory limit and on disk up to the spill allowance; when they do not
    all fit, A is taken in passes of whole capture batches and B streams past each pass.
    With ``across_ranks`` every torch.distributed rank stores A and streams its deal of B's batches.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    config = sized(prep, config, distributed.ranks(across_ranks)[1])[0]
    unique, pos = dedupe(list(samples_a) + list(samples_b))
    encoded, _ = encode_samples(tokenizer, unique, config.max_length)
    a_of = [pos[s.id] for s in samples_a]
    b_of = [pos[s.id] for s in samples_b]
    stored = sorted(set(a_of))
    b_set = sorted(set(b_of))
    lengths = [len(encoded[i].input_ids) for i in sorted(set(stored) | set(b_set))]
    materialise = prep.modes(config, lengths, len(stored) * len(b_set))
    widths = prep.widths(sorted(materialise))
    on_device = device_budget(config)
    budget = store_budget(prep, config, widths.per_sample) + on_device
    allowance = spill_allowance(config)
    if across_ranks:  # every rank must make the same passes: the tightest rank's budget and disk
        budget, allowance = (min(v) for v in zip(*distributed.gather((budget, allowance))))
    size = {i: widths.sample_bytes(len(encoded[i].input_ids), encoded[i].n_targets) for i in stored}
    col = {i: n for n, i in enumerate(stored)}
    dots: dict[int, np.ndarray] = {}
    for taken, in_ram in passes(list(batches(encoded, stored, config)), size, budget, allowance):
        members = [i for b in taken for i in b]
        store = FactorStore.for_config(budget, on_device, config)
        try:
            for i, f in capture(prep, encoded, taken, config, materialise, "set A"):
                store.put(i, f, spill=i not in in_ram)
                del f

            def against_a(b: int, f: SampleFactors) -> None:  # A in chunks: factors read back stay small
                row = dots.setdefault(b, np.zeros((len(stored), len(prep.specs))))
                kept_dots(prep, store, members, col, f.to(config.device), row, config.device)

            for b in distributed.deal(sorted(set(b_set) & set(members)), across_ranks):
                against_a(b, store.get(b))
            streamed = sorted(set(b_set) - set(members))
            for b, f in capture(
                prep, encoded, distributed.deal(list(batches(encoded, streamed, config)), across_ranks), config, materialise, "set B"
            ):
                against_a(b, f)
                del f
        finally:
            store.close()
    dots = distributed.gathered(dots, across_ranks)
    return np.stack([np.stack([dots[b][col[a]] for b in b_of]) for a in a_of])
