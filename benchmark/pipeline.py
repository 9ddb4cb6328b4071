"""Build the benchmark's component tables from a model and a dataset, stage by stage, cached.

Stages: load model -> load dataset -> fine-tune (the embedded model, on the originals; see
:mod:`benchmark.finetune`) -> per checkpoint: generations (``generated`` setting) -> one component
table for all settings over the whole pool (the candidates' gradients are shared) -> per setting, the
table of each query's BM25 top-k candidates and the whole-pool table for MRR and recall@k.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from benchmark.cache import StageCache, digest, package_version, tokenizer_digest
from benchmark.candidates import bm25_scores, top_k
from benchmark.data import Dataset, load_dataset
from benchmark.finetune import FinetuneResult, FinetuneSettings
from benchmark.generate import generate_responses
from selproj_plugin import progress
from selproj_plugin.components import Component
from selproj_plugin.engine_config import CPU_BATCH_SIZE, EngineConfig
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer, Reduction, Similarity, reduction
from selproj_plugin.table import FORMAT as TABLE_FORMAT, ComponentTable
from selproj_plugin.transforms import Transform

SETTINGS = ("paraphrased", "generated")
# Strategies run once per --proj-dim value (their ``dim`` option).
PROJECTION_STRATEGIES = ("random_projection", "random_projection_per_component")


@dataclass(frozen=True)
class Run:
    """One strategy to score: its label in the report, its registered name and its options."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def reducer(self) -> "Reducer":
        from selproj_plugin.registry import get_strategy

        return get_strategy(self.name, **dict(self.options))


def strategy_runs(names: Sequence[str], options: dict[str, dict[str, Any]], proj_dims: Sequence[str]) -> list[Run]:
    """Each requested strategy once, a projection strategy once per requested dimension."""
    runs = []
    for name in names:
        opts = options.get(name, {})
        if name in PROJECTION_STRATEGIES and proj_dims:
            runs += [Run(name if len(proj_dims) == 1 else f"{name}@{d}", name, tuple({**opts, "dim": d}.items())) for d in proj_dims]
        else:
            runs.append(Run(name, name, tuple(opts.items())))
    return runs


def stored_transforms(runs: Sequence[Run], catalogue: Sequence[Component]) -> dict[str, Transform]:
    """By key, the transforms of unfitted runs that a table can give only if it stores their similarities.

    The engine computes them while it builds the table (one gradient pass for everything);
    a fitted strategy's selection is known only after the table, so its transform, when a table
    cannot express it, goes through :func:`gradient_similarity` instead.
    """
    out: dict[str, Transform] = {}
    for run in runs:
        reducer = run.reducer()
        if reducer.fitted:
            continue
        t = reduction(reducer, catalogue).transform
        if type(t).on_table is Transform.on_table:  # no table form of its own: the engine stores its cosines
            out.setdefault(t.key, t)
    return out


@dataclass
class PipelineOptions:
    """What a run is built from; everything that changes a table is part of its cache key."""

    model: str | None = field(
        default=None, metadata={"help": "Hugging Face model id or local path (default: the embedded SmolLM2-135M-Instruct)"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "local .jsonl/.json/.csv/.parquet or hub dataset (default: the embedded 248 samples)"}
    )
    settings: tuple[str, ...] = SETTINGS
    max_samples: int | None = field(default=64, metadata={"help": "first N samples of the dataset (0 = all)"})
    candidates: int = field(default=5, metadata={"help": "BM25 top-k candidates per query"})
    full_set: bool = False
    runs: tuple["Run", ...] = ()  # strategies to score: the transforms a table cannot express are computed with it
    scope: str = "paper"  # component set: "paper" (embedding + weight matrices) or "all" (norms, biases too)
    seed: int = field(default=0, metadata={"help": "seed of the sample order, folds and random projections"})
    dtype: str = field(default="float32", metadata={"help": "model dtype", "choices": ("float32", "bfloat16")})
    # the engine's settings as the user gives them: memory_limit_gb is the machine's, shared by its processes
    # (engine_config divides it); a dot_order asked for is part of the table's key
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_new_tokens: int = field(default=64, metadata={"help": "generation length for the generated setting"})
    # prompts per generate call; None: the engine's batch size where given, else CPU_BATCH_SIZE
    generation_batch_size: int | None = None
    plan_only: bool = False  # stop before the table: PipelineResult.plan says what building it would do
    pool_ranking: bool = True  # the table covers every original: whole-pool MRR and recall@k beside top-1 of k
    finetune: FinetuneSettings | None = None  # train on the originals first (None or 0 epochs: as loaded)
    cache_dir: str | None = None

    @property
    def trains(self) -> bool:
        """Whether the model is fine-tuned before it is measured."""
        return self.finetune is not None and self.finetune.epochs > 0


def engine_config(opts: PipelineOptions) -> EngineConfig:
    """The engine config of this process: the machine's memory limit shared by its processes, its own device."""
    from selproj_plugin import distributed

    return dataclasses.replace(
        opts.engine,
        memory_limit_gb=opts.engine.memory_limit_gb / distributed.local_world(),
        device=distributed.local_device(opts.engine.device),
    )


@dataclass
class PipelineResult:
    """Per-setting tables plus what the report needs to say where they came from."""

    tables: dict[str, ComponentTable]
    identity: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # where this run's files went: not part of the results
    bm25: dict[str, np.ndarray] = field(default_factory=dict)  # per setting, [Q, K] BM25 score of each candidate
    similarity: dict[str, Similarity] = field(default_factory=dict)  # per setting, cosines from per-sample gradients
    plan: Any = None  # the table's TablePlan when the run was planned, not built
    pool_tables: dict[str, ComponentTable] = field(default_factory=dict)  # per setting, every original a candidate
    pool_bm25: dict[str, np.ndarray] = field(default_factory=dict)  # [Q, P] BM25 over the whole pool
    pool_similarity: dict[str, Similarity] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None  # the fine-tune's lineage record
    checkpoints: list["PipelineResult"] = field(default_factory=list)  # each checkpoint's, the base first
    checkpoint_info: dict[str, Any] = field(default_factory=dict)  # step and learning rate of this checkpoint


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


@dataclass
class Loaded:
    """A run's dataset and base model, loaded once, with what identifies them in every cache key."""

    dataset: Dataset
    config: EngineConfig  # this process's
    cache: StageCache
    model: Any
    tokenizer: Any
    identity: dict[str, Any]
    opts: PipelineOptions

    def load(self) -> tuple[Any, Any]:
        """The base model afresh (the checkpoints' step 0)."""
        return _load_model(self.opts, self.config)


def _load_model(opts: PipelineOptions, config: EngineConfig) -> tuple[Any, Any]:
    """The model as loaded and its tokenizer, rank 0 converting the default model once."""
    from selproj_plugin import distributed
    from selproj_plugin.models import load_model

    return distributed.main_first(lambda: load_model(opts.model, dtype=opts.dtype, device=config.device, cache=opts.cache_dir))


def load(opts: PipelineOptions, lap: Any = None) -> Loaded:
    """The dataset and the model as loaded (``lap(stage)`` after each)."""
    from selproj_plugin.models import DEFAULT_MODEL_NAME, weights_fingerprint

    lap = lap or (lambda name: None)
    dataset = load_dataset(opts.dataset, max_samples=opts.max_samples)
    lap("dataset")
    config = engine_config(opts)
    model, tokenizer = _load_model(opts, config)
    lap("model")
    identity = {
        "model": opts.model or DEFAULT_MODEL_NAME,
        "weights": weights_fingerprint(model),
        "dtype": opts.dtype,
        "dataset": dataset.name,
        "dataset_samples": len(dataset),
        "dataset_digest": digest([dataclasses.asdict(r) for r in dataset.records]),
        # samples are tokenised, and prompts wrapped, by these: generations and tables depend on them
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": digest(getattr(tokenizer, "chat_template", None)),
    }
    return Loaded(dataset, config, StageCache(opts.cache_dir), model, tokenizer, identity, opts)


def finetune(loaded: Loaded) -> FinetuneResult:
    """Train the loaded model on the dataset's originals as ``opts.finetune`` says, or reuse the cached run; the
    model ends holding the last checkpoint's weights, in eval mode."""
    from benchmark.finetune import finetune as train

    records = loaded.dataset.records
    return train(
        loaded.model,
        loaded.tokenizer,
        [r.original for r in records],
        [r.paraphrase for r in records],
        loaded.opts.finetune,
        cache=loaded.cache,
        base=loaded.identity,
        scope=loaded.opts.scope,
        progress=loaded.config.progress,
    )


def make_bench_options() -> PipelineOptions:
    """``make bench``'s options: the embedded model and dataset, fine-tuned as ``benchmark.retrieval`` does by default."""
    return PipelineOptions(finetune=FinetuneSettings())


def trained_model(opts: PipelineOptions | None = None) -> tuple[Any, Any]:
    """The model a benchmark run measures, and its tokenizer, in eval mode: ``make bench``'s by default (the
    embedded SmolLM2 fine-tuned on its dataset's first 64 originals).

    The fine-tune comes from the run's cache when that run has trained it, else it is trained once and cached
    (minutes on a CPU).  With ``opts.finetune`` unset or at 0 epochs it is the model as loaded."""
    opts = opts or make_bench_options()
    loaded = load(opts)
    if opts.trains:
        finetune(loaded)
    return loaded.model, loaded.tokenizer


def build_tables(opts: PipelineOptions) -> PipelineResult:
    """Run every stage, reusing the cache; returns one validated table per setting.

    With a fine-tune, the tables are the trained model's, and ``checkpoints`` holds every checkpoint's
    result (the base model first, the trained model last) when more than one was asked for.
    """
    from selproj_plugin.models import weights_fingerprint

    stages: dict[str, float] = {}
    lap = _lap_into(stages)
    loaded = load(opts, lap)
    model, tokenizer, dataset, config, cache, identity = (
        loaded.model,
        loaded.tokenizer,
        loaded.dataset,
        loaded.config,
        loaded.cache,
        loaded.identity,
    )
    if not opts.trains or opts.plan_only:
        result = _measure(model, tokenizer, dataset, opts, config, cache, identity, stages, lap)
        if opts.finetune is not None and opts.finetune.epochs == 0:
            result.finetune = {"epochs": 0, "base_weights": identity["weights"]}
        return result

    tuned = finetune(loaded)
    lap("finetune")
    record = {**tuned.record, "reused": tuned.reused}
    results = []
    for cp in tuned.checkpoints:
        _put_weights(model, cp, loaded.load)
        ident = {**identity, "weights": weights_fingerprint(model), "base_weights": identity["weights"], "finetune_step": cp.step}
        own: dict[str, float] = {}
        result = _measure(
            model,
            tokenizer,
            dataset,
            opts,
            config,
            cache,
            ident,
            own,
            _lap_into(own),
            weights=(lambda cp=cp: _put_weights(model, cp, loaded.load)),
        )
        result.checkpoint_info = {"index": cp.index, "step": cp.step, "lr": cp.lr}
        results.append(result)
        for name, seconds in own.items():
            stages[f"{name}" if len(tuned.checkpoints) == 1 else f"{name}@{cp.index}"] = seconds
    main = results[-1]
    main.stages = {**stages}
    main.finetune = record
    main.checkpoints = results if len(results) > 1 else []
    return main


def _lap_into(stages: dict[str, float]):
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 3)
        clock = now
        progress.LOG.info("stage %s: done in %.0f s", name, stages[name])

    return lap


def _put_weights(model: Any, checkpoint: Any, load: Any) -> None:
    """Load a checkpoint's weights into ``model`` unless it holds them already (gradient similarities run
    after every checkpoint's table, on whichever weights were loaded last)."""
    from benchmark.finetune import load_weights

    if getattr(model, "_selproj_checkpoint", None) == checkpoint.index:
        return
    if checkpoint.path is None:  # the base model: loaded again, not kept in memory through the fine-tune
        base, _ = load()
        model.load_state_dict(base.state_dict())
        del base
    else:
        load_weights(model, checkpoint)
    model._selproj_checkpoint = checkpoint.index


def take_columns(table: ComponentTable, columns: np.ndarray) -> ComponentTable:
    """A table of only the given candidate columns of each query ([Q, K'] indices into its candidates)."""
    rows = np.arange(table.n_queries)[:, None]
    return ComponentTable(
        cross=table.cross[rows, columns],
        query_self=table.query_self,
        candidate_self=table.candidate_self[rows, columns],
        is_original=table.is_original[rows, columns],
        components=table.components,
        num_params=table.num_params,
        kinds=table.kinds,
        layers=table.layers,
        query_ids=table.query_ids,
        candidate_ids=table.candidate_ids[rows, columns],
        rp_dims=table.rp_dims,
        rp_keys=table.rp_keys,
        rp_similarity=None if table.rp_similarity is None else table.rp_similarity[:, rows, columns],
        meta=dict(table.meta),
    )


def _measure(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    opts: PipelineOptions,
    config: EngineConfig,
    cache: StageCache,
    identity: dict[str, Any],
    stages: dict[str, float],
    lap: Any,
    weights: Any = None,
) -> PipelineResult:
    """Generations and tables of one model (one checkpoint): the stages after loading and fine-tuning.

    ``config`` is :func:`engine_config`'s, for the table and the gradient similarities alike.

    ``weights()`` puts this checkpoint's weights back into ``model`` before a gradient similarity is taken.
    """
    import torch

    from selproj_plugin import distributed
    from selproj_plugin.components import catalogue
    from selproj_plugin.engine import build_table, plan_table

    world = distributed.rank_world()[1]
    comps = catalogue(model, opts.scope)
    total_params = sum(c.num_params for c in comps)
    transforms = stored_transforms(opts.runs, comps)
    proj_dims = sorted({t.dim for t in transforms.values()})

    n = len(dataset)
    pool = [r.original for r in dataset.records]
    bm25 = bm25_scores([r.paraphrased_prompt for r in dataset.records], [r.prompt for r in dataset.records])
    whole_pool = opts.full_set or opts.pool_ranking
    topk = top_k(bm25, min(opts.candidates, n), force=list(range(n)))
    candidate_index = np.tile(np.arange(n), (n, 1)) if whole_pool else topk
    if whole_pool:  # the engine's log then counts every original as a candidate of every query
        progress.LOG.info("candidates: the whole pool of %d originals, BM25's top %d taken from it", n, min(opts.candidates, n))
    lap("candidates")

    generations: dict[str, str] = {}
    if "generated" in opts.settings:
        gen_key = {**identity, "max_new_tokens": opts.max_new_tokens}
        generations = generate_responses(
            model,
            tokenizer,
            [(r.id, r.paraphrased_prompt) for r in dataset.records],
            cache_path=cache.path("generations", gen_key, "json"),
            cache=cache,
            max_new_tokens=opts.max_new_tokens,
            progress=config.progress,
            batch_size=opts.generation_batch_size or opts.engine.batch_size or CPU_BATCH_SIZE,
        )
        lap("generate")

    per_setting = {s: _queries(s, dataset, generations) for s in opts.settings}
    queries = [q for s in opts.settings for _, q in per_setting[s]]
    originals = np.array([i for s in opts.settings for i, _ in per_setting[s]], dtype=int)
    rows = candidate_index[originals]
    is_original = rows == originals[:, None]
    table_key = {
        **identity,
        "component_set": opts.scope,
        "settings": opts.settings,
        "full_set": whole_pool,
        "candidates": None if whole_pool else opts.candidates,
        "projections": sorted(transforms),
        "max_length": config.max_length,
        "max_new_tokens": opts.max_new_tokens if "generated" in opts.settings else None,
        "queries": [q.id for q in queries],
        "package": package_version(),
        "table_format": TABLE_FORMAT,
        **({"dot_order": config.dot_order} if config.dot_order != EngineConfig.dot_order else {}),
    }
    table_path = cache.path("table", table_key, "npz")
    if opts.plan_only:
        plan = plan_table(
            model, tokenizer, queries, pool, rows, scope=opts.scope, transforms=list(transforms.values()), config=config, across_ranks=True
        )
        return PipelineResult(tables={}, identity=identity, stages=stages, plan=plan)
    table = cache.load(table_path, ComponentTable.load)
    candidate_ids = np.array([[pool[j].id for j in row] for row in rows]).reshape(rows.shape)
    problem = None if table is None else _other_rows(table, [q.id for q in queries], candidate_ids)
    if problem is not None:  # the key holds the candidate count, not which ones (a BM25 release may rank others)
        print(f"[selproj] cached {table_path.name} was built for other rows ({problem}): rebuilding it", file=sys.stderr)
        table = None
    reused = all(distributed.gather(table is not None))  # the ranks must agree on building it together
    if not reused:
        if weights is not None:
            weights()
        table = build_table(
            model,
            tokenizer,
            queries,
            pool,
            rows,
            is_original,
            transforms=list(transforms.values()),
            config=config,
            scope=opts.scope,
            across_ranks=True,
            shard_path=lambda rank, world: cache.path("table", table_key, f"shard{rank}of{world}.npz"),
        )
    # the settings' queries one after the other: --table scores each apart, as this run does (a table cached
    # before tables recorded it gets the record here: its key holds the queries, so their order is this one)
    table.meta["query_groups"] = [[s, len(per_setting[s])] for s in opts.settings]
    cached = reused or (distributed.is_main() and cache.save(table_path, table.save))
    lap("table")

    spans = {s: r for s, r in table.group_rows().items() if r.size}  # each setting's rows of the table
    whole = {s: table.take(r) for s, r in spans.items()}
    if whole_pool and not opts.full_set:  # each query's BM25 top-k columns of the whole-pool table
        tables = {s: take_columns(whole[s], topk[originals[r]]) for s, r in spans.items()}
        kept_rows = {s: topk[originals[r]] for s, r in spans.items()}
    else:
        tables, kept_rows = whole, {s: rows[r] for s, r in spans.items()}
    bm25_rows = {s: np.take_along_axis(bm25[originals[r]], kept_rows[s], axis=1) for s, r in spans.items()}
    run = {
        "table_cache": str(table_path) if cached else None,
        "table_reused": reused,
        "world_size": world,
        "threads_per_process": torch.get_num_threads(),
    }
    notes = {
        "empty_generations": len(dataset) - len(per_setting["generated"]) if "generated" in per_setting else 0,
        "skipped_multiturn": dataset.skipped_multiturn,
        "truncated": table.meta.get("truncated", 0),
        "captures": table.meta.get("captures"),  # samples forward/backward'ed for the table (recomputed ones again)
        "total_params": total_params,
        "proj_dims": proj_dims,
    }

    def similarity_of(s: str, r: np.ndarray, cand: np.ndarray) -> Similarity:
        return gradient_similarity(
            model, tokenizer, [queries[i] for i in r], pool, cand, cand == originals[r][:, None], opts.scope, config, weights
        )

    similarity = {s: similarity_of(s, r, kept_rows[s]) for s, r in spans.items()}
    result = PipelineResult(tables=tables, identity=identity, stages=stages, notes=notes, run=run, bm25=bm25_rows, similarity=similarity)
    if whole_pool and not opts.full_set:
        result.pool_tables = whole
        result.pool_bm25 = {s: bm25[originals[r]] for s, r in spans.items()}
        result.pool_similarity = {s: similarity_of(s, r, rows[r]) for s, r in spans.items()}
    return result


def _other_rows(table: ComponentTable, query_ids: Sequence[str], candidate_ids: np.ndarray) -> str | None:
    """Where a cached table's queries or candidates differ from the run's, row by row (None where they agree)."""
    if table.n_queries != len(query_ids) or table.candidate_ids.shape != candidate_ids.shape:
        return f"{table.n_queries} x {table.n_candidates}, the run {len(query_ids)} x {candidate_ids.shape[1]}"
    for row, (have, want) in enumerate(zip(table.query_ids, query_ids)):
        if str(have) != str(want):
            return f"row {row} is query {have}, the run's {want}"
    for row, (have, want) in enumerate(zip(table.candidate_ids.astype(str), candidate_ids.astype(str))):
        if list(have) != list(want):
            return f"query {query_ids[row]} has candidates {', '.join(have)}, the run {', '.join(want)}"
    return None


def gradient_similarity(
    model: Any,
    tokenizer: Any,
    queries: Sequence[Sample],
    pool: Sequence[Sample],
    rows: np.ndarray,
    is_original: np.ndarray,
    scope: str,
    config: Any,
    weights: Any = None,
) -> Similarity:
    """``similarity(reduction, query_rows)``: [len(rows), K] cosines of the reduction's transform applied to
    the per-sample gradients of those queries and their candidates (the engine, in this process);
    ``weights()`` first puts the table's checkpoint back into ``model``."""
    from selproj_plugin.engine import build_table

    def similarity(red: Reduction, query_rows: np.ndarray) -> np.ndarray:
        if weights is not None:
            weights()
        t = red.transform
        table = build_table(
            model,
            tokenizer,
            [queries[i] for i in query_rows],
            pool,
            rows[query_rows],
            is_original[query_rows],
            components=[c.name for c in t.components],
            scope=scope,
            transforms=[t],
            config=config,
        )
        return table.projection(t.key)

    return similarity
