"""Build the benchmark's component tables from a model and a dataset, stage by stage, cached.

Stages: load model -> load dataset -> candidates (BM25 top-k or the full set) ->
generations (``generated`` setting) -> one component table for all settings (the
candidates' gradients are shared) -> one table per setting.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from benchmark.cache import StageCache, digest
from benchmark.candidates import bm25_topk
from benchmark.data import Dataset, load_dataset
from benchmark.generate import generate_responses
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.random_projection import parse_dim
from selproj_plugin.table import ComponentTable

SETTINGS = ("paraphrased", "generated")


@dataclass
class PipelineOptions:
    """What a run is built from; everything that changes a table is part of its cache key."""

    model: str | None = None
    dataset: str | None = None
    settings: tuple[str, ...] = SETTINGS
    max_samples: int | None = 64
    candidates: int = 5
    full_set: bool = False
    proj_dims: tuple[str, ...] = ()
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_length: int = 512
    max_new_tokens: int = 64
    batch_size: int = 8
    memory_limit_gb: float = 6.0
    cache_dir: str | None = None
    progress: bool = True


@dataclass
class PipelineResult:
    """Per-setting tables plus what the report needs to say where they came from."""

    tables: dict[str, ComponentTable]
    identity: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # where this run's files went: not part of the results


def parse_settings(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise ValueError(f"unknown setting {', '.join(unknown) or repr(text)}; choose from {', '.join(SETTINGS)}")
    return names


def _queries(setting: str, dataset: Dataset, generations: dict[str, str]) -> list[tuple[int, Sample]]:
    """(original index, query sample) pairs of one setting; empty generations are left out."""
    out = []
    for i, r in enumerate(dataset.records):
        if setting == "paraphrased":
            out.append((i, r.paraphrase))
        elif generations.get(r.id, "").strip():
            out.append((i, Sample(f"{r.id}#generated", r.paraphrased_prompt, generations[r.id])))
    return out


def build_tables(opts: PipelineOptions) -> PipelineResult:
    """Run every stage, reusing the cache; returns one validated table per setting."""
    import torch

    from selproj_plugin.components import catalogue
    from selproj_plugin import distributed
    from selproj_plugin.engine import EngineConfig, build_table
    from selproj_plugin.models import DEFAULT_MODEL_NAME, load_model, weights_fingerprint

    stages: dict[str, float] = {}
    world = distributed.rank_world()[1]
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 3)
        clock = now

    dataset = load_dataset(opts.dataset, max_samples=opts.max_samples)
    lap("dataset")
    model, tokenizer = distributed.main_first(lambda: load_model(  # rank 0 converts the default model once
        opts.model, dtype=opts.dtype, device=distributed.local_device(opts.device), cache=opts.cache_dir))
    lap("model")
    cache = StageCache(opts.cache_dir)
    identity = {
        "model": opts.model or DEFAULT_MODEL_NAME, "weights": weights_fingerprint(model), "dtype": opts.dtype,
        "dataset": dataset.name, "dataset_samples": len(dataset),
        "dataset_digest": digest([dataclasses.asdict(r) for r in dataset.records]),
    }
    total_params = sum(c.num_params for c in catalogue(model))
    proj_dims = sorted({parse_dim(d, total_params) for d in opts.proj_dims})

    n = len(dataset)
    pool = [r.original for r in dataset.records]
    if opts.full_set:
        candidate_index = np.tile(np.arange(n), (n, 1))
    else:
        k = min(opts.candidates, n)
        candidate_index = bm25_topk([r.paraphrased_prompt for r in dataset.records],
                                    [r.prompt for r in dataset.records], k, force=list(range(n)))
    lap("candidates")

    generations: dict[str, str] = {}
    if "generated" in opts.settings:
        gen_key = {**identity, "max_new_tokens": opts.max_new_tokens}
        generations = generate_responses(
            model, tokenizer, [(r.id, r.paraphrased_prompt) for r in dataset.records],
            cache_path=cache.path("generations", gen_key, "json"), cache=cache,
            max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, progress=opts.progress,
        )
        lap("generate")

    per_setting = {s: _queries(s, dataset, generations) for s in opts.settings}
    queries = [q for s in opts.settings for _, q in per_setting[s]]
    originals = np.array([i for s in opts.settings for i, _ in per_setting[s]], dtype=int)
    rows = candidate_index[originals]
    is_original = rows == originals[:, None]
    table_key = {**identity, "settings": opts.settings, "full_set": opts.full_set, "candidates": opts.candidates,
                 "proj_dims": proj_dims, "seed": opts.seed, "max_length": opts.max_length,
                 "max_new_tokens": opts.max_new_tokens if "generated" in opts.settings else None,
                 "queries": [q.id for q in queries]}
    table_path = cache.path("table", table_key, "npz")
    table = cache.load(table_path, ComponentTable.load)
    reused = all(distributed.gather(table is not None))  # the ranks must agree on building it together
    if not reused:
        config = EngineConfig(batch_size=opts.batch_size, max_length=opts.max_length,
                              memory_limit_gb=opts.memory_limit_gb / distributed.local_world(),  # per machine
                              device=distributed.local_device(opts.device),
                              progress=opts.progress)
        table = build_table(
            model, tokenizer, queries, pool, rows, is_original, proj_dims=proj_dims, seed=opts.seed, config=config,
            across_ranks=True,
            shard_path=lambda rank, world: cache.path("table", table_key, f"shard{rank}of{world}.npz"))
        if distributed.is_main():
            table.save(table_path)
        reused = False
    lap("table")

    tables: dict[str, ComponentTable] = {}
    start = 0
    for s in opts.settings:
        count = len(per_setting[s])
        if count:
            tables[s] = table.take(np.arange(start, start + count))
        start += count
    run = {"table_cache": str(table_path), "table_reused": reused, "world_size": world,
           "threads_per_process": torch.get_num_threads()}
    notes = {
        "empty_generations": len(dataset) - len(per_setting["generated"]) if "generated" in per_setting else 0,
        "skipped_multiturn": dataset.skipped_multiturn,
        "truncated": table.meta.get("truncated", 0),
        "total_params": total_params, "proj_dims": proj_dims,
    }
    return PipelineResult(tables=tables, identity=identity, stages=stages, notes=notes, run=run)
